"""Non-negative x binary matrix factorization (NBMF), trained by alternating NNLS and QUBO solves.

NBMF approximates a matrix by ``X ~ W H`` with non-negative real user factors ``W`` (n_users x k) and
binary item codes ``H`` in {0, 1} (k x n_items; stored here as ``codes`` = ``H^T``, one row per item).
NBMF was introduced by O'Malley, Vesselinov, Alexandrov & Alexandrov ("Nonnegative/binary matrix
factorization with a D-Wave quantum annealer", PLoS ONE 2018), who solve the binary factor column by
column as QUBOs on an annealer (see also Golden & O'Malley, "Reverse annealing for nonnegative/binary
matrix factorization", PLoS ONE 2021; Asaoka & Kudo on images). Terui, Inoue, Hamakawa, Tatsumura & Kudo
("Collaborative filtering based on nonnegative/binary matrix factorization", Frontiers in Big Data 2025,
arXiv:2410.10381) apply it to ratings, with the unrated cells masked out of the loss and an Ising machine
for the QUBOs. Here the QUBOs are solved in torch (:mod:`recsys.models.binary_solvers`).

The objective over a set of cells (u, i) with targets ``t_ui`` and weights ``c_ui > 0`` is

    L(W, H) = sum_cells c_ui (t_ui - w_u . h_i)^2 + zero_weight * sum_{other cells} (w_u . h_i)^2
              + regularization |W|^2.

On implicit data the cells are the positives (``t = 1``, ``c = 1``) and the unobserved cells are zeros,
either all of them with weight ``zero_weight`` (``zeros="weighted"``: the second sum, computed with the
Gram trick ``sum_all s^2 = <W^T W, H H^T>``, never forms the dense matrix) or ``zero_samples`` sampled
zeros per positive with weight ``zero_weight`` (``zeros="sampled"``: extra cells with ``t = 0``,
resampled every epoch). With ``zero_weight = 0`` and arbitrary cells it is the masked loss of the papers.

One alternation (one ``train_epoch``):

- W step, per user: ``min_{w >= 0} w^T A_u w - 2 b_u^T w`` with
  ``A_u = zero_weight H H^T + regularization I + sum_cells (c_ui - zero_weight) h_i h_i^T`` and
  ``b_u = sum_cells c_ui t_ui h_i``, by projected coordinate descent (:func:`nnls_descent`, warm-started;
  exact NNLS in the limit), batched over users like ALS (:func:`recsys.models.als.row_batches`).
- H step, per item: ``min_{h in {0,1}^k} h^T Q_i h + q_i^T h`` with ``Q_i = zero_weight W^T W +
  sum_cells (c_ui - zero_weight) w_u w_u^T`` and ``q_i = -2 sum_cells c_ui t_ui w_u``, by
  :func:`recsys.models.binary_solvers.solve_qubo`, which keeps the current code unless the new one is
  strictly better: neither step increases L, so the loss falls monotonically (for a fixed set of cells).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from recsys.data.dataset import PreparedData
from recsys.data.vocab import OOV
from recsys.embeddings.memory import tensor_bytes
from recsys.errors import ConfigError
from recsys.models.als import gather_plan, row_batches
from recsys.models.binary_solvers import MAX_ENUMERATION_BITS, METHODS, Annealing, solve_qubo
from recsys.models.settings import check, is_int, is_number
from recsys.training.loop import TrainerConfig

ZEROS = ("weighted", "sampled")
DEVICES = ("auto", "cpu", "cuda")
_LOSS_CHUNK = 1 << 16  # cells per chunk of the loss
QUBO_ELEMENTS = 1 << 23  # QUBO matrix elements of the items solved at once by the H step

FAMILY = "nbmf"  # the family name of its model packages


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Packs 0/1 codes (N, k) into (N, ceil(k / 8)) uint8, bit j of a row in byte j // 8 at position j % 8.

    Example:
        >>> pack_codes(torch.tensor([[1, 0, 1, 1, 0, 0, 0, 0, 1]]))
        tensor([[13,  1]], dtype=torch.uint8)
    """
    n, k = codes.shape
    padded = torch.zeros(n, -(-k // 8) * 8, dtype=torch.uint8, device=codes.device)
    padded[:, :k] = codes.to(torch.uint8)
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=codes.device)
    return (padded.view(n, -1, 8) * weights).sum(2, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, k) 0/1 codes of :func:`pack_codes`' (N, ceil(k / 8)) bytes, in ``dtype``.

    Example:
        >>> unpack_codes(torch.tensor([[13, 1]], dtype=torch.uint8), 9).int().tolist()
        [[1, 0, 1, 1, 0, 0, 0, 0, 1]]
    """
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(2) >> shifts) & 1
    return bits.view(packed.shape[0], -1)[:, :k].to(dtype)


class CellBatch(NamedTuple):
    """A batch of rows with their padded ``(B, L)`` cells; padding has weight 0."""

    rows: torch.Tensor  # (B,) int64
    cols: torch.Tensor  # (B, L) int64, 0 on padding
    targets: torch.Tensor  # (B, L) float64 t, 0 on padding
    weights: torch.Tensor  # (B, L) float64 c > 0, 0 on padding


class Cells(NamedTuple):
    """The cells of a loss in CSR form: ``targets[p]`` and ``weights[p]`` of cell ``(row, indices[p])``.

    Example:
        >>> cells = Cells.from_dense(torch.tensor([[2.0, 5.0], [0.0, 1.0]]), torch.tensor([[1, 0], [1, 1]]))
        >>> cells.targets.tolist(), cells.transpose().indices.tolist()
        ([2.0, 0.0, 1.0], [0, 1, 1])
    """

    indptr: torch.Tensor  # (n_rows + 1,) int64
    indices: torch.Tensor  # (nnz,) int64 column of each cell, increasing within a row
    targets: torch.Tensor  # (nnz,) float64 t
    weights: torch.Tensor  # (nnz,) float64 c > 0
    shape: tuple[int, int]

    @classmethod
    def from_sparse(cls, matrix: sp.spmatrix) -> Cells:
        """The stored entries of ``matrix`` as cells, with targets from its values and weight 1."""
        m = sp.csr_matrix(matrix, copy=True)
        m.sum_duplicates()
        m.sort_indices()
        return cls._of(m.indptr, m.indices, m.data, np.ones(m.nnz), m.shape)

    @classmethod
    def from_dense(cls, values: torch.Tensor, mask: torch.Tensor) -> Cells:
        """The cells where ``mask`` (n_rows, n_cols) is nonzero, with targets from ``values`` and weight 1."""
        mask = np.asarray(mask) != 0
        rows, cols = np.nonzero(mask)
        indptr = np.concatenate([[0], np.cumsum(mask.sum(1))])
        return cls._of(indptr, cols, np.asarray(values, dtype=np.float64)[rows, cols], np.ones(len(rows)), mask.shape)

    @classmethod
    def _of(cls, indptr, indices, targets, weights, shape) -> Cells:
        if np.any(np.asarray(weights) <= 0):
            raise ConfigError("Cells: every cell weight must be > 0")
        return cls(torch.as_tensor(np.asarray(indptr, dtype=np.int64)), torch.as_tensor(np.asarray(indices, np.int64)),
                   torch.as_tensor(np.asarray(targets, np.float64)), torch.as_tensor(np.asarray(weights, np.float64)),
                   (int(shape[0]), int(shape[1])))

    def row_ids(self) -> torch.Tensor:
        """(nnz,) the row of every cell."""
        return torch.repeat_interleave(torch.arange(self.shape[0], device=self.indptr.device), self.indptr.diff())

    def transpose(self) -> Cells:
        """The same cells by column (items x users)."""
        rows = self.row_ids()
        order = torch.argsort(self.indices * self.shape[0] + rows, stable=True)
        counts = torch.bincount(self.indices, minlength=self.shape[1])
        indptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return Cells(indptr, rows[order], self.targets[order], self.weights[order], self.shape[::-1])

    def plan(self, k: int) -> list[CellBatch]:
        """Padded batches of the rows with cells (see :func:`recsys.models.als.row_batches`)."""
        batches = row_batches(self.indptr.diff().cpu().numpy(), k)
        cpu = [t.cpu() for t in (self.indptr, self.indices)]
        targets, weights = (gather_plan(*cpu, v.cpu(), batches) for v in (self.targets, self.weights))
        device = self.indptr.device
        return [CellBatch(t.rows.to(device), t.cols.to(device), t.values.to(device), w.values.to(device))
                for t, w in zip(targets, weights)]

    def to(self, device) -> Cells:
        return Cells(*(t.to(device) for t in self[:4]), self.shape)


def sample_zero_cells(matrix: sp.spmatrix, samples: int, zero_weight: float, rng: np.random.Generator) -> Cells:
    """The positives of a 0/1 matrix (target 1, weight 1) plus ``samples`` zeros per positive (target 0,
    weight ``zero_weight``) for the positive's user: items drawn uniformly (never the OOV item 0), draws that
    hit one of the user's positives dropped; a zero drawn twice counts twice.

    Example:
        >>> m = sp.csr_matrix(np.array([[0, 1, 0, 0], [0, 0, 1, 1]]))
        >>> cells = sample_zero_cells(m, 2, 0.5, np.random.default_rng(0))
        >>> cells.targets.sum().item(), bool(cells.indices.min() >= 1)  # 3 positives; item 0 never drawn
        (3.0, True)
    """
    m = sp.csr_matrix(matrix)
    n_users, n_items = m.shape
    rows = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(m.indptr))
    positives = np.unique(rows * n_items + m.indices)
    drawn = np.repeat(positives // n_items, samples) * n_items + rng.integers(OOV + 1, n_items, len(positives) * samples)
    drawn = drawn[~np.isin(drawn, positives, assume_unique=False)]
    zeros, counts = np.unique(drawn, return_counts=True)
    keys = np.concatenate([positives, zeros])
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    targets = np.concatenate([np.ones(len(positives)), np.zeros(len(zeros))])[order]
    weights = np.concatenate([np.ones(len(positives)), zero_weight * counts])[order]
    indptr = np.searchsorted(keys, np.arange(n_users + 1) * n_items)
    return Cells._of(indptr, keys % n_items, targets, weights, (n_users, n_items))


def nbmf_loss(cells: Cells, users: torch.Tensor, codes: torch.Tensor, zero_weight: float,
              regularization: float) -> float:
    """The NBMF objective (module docstring) in float64, with the Gram trick for the zero-weighted cells.

    ``sum_cells c (t - s)^2 + w0 sum_other s^2 = w0 <W^T W, H H^T> + sum_cells [c (t - s)^2 - w0 s^2]``.

    Args:
        cells: the cells (n_users x n_items).
        users: (n_users, k) factors W.
        codes: (n_items, k) binary codes H^T (any dtype).
        zero_weight: weight w0 of every cell that is not in ``cells`` (>= 0).
        regularization: L2 weight on W.

    Example:
        >>> cells = Cells.from_dense(torch.tensor([[1.0, 0.0]]), torch.tensor([[1, 0]]))
        >>> nbmf_loss(cells, torch.tensor([[2.0]]), torch.tensor([[1], [1]]), zero_weight=0.5, regularization=0.1)
        3.4
    """
    w, h = users.double(), codes.to(users.device, torch.float64)
    total = zero_weight * float((w.T @ w * (h.T @ h)).sum()) if zero_weight else 0.0
    rows = cells.row_ids()
    observed = torch.zeros((), dtype=torch.float64, device=w.device)
    for lo in range(0, len(cells.indices), _LOSS_CHUNK):
        part = slice(lo, lo + _LOSS_CHUNK)
        s = (w[rows[part]] * h[cells.indices[part]]).sum(1)
        c, t = cells.weights[part], cells.targets[part]
        observed += (c * (t - s) ** 2 - zero_weight * s**2).sum()
    return total + float(observed) + regularization * float(w.pow(2).sum())


def _systems(batch: CellBatch, fixed: torch.Tensor, zero_weight: float,
             base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, b)`` of a batch: ``A = base + g^T diag(c - w0) g`` (B, k, k) and ``b = g^T (c t)`` (B, k), where
    ``g`` (B, L, k) gathers the fixed side's rows of the batch's cells."""
    g = fixed[batch.cols]
    coefficient = torch.where(batch.weights > 0, batch.weights - zero_weight, 0.0)
    a = torch.baddbmm(base.expand(len(batch.rows), -1, -1), (g * coefficient.unsqueeze(2)).transpose(1, 2), g)
    b = torch.bmm((batch.weights * batch.targets).unsqueeze(1), g).squeeze(1)
    return a, b


def nnls_descent(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, sweeps: int) -> torch.Tensor:
    """``sweeps`` sweeps of projected coordinate descent on ``min_{x >= 0} x^T A x - 2 b^T x``, batched; updates ``x``.

    Each coordinate step is the exact minimiser along that coordinate, clipped at 0, so every step
    lowers (or keeps) the objective; for positive definite ``A`` the iterates converge to the NNLS
    solution. Coordinates with ``A_jj = 0`` stay put.

    Args:
        a: (B, k, k) symmetric positive semi-definite matrices.
        b: (B, k) vectors.
        x: (B, k) start (clipped at 0), written in place.
        sweeps: passes over the k coordinates.

    Example:
        >>> a, b = torch.eye(2, dtype=torch.float64)[None], torch.tensor([[1.0, -1.0]], dtype=torch.float64)
        >>> nnls_descent(a, b, torch.zeros(1, 2, dtype=torch.float64), sweeps=1)
        tensor([[1., 0.]], dtype=torch.float64)
    """
    x.clamp_(min=0)
    diag = a.diagonal(dim1=1, dim2=2)
    inverse = torch.where(diag > 0, 1.0 / diag, 0.0)
    gradient = torch.bmm(a, x.unsqueeze(2)).squeeze(2) - b  # half the gradient, A x - b
    for _ in range(sweeps):
        for j in range(x.shape[1]):
            step = (x[:, j] - gradient[:, j] * inverse[:, j]).clamp_(min=0) - x[:, j]
            x[:, j] += step
            gradient.addcmul_(step.unsqueeze(1), a[:, :, j])
    return x


def solve_users(cells: Cells, codes: torch.Tensor, users: torch.Tensor, zero_weight: float, regularization: float,
                sweeps: int, plan: list[CellBatch] | None = None, progress: tqdm | None = None) -> torch.Tensor:
    """The W step: :func:`nnls_descent` on every user's system from the current ``users``; updates ``users``.

    Users without cells solve to zero (their part of the objective is ``w^T (w0 H H^T + lambda I) w >= 0``).

    Args:
        cells: the cells (n_users x n_items).
        codes: (n_items, k) binary codes H^T, float.
        users: (n_users, k) non-negative factors W, written in place (float64 recommended).
        zero_weight: weight w0 of the cells not in ``cells``.
        regularization: L2 weight on W.
        sweeps: coordinate-descent sweeps per user.
        plan: ``cells.plan(k)``, when already built.
        progress: optional tqdm updated once per batch.

    Example:
        >>> cells = Cells.from_dense(torch.tensor([[3.0, 1.0]]), torch.tensor([[1, 1]]))
        >>> h = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
        >>> solve_users(cells, h, torch.zeros(1, 1, dtype=torch.float64), 0.0, 0.0, sweeps=1)
        tensor([[2.]], dtype=torch.float64)
    """
    h = codes.to(users.dtype)
    k = h.shape[1]
    base = zero_weight * (h.T @ h) + regularization * torch.eye(k, dtype=h.dtype, device=h.device)
    users[cells.indptr[1:] == cells.indptr[:-1]] = 0
    for batch in plan if plan is not None else cells.plan(k):
        a, b = _systems(batch, h, zero_weight, base)
        users[batch.rows] = nnls_descent(a, b, users[batch.rows], sweeps)
        if progress is not None:
            progress.update()
    return users


def solve_items(cells_by_item: Cells, users: torch.Tensor, codes: torch.Tensor, zero_weight: float,
                method: str = "auto", annealing: Annealing | None = None, generator: torch.Generator | None = None,
                plan: list[CellBatch] | None = None, progress: tqdm | None = None) -> torch.Tensor:
    """The H step: every item's QUBO solved by :func:`solve_qubo` from its current code; returns new codes.

    Items without cells get code 0 when ``zero_weight > 0`` (their QUBO is ``w0 h^T W^T W h >= 0``) and keep
    their code otherwise (every code costs 0).

    Args:
        cells_by_item: the cells, transposed (n_items x n_users; :meth:`Cells.transpose`).
        users: (n_users, k) factors W; their dtype is the solve's dtype (float64 recommended).
        codes: (n_items, k) current binary codes.
        zero_weight: weight w0 of the cells not in the cells.
        method: binary solver (see :func:`solve_qubo`).
        annealing: annealing schedule.
        generator: seeded generator on ``users``' device (annealing).
        plan: ``cells_by_item.plan(k)``, when already built.
        progress: optional tqdm updated once per batch.

    Returns:
        (n_items, k) codes in ``users``' dtype, never of higher loss than ``codes``.

    Example:
        >>> cells = Cells.from_dense(torch.tensor([[1.0, 2.0]]), torch.tensor([[1, 1]]))  # 1 item x 2 users
        >>> w = torch.tensor([[1.0, 0.0], [2.0, 2.0]], dtype=torch.float64)
        >>> solve_items(cells, w, torch.zeros(1, 2), zero_weight=0.0)
        tensor([[1., 0.]], dtype=torch.float64)
    """
    k = users.shape[1]
    new = codes.to(users.dtype).clone()
    if zero_weight > 0:
        new[cells_by_item.indptr[1:] == cells_by_item.indptr[:-1]] = 0
    base = zero_weight * (users.T @ users)
    pending, size = [], 0
    batches = plan if plan is not None else cells_by_item.plan(k)
    for n, batch in enumerate(batches):
        q, b = _systems(batch, users, zero_weight, base)
        pending.append((batch.rows, q, -2.0 * b))
        size += len(batch.rows)
        if size * k * k >= QUBO_ELEMENTS or n == len(batches) - 1:  # solve many items at once: fewer, larger ops
            rows, q, c = (torch.cat(parts) for parts in zip(*pending))
            new[rows] = solve_qubo(q, c, new[rows], method, annealing, generator)
            pending, size = [], 0
        if progress is not None:
            progress.update()
    return new


class NBMF:
    """Non-negative x binary matrix factorization on implicit feedback; a ``Trainable`` (module docstring).

    One ``train_epoch`` is one alternation: the W step (NNLS per user), then the H step (a QUBO per
    item). Users are non-negative float32 factors; items are k-bit codes packed into ``ceil(k / 8)``
    bytes each, so the item side is itself a compressed table (``memory()``). Scores are ``w_u . h_i``.
    Index 0 (OOV) of users and items stays zero. Deterministic given ``trainer.seed``.

    Args:
        data: a prepared interactions dataset; ``data.matrix("train")`` gives the positives.
        trainer: loop settings; ``trainer.seed`` seeds the initial factors, the sampled zeros and annealing.
        factors: number of bits / factors k (>= 1).
        regularization: L2 weight on W (>= 0).
        zeros: ``"weighted"`` (every unobserved cell is a zero of weight ``zero_weight``) or ``"sampled"``
            (``zero_samples`` zeros of weight ``zero_weight`` per positive, resampled every epoch).
        zero_weight: weight of a zero cell, relative to a positive's 1 (> 0).
        zero_samples: sampled zeros per positive (>= 1), for ``zeros="sampled"``.
        binary_solver: ``"auto"`` (enumeration for k <= 12, else annealing then greedy descent),
            ``"enumerate"`` (k <= 20), ``"anneal"`` or ``"greedy"``.
        annealing: ``{sweeps, t_start, t_end}`` of :class:`~recsys.models.binary_solvers.Annealing`.
        nnls_sweeps: coordinate-descent sweeps per user and W step (>= 1), warm-started.
        init_density: probability of a 1 bit in the initial codes (in (0, 1]).
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``: where the solves run.

    Example:
        >>> model = NBMF(PreparedData.open("data/prepared/ml100k"), TrainerConfig(epochs=10))  # doctest: +SKIP
        >>> model.train_epoch(0, None)["loss"]  # doctest: +SKIP
        >>> model.memory()  # doctest: +SKIP
        {'user': 120704, 'item': 5792}
    """

    def __init__(self, data: PreparedData, trainer: TrainerConfig, factors: int = 32, regularization: float = 5.0,
                 zeros: str = "weighted", zero_weight: float = 0.2, zero_samples: int = 4,
                 binary_solver: str = "auto", annealing: dict | Annealing | None = None, nnls_sweeps: int = 5,
                 init_density: float = 0.5, device: str = "auto"):
        check(is_int(factors), "factors", factors, "an integer >= 1")
        check(is_number(regularization) and regularization >= 0, "regularization", regularization,
              "a finite number >= 0")
        check(zeros in ZEROS, "zeros", zeros, f"one of {list(ZEROS)}")
        check(is_number(zero_weight) and zero_weight > 0, "zero_weight", zero_weight, "a finite number > 0")
        check(is_int(zero_samples), "zero_samples", zero_samples, "an integer >= 1")
        check(binary_solver in METHODS, "binary_solver", binary_solver, f"one of {list(METHODS)}")
        check(binary_solver != "enumerate" or factors <= MAX_ENUMERATION_BITS, "binary_solver", binary_solver,
              f"'enumerate' only for factors <= {MAX_ENUMERATION_BITS} (2^factors codes per item); use 'auto'")
        check(annealing is None or isinstance(annealing, Annealing)
              or (isinstance(annealing, dict) and set(annealing) <= {"sweeps", "t_start", "t_end"}),
              "annealing", annealing, "a mapping of sweeps, t_start, t_end")
        check(is_int(nnls_sweeps), "nnls_sweeps", nnls_sweeps, "an integer >= 1")
        check(is_number(init_density) and 0 < init_density <= 1, "init_density", init_density, "a number in (0, 1]")
        check(device in DEVICES, "device", device, f"one of {list(DEVICES)}")
        check(device != "cuda" or torch.cuda.is_available(), "device", device, "'cpu' or 'auto': CUDA is not available")
        if data.kind != "interactions":
            raise ConfigError(f"NBMF needs an interactions dataset; {data.root} holds {data.kind!r}")
        self.data, self.trainer = data, trainer
        self.factors, self.regularization = int(factors), float(regularization)
        self.zeros, self.zero_weight, self.zero_samples = zeros, float(zero_weight), int(zero_samples)
        self.binary_solver, self.nnls_sweeps = binary_solver, int(nnls_sweeps)
        self.annealing = annealing if isinstance(annealing, Annealing) else Annealing(**(annealing or {}))
        self.device = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available())
                                   else "cpu")
        self._train = sp.csr_matrix(data.matrix("train"))
        self._cells = self._cells_by_item = self._plans = None
        if zeros == "weighted":
            self._set_cells(Cells.from_sparse(self._train).to(self.device))
        generator = torch.Generator().manual_seed(trainer.seed)
        n_users, n_items = self._train.shape
        self.user_factors = torch.rand(n_users, self.factors, generator=generator, dtype=torch.float64).float()
        codes = torch.rand(n_items, self.factors, generator=generator, dtype=torch.float64) < init_density
        self.user_factors[OOV] = 0
        codes[OOV] = False
        self.item_codes = pack_codes(codes)
        self._item_matrix: torch.Tensor | None = None  # unpacked float32 codes for scoring, rebuilt when stale

    def _set_cells(self, cells: Cells) -> None:
        self._cells, self._cells_by_item = cells, cells.transpose()
        self._plans = (cells.plan(self.factors), self._cells_by_item.plan(self.factors))

    def train_epoch(self, epoch: int, progress: tqdm | None) -> dict[str, float]:
        """One alternation (W step, then H step); returns ``{"loss": objective / n_users, "codes_changed":
        fraction of items whose code changed}`` (the objective over this epoch's cells)."""
        seed = self.trainer.epoch_seed(epoch)
        if self.zeros == "sampled":
            self._set_cells(sample_zero_cells(self._train, self.zero_samples, self.zero_weight,
                                              np.random.default_rng(seed)).to(self.device))
        user_plan, item_plan = self._plans
        if progress is not None:
            progress.reset(total=len(user_plan) + len(item_plan))
        users = self.user_factors.to(self.device, torch.float64)
        codes = unpack_codes(self.item_codes.to(self.device), self.factors, torch.float64)
        solve_users(self._cells, codes, users, self.zero_weight, self.regularization, self.nnls_sweeps,
                    plan=user_plan, progress=progress)
        users[OOV] = 0
        users = users.float().double()  # the stored float32 W: the H step then decides on the loss that is reported
        generator = torch.Generator(device=self.device).manual_seed(seed)
        new = solve_items(self._cells_by_item, users, codes, self.zero_weight, self.binary_solver, self.annealing,
                          generator, plan=item_plan, progress=progress)
        new[OOV] = 0
        changed = float((new != codes).any(1).double().mean())
        self.user_factors.copy_(users.float().cpu())
        self.item_codes.copy_(pack_codes(new).cpu())
        self._item_matrix = None
        loss = nbmf_loss(self._cells, self.user_factors.to(self.device), new, self.zero_weight,
                         self.regularization) / self._train.shape[0]
        if progress is not None:
            progress.set_postfix(loss=f"{loss:.4f}")
        return {"loss": loss, "codes_changed": changed}

    @torch.no_grad()
    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        """(B,) user indices -> (B, n_items) float32 scores ``w_u . h_i``."""
        if self._item_matrix is None:
            self._item_matrix = unpack_codes(self.item_codes, self.factors, torch.float32)
        return self.user_factors[users.long().cpu()] @ self._item_matrix.T

    def state(self) -> dict:
        return {"user_factors": self.user_factors, "item_codes": self.item_codes}

    def load_state(self, state: dict) -> None:
        for name in ("user_factors", "item_codes"):
            target, value = getattr(self, name), state[name]
            if value is not target:
                target.copy_(value)
        self._item_matrix = None

    def export(self) -> tuple[str, dict, dict[str, torch.Tensor]]:
        """Family, build arguments and tensors of a model package (see ``recsys.inference``)."""
        return FAMILY, {"factors": self.factors}, {f"model.{k}": v for k, v in self.state().items()}

    def memory(self) -> dict[str, int]:
        """``{"user": bytes of W (float32), "item": bytes of the packed codes (ceil(k / 8) per item)}``."""
        return {"user": tensor_bytes(self.user_factors), "item": tensor_bytes(self.item_codes)}
