"""Implicit-feedback alternating least squares (Hu, Koren & Volinsky, 2008), batched in torch.

Every observed cell ``r_ui > 0`` gives a preference ``p_ui = 1`` with confidence
``c_ui = 1 + alpha * r_ui``; every other cell has ``p_ui = 0`` and ``c_ui = 1``. The objective

    L(X, Y) = sum over ALL (u, i) of c_ui (p_ui - x_u . y_i)^2 + regularization (|X|^2 + |Y|^2)

is quadratic in X for fixed Y (and vice versa), so each row has a closed-form solution. For a
user ``u`` with observed items ``I_u`` (``C_u`` = diag of its confidences):

    A_u = Y^T Y + Y^T (C_u - I) Y + lambda I = Y^T Y + lambda I + alpha sum_{i in I_u} r_ui y_i y_i^T
    b_u = Y^T C_u p_u = sum_{i in I_u} (1 + alpha r_ui) y_i
    x_u = A_u^{-1} b_u

Only the observed items enter the per-row terms; ``Y^T Y`` is shared. :func:`solve_rows` sorts the
rows by their number of observed cells, cuts them into batches whose padded ``(B, L, k)`` gather
stays under a memory budget and wastes little on padding (:func:`row_batches`), and solves each
batch at once, so the Python loop runs over batches, never over users. Items are solved the same
way from the transposed matrix. Two solvers:

- ``cholesky``: forms every ``A_u`` (one batched matrix product) and solves it exactly with one
  batched Cholesky factorisation: O(L k^2 + k^3) per row of L entries.
- ``cg``: a few conjugate-gradient steps per row, warm-started from the current factors (Takacs,
  Pilaszy & Tikk 2011, "Applications of the conjugate gradient method for implicit feedback
  collaborative filtering"; the ``implicit`` library's default). ``A_u p`` is computed as
  ``base p + sum_i alpha r_ui f_i (f_i . p)`` from the gathered factors without forming ``A_u``:
  O(L k) per step. Each step lowers the row's quadratic objective, so (in exact arithmetic) the
  sweeps still decrease the loss monotonically; they only approach the exact alternating solution more slowly.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from recsys.data.dataset import PreparedData
from recsys.embeddings.memory import tensor_bytes
from recsys.errors import ConfigError
from recsys.models.settings import check, is_int, is_number
from recsys.training.loop import TrainerConfig

MAX_BATCH_ELEMENTS = 4 * 2**20  # floats of one batch's padded gather plus its k x k systems
PADDING_SLACK = 1 << 12  # padding cells allowed per batch on top of max_padding
_LOSS_CHUNK = 1 << 14  # observed cells per chunk of the loss: its float64 gathers stay in cache
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_SOLVERS = ("cholesky", "cg")

FAMILY = "als"  # the family name of its model packages


def _csr_tensors(matrix: sp.spmatrix) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indptr, indices, values) int64/int64/float64 tensors of a canonical CSR copy."""
    m = sp.csr_matrix(matrix, copy=True)
    m.sum_duplicates()
    return (torch.from_numpy(m.indptr.astype(np.int64)), torch.from_numpy(m.indices.astype(np.int64)),
            torch.from_numpy(m.data.astype(np.float64)))


