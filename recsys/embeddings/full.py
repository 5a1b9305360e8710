"""The uncompressed table: identity transform, one plain table, no combiner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from recsys.embeddings.base import Compression, Method, PlainTable
from recsys.embeddings.spec import TableSpec, TableStats


class FullTable(Method):
    """N x D rows, looked up directly.

    Args:
        spec: the logical table.

    Example:
        >>> m = FullTable(TableSpec("item", 10, 4, ("item",)))
        >>> [t.rows for t in m.plain_tables()], m.transform(torch.tensor([3]))[0].tolist()
        ([10], [3])
    """

    additive = True

    def plain_tables(self) -> list[PlainTable]:
        return [PlainTable("full", self.spec.num_embeddings, self.spec.dim)]

    def transform(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return [ids]

    def combine(self, parts: list[torch.Tensor], ids: torch.Tensor | None) -> torch.Tensor:
        return parts[0]

    def stream_queries(self, queries: torch.Tensor) -> list[torch.Tensor]:
        return [queries]

    def item_scores(self, queries: torch.Tensor, weights: list[torch.Tensor], chunk: int = 65536
                    ) -> Iterator[tuple[int, torch.Tensor]]:
        """The rows are the vectors: each chunk is one product with a slice of the table (no gather)."""
        for start in range(0, self.spec.num_embeddings, chunk):
            yield start, queries @ weights[0][start:start + chunk].T


@dataclass
class Full(Compression):
    """No compression (``embedding=full``)."""

    def build(self, spec: TableSpec, stats: TableStats | None = None) -> FullTable:
        return FullTable(spec)
