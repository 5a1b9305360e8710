"""GraphHash (Wu et al., 2024): ids share rows by clusters of the user-item interaction graph."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recsys.embeddings.base import Compression, Method, PlainTable
from recsys.embeddings.memory import narrowest_int_dtype
from recsys.embeddings.spec import TableSpec, TableStats
from recsys.errors import ConfigError


class GraphHashTable(Method):
    """One row per cluster; an id reads its cluster's row.

    Args:
        spec: the logical table.
        clusters: (N,) cluster id of each id, 0..C-1.

    Example:
        >>> m = GraphHashTable(TableSpec("item", 4, 2, ("item",)), np.array([0, 1, 1, 0]))
        >>> m.transform(torch.tensor([2, 3]))[0].tolist(), m.plain_tables()[0].rows
        ([1, 0], 2)
    """

    additive = True

    def __init__(self, spec: TableSpec, clusters: np.ndarray):
        super().__init__(spec)
        if len(clusters) != spec.num_embeddings:
            raise ConfigError(f"table '{spec.name}': {len(clusters)} cluster ids for {spec.num_embeddings} rows")
        self.rows = int(clusters.max()) + 1
        self.register_buffer("cluster_of", torch.as_tensor(clusters).to(narrowest_int_dtype(self.rows)))

    def plain_tables(self) -> list[PlainTable]:
        return [PlainTable("clusters", self.rows, self.spec.dim)]

    def transform(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return [self.cluster_of[ids].long()]

    def rebuild_stats(self) -> dict[str, torch.Tensor]:
        return {"clusters": self.cluster_of}  # a package rebuilds the table without the graph or a clustering

    def combine(self, parts: list[torch.Tensor], ids: torch.Tensor | None) -> torch.Tensor:
        return parts[0]

    def stream_queries(self, queries: torch.Tensor) -> list[torch.Tensor]:
        return [queries]


@dataclass
class GraphHash(Compression):
    """Rows shared by Leiden clusters of the training graph (``embedding=graph_hash``).

    Args:
        budget: fraction of the full table's bytes; the clustering resolution is searched so the
            number of clusters (rows) fits it.
        rows: explicit number of clusters to aim for (used when budget is None).
        seed: seed of the clustering.

    Clusters come from ``TableStats.clusters`` when prepare computed them (``data.graph_clusters``;
    beyond the budget's rows the smallest clusters share one), else from clustering
    ``TableStats.graph`` here at the resolution that fits the budget.
    """

    budget: float | None = 0.25
    rows: int | None = None
    seed: int = 0

    def build(self, spec: TableSpec, stats: TableStats | None = None) -> GraphHashTable:
        from recsys.data.graph import clusters_near, fold_clusters

        if self.budget is None and self.rows is None:
            raise ConfigError("GraphHash needs budget or rows")
        target = self.rows
        if self.budget is not None:  # rows x D floats plus the N-entry cluster map fit the budget
            id_map = spec.num_embeddings * torch.iinfo(narrowest_int_dtype(spec.num_embeddings)).bits // 8
            target = int((self.budget * spec.full_bytes - id_map) // (spec.dim * 4))
        if target < 1:
            raise ConfigError(f"GraphHash budget {self.budget} leaves no row for table '{spec.name}'")
        if stats is not None and stats.clusters is not None:  # given: kept when they fit, else the smallest share
            clusters = np.array(stats.clusters)  # a writable copy (package tensors are read-only)
            fits = len(clusters) and clusters.min() == 0 and len(np.unique(clusters)) == clusters.max() + 1 <= target
            return GraphHashTable(spec, clusters if fits else fold_clusters(clusters, target))
        if stats is None or stats.graph is None or stats.side is None:
            raise ConfigError(f"GraphHash on table '{spec.name}' needs the training graph or precomputed clusters "
                              "(TableStats.graph and side, or TableStats.clusters): it clusters a user-item interaction "
                              "graph, which CTR fields do not have; choose another compression method")
        return GraphHashTable(spec, clusters_near(stats.graph, stats.side, target, self.seed))
