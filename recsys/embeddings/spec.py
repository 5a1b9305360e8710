"""Table specs: what a logical embedding table is, independent of how it is stored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from recsys.errors import ConfigError

Pooling = Literal["sum", "mean", "none"]


@dataclass(frozen=True)
class TableSpec:
    """A logical table of ``num_embeddings`` rows of dimension D, read by one or more features.

    Args:
        name: table name (unique within a collection).
        num_embeddings: rows N of the logical table (the vocabulary size, OOV included).
        dim: output dimension D of every lookup.
        feature_names: the KeyedJaggedTensor keys that read this table.
        pooling: ``sum`` or ``mean`` pool each bag to one (B, D) vector; ``none`` returns one
            vector per id (sequence models).
        compression: how the table is stored (a ``Compression`` config; None = full table).

    Example:
        >>> TableSpec("item", 1000, 32, ("item", "neg_item")).feature_names
        ('item', 'neg_item')
    """

    name: str
    num_embeddings: int
    dim: int
    feature_names: tuple[str, ...]
    pooling: Pooling = "sum"
    compression: Any = None

    def __post_init__(self):
        if not self.name or "__" in self.name:
            raise ConfigError(f"table name must be non-empty and contain no '__', got {self.name!r}")
        if self.num_embeddings < 1 or self.dim < 1:
            raise ConfigError(f"table '{self.name}': num_embeddings and dim must be >= 1, got "
                              f"{self.num_embeddings} and {self.dim}")
        if not self.feature_names:
            raise ConfigError(f"table '{self.name}': feature_names is empty")
        if self.pooling not in ("sum", "mean", "none"):
            raise ConfigError(f"table '{self.name}': pooling must be sum, mean or none, got {self.pooling!r}")

    @property
    def full_bytes(self) -> int:
        """Bytes of the uncompressed float32 table (the reference of memory budgets)."""
        return self.num_embeddings * self.dim * 4


@dataclass(frozen=True)
class InteractionGraph:
    """Training interactions as a bipartite graph: one (user, item) index pair per edge.

    Args:
        users: (E,) user index of each edge.
        items: (E,) item index of each edge.
        n_users: user vocabulary size.
        n_items: item vocabulary size.
    """

    users: np.ndarray
    items: np.ndarray
    n_users: int
    n_items: int


@dataclass
class TableStats:
    """What prepare knows about a table's ids, for methods that use it.

    Args:
        counts: (N,) training frequency of each id (index 0 = OOV), or None.
        clusters: (N,) cluster id of each id from a graph clustering (GraphHash), or None.
        graph: the training interaction graph, for methods that cluster it (GraphHash).
        side: which side of ``graph`` this table indexes: ``user`` or ``item``.
    """

    counts: np.ndarray | None = None
    clusters: np.ndarray | None = None
    graph: InteractionGraph | None = None
    side: Literal["user", "item"] | None = None