def row_batches(lengths: np.ndarray, k: int, max_elements: int = MAX_BATCH_ELEMENTS,
                max_padding: float = 0.25, padding_slack: int = PADDING_SLACK) -> list[np.ndarray]:
    """Groups the rows with at least one entry into few batches of similar length.

    Rows are sorted by length (stable) and cut greedily: a batch of ``B`` rows whose longest row
    has ``L`` entries grows while its cost ``B * (L * k + k * k)`` stays at most ``max_elements``
    and its padded size ``B * L`` stays at most ``(1 + max_padding)`` times its real entries plus
    ``padding_slack`` cells (a batch holds at least one row whatever its cost). The slack merges
    the many short rows into fewer batches, each with a fixed per-batch cost; the defaults (16 MB
    batches in float32, 4096 cells of slack) were the fastest for both solvers on an 800k-entry
    matrix with k = 64: larger batches or slack pad more (up to +65% cells) and fall out of cache.
    The loop runs over batches, never over rows.

    Args:
        lengths: number of stored entries of each row, shape (n_rows,).
        k: number of factors.
        max_elements: memory budget of one batch, in elements.
        max_padding: padding allowed beyond the slack, as a fraction of the batch's entries.
        padding_slack: padding cells always allowed per batch.

    Returns:
        Row index arrays, one per batch, in increasing order of length; empty rows are left out.

    Example:
        >>> lengths = np.array([0, 9, 1, 1, 1, 10])
        >>> [b.tolist() for b in row_batches(lengths, k=1, max_elements=100, padding_slack=0)]
        [[2, 3, 4], [1, 5]]
        >>> [b.tolist() for b in row_batches(lengths, k=1, max_elements=4, padding_slack=0)]
        [[2, 3], [4], [1], [5]]
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    order = order[lengths[order] > 0]
    sorted_lengths = lengths[order]
    cumulative = np.concatenate([[0], np.cumsum(sorted_lengths)])
    window = max(1, max_elements // (k * k + k))  # no batch can hold more rows than this
    batches, start, n = [], 0, len(order)
    while start < n:
        ends = np.arange(start + 1, min(n, start + window) + 1)
        rows, longest = ends - start, sorted_lengths[ends - 1]
        ok = ((rows * (longest * k + k * k) <= max_elements)
              & (rows * longest <= (1 + max_padding) * (cumulative[ends] - cumulative[start]) + padding_slack))
        ok[0] = True
        failed = np.flatnonzero(~ok)
        stop = start + (int(failed[0]) if len(failed) else len(ends))
        batches.append(order[start:stop])
        start = stop
    return batches


class RowBatch(NamedTuple):
    """One batch of rows with its padded ``(B, L)`` gather indices, built once per matrix."""

    rows: torch.Tensor  # (B,) int64 row indices
    cols: torch.Tensor  # (B, L) int64 column of each entry; 0 on padding
    values: torch.Tensor  # (B, L) float64 r_ui; 0 on padding, so padding adds nothing to A or b


def gather_plan(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                batches: list[np.ndarray]) -> list[RowBatch]:
    """The padded ``(B, L)`` column indices and values of each batch of :func:`row_batches`.

    The matrix does not change between sweeps, so the model builds this once and every sweep reuses
    it; the per-batch work of a solve then starts with the ``(B, L, k)`` gather of the factors.
    """
    plan = []
    for rows in batches:
        rows = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        starts, lengths = indptr[rows], indptr[rows + 1] - indptr[rows]
        offsets = torch.arange(int(lengths.max()))
        padding = offsets[None, :] >= lengths[:, None]  # (B, L)
        positions = (starts[:, None] + offsets[None, :]).masked_fill_(padding, 0)
        plan.append(RowBatch(rows, indices[positions].masked_fill_(padding, 0),
                             values[positions].masked_fill_(padding, 0.0)))
    return plan


def _gather(batch: RowBatch, fixed: torch.Tensor, alpha: float,
            workspace: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(g, w, target)``: the batch's gathered fixed factors ``(B, L, k)`` (written into ``workspace``, so
    no large buffer is allocated per batch), ``w = alpha r_ui`` and ``target = c_ui p_ui`` ``(B, L)``.

    Padding has ``r = 0``, hence ``w = target = 0``: it adds nothing to ``A_u`` or ``b_u``. So
    ``A_u = base + g_u^T diag(w_u) g_u`` and ``b_u = g_u^T target_u``.
    """
    r, cols = batch.values, batch.cols
    w = (alpha * r).to(fixed.dtype)
    target = torch.where(r > 0, 1.0 + alpha * r, 0.0).to(fixed.dtype)  # zero on padding and r <= 0
    g = workspace[:cols.numel() * fixed.shape[1]].view(cols.numel(), fixed.shape[1])
    torch.index_select(fixed, 0, cols.view(-1), out=g)
    return g.view(*cols.shape, -1), w, target


