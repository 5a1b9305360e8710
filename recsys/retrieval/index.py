"""A FAISS inner-product index over item vectors: top-N items per query vector."""

from __future__ import annotations

import faiss
import numpy as np

from recsys.errors import ConfigError


class ItemIndex:
    """Inner-product search over item vectors with FAISS (exact ``IndexFlatIP`` by default).

    Shape letters: N indexed items, D dimension, Q queries.

    Args:
        vectors: (N, D) item vectors (numpy or a CPU torch tensor).
        ids: (N,) the item id of each row; None = row numbers 0..N-1. Leave out items that must
            never be returned (e.g. the OOV index) by not indexing them.
        factory: a FAISS ``index_factory`` string with inner-product metric: ``Flat`` (exact), or an
            approximate index such as ``HNSW32`` or ``IVF64,Flat`` (trained on ``vectors``).

    Example:
        >>> index = ItemIndex(np.eye(3, dtype=np.float32), ids=np.array([10, 11, 12]))
        >>> index.search(np.array([[0.0, 2.0, 1.0]]), 2)
        (array([[2., 1.]], dtype=float32), array([[11, 12]]))
    """

    def __init__(self, vectors, ids: np.ndarray | None = None, factory: str = "Flat"):
        vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ConfigError(f"ItemIndex needs (N, D) item vectors with N >= 1, got shape {vectors.shape}")
        self.ids = np.arange(len(vectors)) if ids is None else np.asarray(ids, dtype=np.int64)
        if self.ids.shape != (len(vectors),):
            raise ConfigError(f"ItemIndex: ids have shape {self.ids.shape}, expected ({len(vectors)},) as the vectors")
        try:
            self.index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as error:
            raise ConfigError(f"ItemIndex: factory={factory!r} is not a FAISS index_factory string: {error}") from error
        if not self.index.is_trained:
            self.index.train(vectors)
        self.index.add(vectors)
        self.vectors = vectors

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """(...,) item ids -> (..., D) their indexed vectors; zeros for -1 and for ids not in the index."""
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(self.ids, kind="stable")
        position = np.clip(np.searchsorted(self.ids, ids, sorter=order), 0, len(order) - 1)
        rows = order[position]
        found = (self.ids[rows] == ids) & (ids >= 0)
        return np.where(found[..., None], self.vectors[rows], 0.0).astype(np.float32)

    def search(self, queries, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) queries -> (scores, ids), each (Q, min(n, N)), best first; ids -1 and scores -inf
        where an approximate index found fewer items."""
        queries = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ConfigError(f"ItemIndex.search: queries have shape {queries.shape}, expected (Q, {self.dim})")
        if n < 1:
            raise ConfigError(f"ItemIndex.search: n={n} is invalid: expected an integer >= 1")
        scores, rows = self.index.search(queries, min(n, len(self)))
        found = rows >= 0
        return np.where(found, scores, -np.inf).astype(np.float32), np.where(found, self.ids[rows], -1)
