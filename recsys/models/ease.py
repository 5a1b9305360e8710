"""EASE (Steck 2019, "Embarrassingly Shallow Autoencoders for Sparse Data"): a closed-form item-item model.

With ``X`` the (users, items) 0/1 training matrix and ``lambda`` the regularization, the weights are

    G = X^T X + lambda I,    P = G^-1,    B_ij = -P_ij / P_jj  (so diag(B) = 0)

and user ``u``'s scores are ``x_u B``. :func:`gram` forms ``X^T X`` from the sparse matrix, a block of
rows at a time, into one dense (m, m) buffer; :func:`ease_weights` turns that buffer into ``B`` in place
(Cholesky factorisation and ``cholesky_inverse`` on its column-major view, which LAPACK overwrites
without a second buffer), so the solve's peak is one m x m matrix. The compressed variant stores only
the largest-magnitude entries of ``B`` (:func:`top_k_columns` per column, :func:`largest_entries`
globally) as a CSC matrix.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from recsys.data.dataset import PreparedData
from recsys.embeddings.memory import narrowest_int_dtype, tensor_bytes
from recsys.errors import ConfigError
from recsys.models.settings import check, is_int, is_number
from recsys.training.loop import TrainerConfig

BLOCK_ELEMENTS = 1 << 22  # elements of one block of rows handled at once (Gram products, pruning)
_DTYPES = {"float32": torch.float32, "float64": torch.float64}

FAMILY = "ease"  # the family name of its model packages


def available_memory() -> int:
    """Bytes the kernel reports as available (``MemAvailable`` of /proc/meminfo, else free pages)."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _row_blocks(n_rows: int, n_cols: int) -> list[slice]:
    """Consecutive slices of rows holding about BLOCK_ELEMENTS elements each."""
    step = max(1, BLOCK_ELEMENTS // max(n_cols, 1))
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def _csr(indptr, indices, values, shape) -> torch.Tensor:
    """A torch CSR tensor from arrays the model built (so they hold CSR's invariants)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        return torch.sparse_csr_tensor(torch.as_tensor(indptr, dtype=torch.int64),
                                       torch.as_tensor(indices, dtype=torch.int64), torch.as_tensor(values), shape,
                                       check_invariants=False)


def gram(matrix: sp.csr_matrix, out: torch.Tensor) -> torch.Tensor:
    """Writes the dense ``X^T X`` of a sparse (n_users, m) matrix into ``out`` (m, m), a block of rows at a time.

    Only one block of the sparse product exists at once; no dense (n_users, m) matrix is formed.

    Example:
        >>> gram(sp.csr_matrix(np.array([[1.0, 1.0], [0.0, 1.0]])), torch.empty(2, 2, dtype=torch.float64))
        tensor([[1., 1.],
                [1., 2.]], dtype=torch.float64)
    """
    target = out.numpy()
    x = sp.csr_matrix(matrix, dtype=target.dtype)
    xt = x.T.tocsr()
    for rows in _row_blocks(*target.shape):
        target[rows] = 0  # toarray(out=...) adds into the buffer
        (xt[rows] @ x).toarray(out=target[rows])
    return out


def ease_weights(gram_matrix: torch.Tensor, regularization: float, transpose: bool = False) -> torch.Tensor:
    """Overwrites ``X^T X`` (m, m) with EASE's ``B`` (``B^T`` when ``transpose``) and returns it.

    ``P = (X^T X + lambda I)^-1`` is symmetric, so ``B = P diag(-1 / diag(P))`` scales its columns and
    ``B^T`` its rows; either way ``diag(B) = 0``.

    Args:
        gram_matrix: (m, m) float32 or float64 ``X^T X``; overwritten.
        regularization: lambda > 0.
        transpose: write ``B^T`` (row j holds column j of ``B``).

    Raises:
        ConfigError: ``X^T X + lambda I`` is not numerically positive definite in this dtype.

    Example:
        >>> ease_weights(torch.tensor([[2.0, 1.0], [1.0, 2.0]]), regularization=1.0)
        tensor([[0.0000, 0.3333],
                [0.3333, 0.0000]])
    """
    w = gram_matrix
    w.diagonal().add_(regularization)
    info = torch.empty((), dtype=torch.int32)
    column_major = w.T  # the symmetric matrix itself, laid out as LAPACK works in place
    torch.linalg.cholesky_ex(column_major, out=(column_major, info))
    if info.item() != 0:
        raise ConfigError(f"EASE: X^T X + {regularization} I is not positive definite in {w.dtype} (Cholesky "
                          f"failed at column {info.item()}); raise model.regularization or set model.dtype=float64")
    torch.cholesky_inverse(column_major, out=column_major)
    scale = w.diagonal().reciprocal().neg_()
    w.mul_(scale[:, None] if transpose else scale[None, :])
    w.diagonal().zero_()
    return w


def top_k_columns(bt: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor,
                  indptr: torch.Tensor) -> None:
    """The ``k`` largest-magnitude entries of every column of ``B``, as CSC arrays written in place.

    Args:
        bt: (m, m) ``B^T`` (row j is column j of ``B``).
        k: entries kept per column, ``1 <= k <= m``.
        values: (m * k,) kept values, column by column, rows ascending within a column.
        indices: (m * k,) their row indices.
        indptr: (m + 1,) column pointers ``j * k``.
    """
    for columns in _row_blocks(*bt.shape):
        block = bt[columns]
        rows = block.abs().topk(k, dim=1).indices.sort(dim=1).values
        span = slice(columns.start * k, columns.stop * k)
        values[span] = block.gather(1, rows).reshape(-1)
        indices[span] = rows.reshape(-1).to(indices.dtype)
    indptr.copy_(torch.arange(bt.shape[0] + 1) * k)


def largest_entries(bt: torch.Tensor, nnz: int, values: torch.Tensor, indices: torch.Tensor,
                    indptr: torch.Tensor) -> None:
    """The ``nnz`` largest-magnitude entries of ``B`` (a global threshold), as CSC arrays written in place.

    The threshold is the nnz-th largest ``|B_ij|`` (an in-place partition of one (m, m) copy of the
    magnitudes); entries tied with it are taken in column-major order until ``nnz`` are kept.

    Args:
        bt: (m, m) ``B^T`` (row j is column j of ``B``).
        nnz: entries kept, ``1 <= nnz <= m * m``.
        values: (nnz,) kept values, column by column, rows ascending within a column.
        indices: (nnz,) their row indices.
        indptr: (m + 1,) column pointers.
    """
    flat = bt.abs().numpy().reshape(-1)
    cut = flat.size - nnz
    flat.partition(cut)
    threshold = flat[cut].item()
    ties = nnz - int((flat[cut:] > threshold).sum())
    del flat
    position = 0
    indptr[0] = 0
    for columns in _row_blocks(*bt.shape):
        block = bt[columns]
        magnitude = block.abs()
        keep = magnitude > threshold
        if ties > 0:
            tied = torch.nonzero((magnitude == threshold).view(-1)).squeeze(1)[:ties]
            keep.view(-1)[tied] = True
            ties -= len(tied)
        counts = keep.sum(dim=1)
        indptr[columns.start + 1:columns.stop + 1] = position + counts.cumsum(0)
        taken = int(counts.sum())
        values[position:position + taken] = block[keep]
        indices[position:position + taken] = keep.nonzero()[:, 1].to(indices.dtype)
        position += taken


class EASE:
    """EASE item-item model on the training split, fitted in closed form on the first epoch.

    Items enter the model (the m "kept" items) if they have training interactions, the ``max_items``
    most popular of them when it is set; the OOV index 0 never does. Every other item scores strictly
    below all kept items of the same user (the user's lowest kept score minus one).

    ``B`` is stored dense (m, m), or pruned as a CSC matrix: ``prune_top_k`` keeps the k largest-magnitude
    entries of each column; ``prune_budget`` keeps the largest-magnitude entries overall, as many as fit in
    that fraction of the dense ``B``'s bytes (values, row indices in the narrowest integer dtype, column
    pointers). Before allocating, the model checks that its m x m buffers fit in memory.

    Args:
        data: a prepared interactions dataset.
        trainer: the loop settings (one epoch fits; later epochs keep the fit).
        regularization: lambda > 0, added to the diagonal of ``X^T X``.
        dtype: ``"float32"`` or ``"float64"``: the solve's and the stored weights' dtype.
        max_items: keep only this many of the most popular training items (None: all with interactions).
        prune_top_k: store the k largest-magnitude entries of every column of ``B``.
        prune_budget: store the largest-magnitude entries of ``B`` within this fraction of the dense bytes.
        memory_limit: bytes the fit may use (None: the kernel's ``MemAvailable``).

    Example:
        >>> model = EASE(PreparedData.open("data/prepared/ml100k"), TrainerConfig(epochs=1))  # doctest: +SKIP
        >>> model.train_epoch(0, None)                                                       # doctest: +SKIP
        {'fit_seconds': 0.09, 'b_nonzeros': 1964202.0}
        >>> model.score_users(torch.tensor([1, 2])).shape                                     # doctest: +SKIP
        torch.Size([2, 1448])
    """

    def __init__(self, data: PreparedData, trainer: TrainerConfig, regularization: float = 500.0,
                 dtype: str = "float32", max_items: int | None = None, prune_top_k: int | None = None,
                 prune_budget: float | None = None, memory_limit: int | float | None = None):
        check(is_number(regularization) and regularization > 0, "regularization", regularization,
              "a finite number > 0")
        check(dtype in _DTYPES, "dtype", dtype, f"one of {sorted(_DTYPES)}")
        check(max_items is None or is_int(max_items), "max_items", max_items, "null or an integer >= 1")
        check(prune_top_k is None or is_int(prune_top_k), "prune_top_k", prune_top_k, "null or an integer >= 1")
        check(prune_budget is None or (is_number(prune_budget) and 0 < prune_budget <= 1), "prune_budget",
              prune_budget, "null or a fraction in (0, 1]")
        check(prune_top_k is None or prune_budget is None, "prune_budget", prune_budget,
              f"null when model.prune_top_k is set (got prune_top_k={prune_top_k}); choose one")
        check(memory_limit is None or (is_number(memory_limit) and memory_limit > 0), "memory_limit", memory_limit,
              "null or a number of bytes > 0")
        if data.kind != "interactions":
            raise ConfigError(f"EASE needs an interactions dataset; {data.root} holds {data.kind!r}")
        self.data, self.trainer = data, trainer
        self.regularization, self.dtype, self._numpy_dtype = float(regularization), _DTYPES[dtype], np.dtype(dtype)
        self.prune_top_k, self.prune_budget = prune_top_k, prune_budget

        train = sp.csr_matrix(data.matrix("train"))
        counts = np.asarray((train > 0).sum(axis=0)).ravel()
        counts[0] = 0  # OOV
        popular = np.argsort(-counts, kind="stable")[:int((counts > 0).sum())]
        if len(popular) == 0:
            raise ConfigError(f"EASE: the training split of {data.root} has no interactions")
        kept = np.sort(popular[:max_items])
        m = len(kept)
        check(prune_top_k is None or prune_top_k <= m, "prune_top_k", prune_top_k,
              f"at most the number of items in the model ({m})")
        self._nnz = self._pruned_nonzeros(m)
        check(self._nnz is None or self._nnz >= 1, "prune_budget", prune_budget,
              f"a budget that holds at least one entry of the {m} x {m} item-item matrix")
        self._check_memory(m, len(popular), memory_limit)

        self._x = sp.csr_matrix(train[:, kept], dtype=self._numpy_dtype)  # the users' rows, kept items only
        self._kept = torch.from_numpy(kept.astype(np.int64))
        self.items = self._kept.to(narrowest_int_dtype(data.n_items))  # model column -> item index
        if self._nnz is None:
            self.item_item = torch.zeros(m, m, dtype=self.dtype)  # B; the fit's workspace too
        else:
            self.values = torch.zeros(self._nnz, dtype=self.dtype)
            self.indices = torch.zeros(self._nnz, dtype=narrowest_int_dtype(m))
            self.indptr = torch.zeros(m + 1, dtype=narrowest_int_dtype(self._nnz + 1))
        self.fitted = torch.zeros((), dtype=torch.bool)
        self.fit_seconds = torch.zeros((), dtype=torch.float64)
        self.b_nonzeros = torch.zeros((), dtype=torch.int64)
        self._bt = None  # the pruned B^T as a torch CSR tensor, built for scoring

    def _pruned_nonzeros(self, m: int) -> int | None:
        """Entries the pruned B stores (None: dense)."""
        if self.prune_top_k is not None:
            return m * self.prune_top_k
        if self.prune_budget is None:
            return None
        item, index = self.dtype.itemsize, narrowest_int_dtype(m).itemsize
        for pointer in (1, 2, 4, 8):  # the narrowest column-pointer dtype that holds the resulting count
            nnz = min(m * m, math.floor((self.prune_budget * m * m * item - (m + 1) * pointer) / (item + index)))
            if narrowest_int_dtype(nnz + 1).itemsize <= pointer:
                break
        return nnz

    def _peak_bytes(self, m: int) -> int:
        """Bytes of the fit's m x m buffers at its peak plus the pruned B."""
        nnz = self._pruned_nonzeros(m)
        if nnz is None:
            return m * m * self.dtype.itemsize  # B, solved in place
        buffers = 2 if self.prune_budget is not None else 1  # the partition works on a copy of |B|
        nnz = max(nnz, 0)
        stored = (nnz * (self.dtype.itemsize + narrowest_int_dtype(m).itemsize)
                  + (m + 1) * narrowest_int_dtype(nnz + 1).itemsize)
        return buffers * m * m * self.dtype.itemsize + stored

    def _check_memory(self, m: int, with_interactions: int, memory_limit: int | float | None) -> None:
        available = int(memory_limit) if memory_limit is not None else available_memory()
        needed = self._peak_bytes(m)
        if needed <= available:
            return
        low, high = 0, m  # the largest number of items whose peak fits
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if self._peak_bytes(mid) <= available else (low, mid - 1)
        source = "model.memory_limit" if memory_limit is not None else "MemAvailable"
        raise ConfigError(
            f"EASE on {m} items (of {with_interactions} with training interactions) needs {needed} bytes for its "
            f"{m} x {m} {str(self.dtype).removeprefix('torch.')} item-item matrices, but {available} bytes are "
            f"available ({source}); {low} items would fit: set model.max_items={low} (or fewer) to keep the most "
            "popular items, or raise data.filters.min_item_count")

    def train_epoch(self, epoch: int, progress: tqdm | None) -> dict[str, float]:
        """Fits ``B`` on the first call (later calls keep it); returns ``fit_seconds`` and ``b_nonzeros``."""
        if not bool(self.fitted):
            self._fit(progress)
        return {"fit_seconds": float(self.fit_seconds), "b_nonzeros": float(self.b_nonzeros)}

    def _fit(self, progress: tqdm | None) -> None:
        began = time.perf_counter()
        if progress is not None:
            progress.reset(total=3)
        advance = progress.update if progress is not None else lambda: None
        m = len(self._kept)
        dense = self._nnz is None
        w = self.item_item if dense else torch.empty(m, m, dtype=self.dtype)
        gram(self._x, w)
        advance()
        ease_weights(w, self.regularization, transpose=not dense)
        advance()
        if dense:
            self.b_nonzeros.fill_(torch.count_nonzero(w))
        else:
            prune = top_k_columns if self.prune_top_k is not None else largest_entries
            prune(w, self.prune_top_k or self._nnz, self.values, self.indices, self.indptr)
            self.b_nonzeros.fill_(torch.count_nonzero(self.values))
            self._bt = None
        advance()
        self.fit_seconds.fill_(time.perf_counter() - began)
        self.fitted.fill_(True)

    @torch.no_grad()
    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        """(B,) user indices -> (B, n_items) float32 scores ``x_u B``; items outside the model score lower."""
        rows = self._x[users.long().numpy()]
        if self._nnz is None:
            kept = _csr(rows.indptr, rows.indices, rows.data, rows.shape) @ self.item_item
        else:
            if self._bt is None:
                m, nnz = len(self._kept), int(self.indptr[-1])  # nnz < len(values) only before the fit
                self._bt = _csr(self.indptr, self.indices[:nnz], self.values[:nnz], (m, m))
            kept = (self._bt @ torch.from_numpy(rows.T.toarray())).T
        kept = kept.float()
        scores = (kept.min(dim=1, keepdim=True).values - 1).expand(len(users), self.data.n_items).contiguous()
        return scores.index_copy_(1, self._kept, kept)

    def state(self) -> dict:
        weights = {"item_item": self.item_item} if self._nnz is None else {
            "values": self.values, "indices": self.indices, "indptr": self.indptr}
        return {**weights, "items": self.items, "fitted": self.fitted, "fit_seconds": self.fit_seconds,
                "b_nonzeros": self.b_nonzeros}

    def load_state(self, state: dict) -> None:
        for name, target in self.state().items():
            if state[name] is not target:
                target.copy_(state[name])
        self._bt = None

    def export(self) -> tuple[str, dict, dict[str, torch.Tensor]]:
        """Family, build arguments and tensors of a model package (see ``recsys.inference``): B dense, or its
        pruned CSR parts (values, row indices, column pointers), and the kept items' id map."""
        if not bool(self.fitted):
            raise ConfigError("EASE is not fitted yet: train at least one epoch before exporting it")
        if self._nnz is None:
            weights = {"item_item": self.item_item}
        else:
            nnz = int(self.indptr[-1])
            weights = {"values": self.values[:nnz], "indices": self.indices[:nnz], "indptr": self.indptr}
        return FAMILY, {"n_items": self.data.n_items}, {f"model.{k}": v for k, v in {**weights, "items": self.items}.items()}

    def memory_parts(self) -> dict[str, int]:
        """Bytes of every stored tensor of ``B``: ``item_item/<part>``, with the kept items' id map."""
        names = ("item_item",) if self._nnz is None else ("values", "indices", "indptr")
        return {f"item_item/{name}": tensor_bytes(getattr(self, name)) for name in (*names, "items")}

    def memory(self) -> dict[str, int]:
        return {"item_item": sum(self.memory_parts().values())}