def _cholesky_batch(g: torch.Tensor, w: torch.Tensor, target: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Exact solutions ``(B, k)`` by one batched Cholesky factorisation; scales ``g`` in place."""
    b = torch.bmm(target.unsqueeze(1), g).transpose(1, 2)  # (B, k, 1)
    if bool((w >= 0).all()):  # always, for alpha >= 0 and r >= 0: g <- sqrt(w) g, no second (B, L, k) tensor
        a = torch.baddbmm(base, g.mul_(w.sqrt().unsqueeze(2)).transpose(1, 2), g)  # (B, k, k)
    else:
        a = torch.baddbmm(base, (g * w.unsqueeze(2)).transpose(1, 2), g)
    factor, info = torch.linalg.cholesky_ex(a)
    solution = torch.linalg.solve_triangular(factor, b, upper=False)
    solution = torch.linalg.solve_triangular(factor.transpose(1, 2), solution, upper=True)
    bad = (info != 0) | ~torch.isfinite(solution).all(dim=(1, 2))
    if bad.any():  # not numerically positive definite in this precision: least squares in float64
        solution[bad] = torch.linalg.lstsq(a[bad].double(), b[bad].double()).solution.to(solution.dtype)
    return solution.squeeze(2)


def _cg_batch(g: torch.Tensor, w: torch.Tensor, target: torch.Tensor, base: torch.Tensor,
              x: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` conjugate-gradient steps on ``A_u x_u = b_u`` from ``x`` (B, k), batched over rows; updates ``x``.

    ``A_u p = base p + g_u^T (w_u * (g_u p))`` costs two passes over the ``(B, L, k)`` gather and never forms
    ``A_u``; the first residual ``b_u - A_u x_u = g_u^T (target_u - w_u * (g_u x_u)) - base x_u`` takes two
    more. A row stops once its residual has shrunk by the dtype's epsilon (or is zero).
    """
    w, g_t = w.unsqueeze(1), g.transpose(1, 2)  # (B, 1, L), (B, k, L): (B, 1, k) @ g_t is the fast gemv here

    def product(p: torch.Tensor, rhs: torch.Tensor | None = None) -> torch.Tensor:
        s = torch.bmm(p.unsqueeze(1), g_t).mul_(w)  # (B, 1, L): w_ui f_i . p
        if rhs is not None:
            s = rhs - s
        return torch.bmm(s, g).squeeze(1)

    eps = torch.finfo(x.dtype).eps
    residual = torch.addmm(product(x, target.unsqueeze(1)), x, base, alpha=-1.0)  # base is symmetric
    rs = (residual * residual).sum(1)
    tolerance = (rs * eps**2).clamp_min_(torch.finfo(x.dtype).tiny)
    direction = residual.clone()
    for step in range(steps):
        active = rs > tolerance
        if not active.any():
            break
        ap = torch.addmm(product(direction), direction, base)
        curvature = (direction * ap).sum(1)
        size = torch.where(active & (curvature > 0), rs / curvature, 0.0).unsqueeze(1)
        x.addcmul_(size, direction)
        if step == steps - 1:
            break
        residual.addcmul_(size, ap, value=-1.0)
        rs_new = (residual * residual).sum(1)
        beta = torch.where(active, rs_new / rs, 0.0).unsqueeze(1)
        direction.mul_(beta).add_(residual)
        rs = rs_new
    return x


def solve_rows(matrix: sp.spmatrix, fixed: torch.Tensor, regularization: float, alpha: float,
               out: torch.Tensor | None = None, max_elements: int = MAX_BATCH_ELEMENTS,
               progress: tqdm | None = None, solver: str = "cholesky", cg_steps: int = 3,
               _csr=None, _batches=None, _plan=None) -> torch.Tensor:
    """Implicit-ALS solve of every row of ``matrix`` with the other side fixed.

    For row ``u`` with stored values ``r_ui``: ``x_u = A_u^-1 b_u`` with ``A_u = F^T F + lambda I + alpha sum
    r_ui f_i f_i^T`` and ``b_u = sum_{r_ui > 0} (1 + alpha r_ui) f_i``. Rows without entries get zero factors.

    ``solver="cholesky"`` solves every system exactly (a batched Cholesky factorisation, O(k^3) per row).
    ``solver="cg"`` runs ``cg_steps`` conjugate-gradient steps per row instead (Takacs et al. 2011), at
    O(L k) per step for a row of L entries, warm-started from ``out``: it only approximates ``A_u^-1 b_u``,
    but each step lowers the row's objective, so alternating sweeps still converge.

    Args:
        matrix: (n_rows, n_cols) scipy sparse matrix of the r_ui (e.g. 0/1 interactions).
        fixed: (n_cols, k) factors of the other side; their dtype is the solve's dtype.
        regularization: lambda >= 0.
        alpha: confidence weight >= 0.
        out: optional (n_rows, k) tensor written in place; a new one is allocated when None. With
            ``solver="cg"`` it is also the starting point (zeros when None).
        max_elements: memory budget of one batch (see :func:`row_batches`).
        progress: optional tqdm updated once per batch.
        solver: ``"cholesky"`` (exact) or ``"cg"`` (conjugate gradient).
        cg_steps: conjugate-gradient steps per row (>= 1) for ``solver="cg"``; ``k`` steps solve exactly
            up to rounding.

    Returns:
        The (n_rows, k) factors (``out`` when given).

    Example:
        >>> m = sp.csr_matrix(np.array([[1.0, 0.0], [0.0, 0.0]]))
        >>> solve_rows(m, torch.eye(2, dtype=torch.float64), regularization=1.0, alpha=1.0)
        tensor([[0.6667, 0.0000],
                [0.0000, 0.0000]], dtype=torch.float64)
    """
    n_rows, k = matrix.shape[0], fixed.shape[1]
    if matrix.shape[1] != fixed.shape[0]:
        raise ConfigError(f"solve_rows: matrix has {matrix.shape[1]} columns but fixed has {fixed.shape[0]} rows")
    if solver not in _SOLVERS:
        raise ConfigError(f"solve_rows: solver={solver!r}, expected one of {list(_SOLVERS)}")
    if solver == "cg" and cg_steps < 1:
        raise ConfigError(f"solve_rows: cg_steps={cg_steps!r}, expected an integer >= 1")
    indptr, indices, values = _csr if _csr is not None else _csr_tensors(matrix)
    if _plan is None:
        batches = _batches if _batches is not None else row_batches(np.diff(indptr.numpy()), k, max_elements)
        _plan = gather_plan(indptr, indices, values, batches)
    if out is None:
        out = torch.zeros(n_rows, k, dtype=fixed.dtype)
    else:
        out[indptr[1:] == indptr[:-1]] = 0  # rows without entries solve to zero; every other row is overwritten
    base = fixed.T @ fixed + regularization * torch.eye(k, dtype=fixed.dtype)
    workspace = torch.empty(max((batch.cols.numel() for batch in _plan), default=0) * k, dtype=fixed.dtype)
    for batch in _plan:
        g, w, target = _gather(batch, fixed, alpha, workspace)
        if solver == "cg":
            solution = _cg_batch(g, w, target, base, out[batch.rows].to(fixed.dtype), cg_steps)
        else:
            solution = _cholesky_batch(g, w, target, base)
        out[batch.rows] = solution.to(out.dtype)
        if progress is not None:
            progress.update()
    return out


def implicit_loss(matrix: sp.spmatrix, users: torch.Tensor, items: torch.Tensor, regularization: float,
                  alpha: float, _csr=None, _row_ids=None) -> float:
    """The full implicit-ALS objective over all n_users x n_items cells, without a dense matrix.

    Uses ``sum_all c (p - s)^2 = sum_all s^2 + sum_observed [c (p - s)^2 - s^2]`` with
    ``s = x_u . y_i`` and ``sum_all s^2 = <X^T X, Y^T Y>`` (the Gram trick), in float64. The observed
    cells go in chunks small enough for their float64 gathers to stay in cache, into buffers reused
    by every chunk.

    Args:
        matrix: (n_users, n_items) scipy sparse matrix of the r_ui.
        users: (n_users, k) factors X.
        items: (n_items, k) factors Y.
        regularization: lambda of ``lambda (|X|^2 + |Y|^2)``.
        alpha: confidence weight.

    Returns:
        The objective (not normalised).

    Example:
        >>> m = sp.csr_matrix(np.array([[1.0, 0.0]]))
        >>> implicit_loss(m, torch.ones(1, 1), torch.zeros(2, 1), regularization=0.0, alpha=1.0)
        2.0
    """
    indptr, indices, values = _csr if _csr is not None else _csr_tensors(matrix)
    row_ids = _row_ids if _row_ids is not None else _row_ids_of(indptr)
    x, y = users.double(), items.double()
    total = float((x.T @ x * (y.T @ y)).sum())
    observed = torch.zeros((), dtype=torch.float64)
    x_cells, y_cells = (torch.empty(min(_LOSS_CHUNK, len(indices)), x.shape[1], dtype=torch.float64) for _ in "xy")
    for lo in range(0, len(indices), _LOSS_CHUNK):
        rows, cols, r = row_ids[lo:lo + _LOSS_CHUNK], indices[lo:lo + _LOSS_CHUNK], values[lo:lo + _LOSS_CHUNK]
        xu = torch.index_select(x, 0, rows, out=x_cells[:len(rows)])  # reused buffers: no allocation per chunk
        yi = torch.index_select(y, 0, cols, out=y_cells[:len(rows)])
        s = torch.bmm(xu.unsqueeze(1), yi.unsqueeze(2)).view(-1)
        observed += ((1.0 + alpha * r) * ((r > 0).double() - s) ** 2 - s**2).sum()
    return total + float(observed) + regularization * float(x.pow(2).sum() + y.pow(2).sum())


def _row_ids_of(indptr: torch.Tensor) -> torch.Tensor:
    """The row of every stored entry of a CSR matrix, (nnz,) int64."""
    return torch.repeat_interleave(torch.arange(len(indptr) - 1), indptr.diff())


class ImplicitALS:
    """Implicit-feedback matrix factorization trained by alternating least squares; a ``Trainable``.

    One ``train_epoch`` is one sweep: all users are solved with the items fixed, then all items
    with the users fixed. Rows are solved in batches (see :func:`solve_rows`), either exactly with
    batched Cholesky factorisations or with a few conjugate-gradient steps warm-started from the
    current factors, so all torch intra-op threads are used. Index 0 (OOV) of users and
    items has no interactions and stays zero. Training is deterministic given ``trainer.seed``.

    Args:
        data: a prepared interactions dataset; ``data.matrix("train")`` gives the r_ui (0/1).
        trainer: loop settings; ``trainer.seed`` seeds the initial factors.
        factors: number of latent factors k (>= 1).
        regularization: L2 weight lambda on all factors (>= 0).
        alpha: confidence weight, c_ui = 1 + alpha * r_ui (>= 0). The ``implicit`` library's
            confidence is its alpha times r_ui, so on 0/1 data its ``alpha=a`` is ``alpha=a - 1`` here.
        init_scale: initial factors are standard normal times this (>= 0).
        dtype: ``float32`` (default) or ``float64``; the dtype of the factors and the solves.
        solver: ``"cg"`` (default: ``cg_steps`` conjugate-gradient steps per row from the current
            factors, O(L k) per step; Takacs et al. 2011) or ``"cholesky"`` (exact solve of every row,
            O(L k^2 + k^3)). On ml100k both reach the same test metrics at 15 sweeps (see
            ``conf/model/als.yaml``); CG is about 3x faster.
        cg_steps: conjugate-gradient steps per row and sweep (>= 1); used by ``solver="cg"``.
        compute_loss: compute the full objective after each sweep and return it as ``"loss"``; when
            False ``train_epoch`` returns no metrics and the sweep skips that pass over the data.

    Example:
        >>> model = ImplicitALS(PreparedData.open("data/prepared/ml100k"), TrainerConfig(epochs=15))  # doctest: +SKIP
        >>> model.train_epoch(0, None)["loss"]  # doctest: +SKIP
        >>> model.score_users(torch.tensor([1, 2])).shape  # doctest: +SKIP
        torch.Size([2, 1483])
    """

    def __init__(self, data: PreparedData, trainer: TrainerConfig, factors: int = 64,
                 regularization: float = 10.0, alpha: float = 1.0, init_scale: float = 0.01,
                 dtype: str = "float32", solver: str = "cg", cg_steps: int = 3,
                 compute_loss: bool = True):
        check(is_int(factors), "factors", factors, "an integer >= 1")
        check(is_number(regularization) and regularization >= 0, "regularization", regularization,
               "a finite number >= 0")
        check(is_number(alpha) and alpha >= 0, "alpha", alpha, "a finite number >= 0")
        check(is_number(init_scale) and init_scale >= 0, "init_scale", init_scale, "a finite number >= 0")
        check(dtype in _DTYPES, "dtype", dtype, f"one of {sorted(_DTYPES)}")
        check(solver in _SOLVERS, "solver", solver, f"one of {list(_SOLVERS)}")
        check(is_int(cg_steps), "cg_steps", cg_steps, "an integer >= 1")
        check(isinstance(compute_loss, bool), "compute_loss", compute_loss, "true or false")
        if data.kind != "interactions":
            raise ConfigError(f"ALS needs an interactions dataset; {data.root} holds {data.kind!r}")
        self.data, self.trainer = data, trainer
        self.factors, self.regularization, self.alpha = int(factors), float(regularization), float(alpha)
        self.dtype = _DTYPES[dtype]
        self.solver, self.cg_steps, self.compute_loss = solver, int(cg_steps), compute_loss
        train = sp.csr_matrix(data.matrix("train"))
        self._train = train
        self._user_csr = _csr_tensors(train)
        self._item_csr = _csr_tensors(train.T.tocsr())
        self._user_plan = gather_plan(*self._user_csr, row_batches(np.diff(self._user_csr[0].numpy()), self.factors))
        self._item_plan = gather_plan(*self._item_csr, row_batches(np.diff(self._item_csr[0].numpy()), self.factors))
        self._row_ids = _row_ids_of(self._user_csr[0])
        generator = torch.Generator().manual_seed(trainer.seed)
        n_users, n_items = train.shape
        self.user_factors = torch.randn(n_users, self.factors, generator=generator, dtype=torch.float64)
        self.item_factors = torch.randn(n_items, self.factors, generator=generator, dtype=torch.float64)
        self.user_factors = (self.user_factors * init_scale).to(self.dtype)
        self.item_factors = (self.item_factors * init_scale).to(self.dtype)
        self.user_factors[0] = 0  # OOV rows: never interacted, never scored
        self.item_factors[0] = 0

    def train_epoch(self, epoch: int, progress: tqdm | None) -> dict[str, float]:
        """One sweep (users, then items); returns ``{"loss": objective / n_users}`` after it (``{}`` when
        ``compute_loss`` is False)."""
        if progress is not None:
            progress.reset(total=len(self._user_plan) + len(self._item_plan))
        solver = {"solver": self.solver, "cg_steps": self.cg_steps, "progress": progress}
        solve_rows(self._train, self.item_factors, self.regularization, self.alpha, out=self.user_factors,
                   _csr=self._user_csr, _plan=self._user_plan, **solver)
        solve_rows(self._train.T, self.user_factors, self.regularization, self.alpha, out=self.item_factors,
                   _csr=self._item_csr, _plan=self._item_plan, **solver)
        if not self.compute_loss:
            return {}
        loss = implicit_loss(self._train, self.user_factors, self.item_factors, self.regularization, self.alpha,
                             _csr=self._user_csr, _row_ids=self._row_ids) / self._train.shape[0]
        if progress is not None:
            progress.set_postfix(loss=f"{loss:.4f}")
        return {"loss": loss}

    @torch.no_grad()
    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        """(B,) user indices -> (B, n_items) float32 scores ``x_u . y_i``."""
        return (self.user_factors[users.long()] @ self.item_factors.T).float()

    def state(self) -> dict:
        return {"user_factors": self.user_factors, "item_factors": self.item_factors}

    def load_state(self, state: dict) -> None:
        for name in ("user_factors", "item_factors"):
            target, value = getattr(self, name), state[name]
            if value is not target:
                target.copy_(value)

    def memory(self) -> dict[str, int]:
        return {"user": tensor_bytes(self.user_factors), "item": tensor_bytes(self.item_factors)}

    def export(self) -> tuple[str, dict, dict[str, torch.Tensor]]:
        """Family, build arguments and tensors of a model package (see ``recsys.inference``)."""
        return FAMILY, {"factors": self.factors}, {f"model.{k}": v for k, v in self.state().items()}
