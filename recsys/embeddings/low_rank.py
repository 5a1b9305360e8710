"""Low-rank factorized tables (Yu et al., KDD 2024).

"Unified Low-rank Compression Framework for Click-through Rate Prediction" stores an N x D embedding
table as ``E P``: an N x r table E (r < D) and an r x D projection P, ``(N r + r D) x 4`` bytes instead
of ``N D x 4`` (the paper obtains the factors from a trained table by PCA of its outputs; here both are
trained from the start).

Id transform: the identity (one stream). Combiner: ``e P``, linear in the looked-up row, so bags are
pooled inside FBGEMM's kernels before the projection, and items are scored by projecting the queries
back (``q . (e P) = (q P^T) . e``) and scoring the r-wide rows once.

With a ``budget`` (a fraction of the full float32 table's bytes), r is the largest multiple of
``rank_multiple`` (4 by default: FBGEMM's fused kernels need widths divisible by 4) with
``(N r + r D) x 4 <= budget x N D x 4``, or below the smallest multiple the largest r that fits (e.g. r = 3 at
1/16 of D = 64; such a table runs data-parallel on the dense kernel).
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

import torch
from torch import nn

from recsys.embeddings.base import Compression, Method, PlainTable
from recsys.embeddings.spec import TableSpec, TableStats
from recsys.errors import ConfigError


class LowRankTables(Method):
    """One N x r plain table whose rows are projected to D by a learned r x D matrix.

    The projection is an ``nn.Linear(r, D, bias=False)`` whose (D, r) weight starts with orthonormal
    columns, so ``|P e| = |e|``: a row of the plain table (r entries uniform in ±init_scale / sqrt(r)) decodes
    to a row of the norm a full table's rows start with, its D entries of mean variance init_scale^2 / (3 D).

    Args:
        spec: the logical table (N rows, dimension D).
        rank: r, the width of the plain table.

    Example:
        >>> m = LowRankTables(TableSpec("item", 1000, 16, ("item",)), rank=4)
        >>> [(t.suffix, t.rows, t.dim) for t in m.plain_tables()], tuple(m.projection.weight.shape)
        ([('factors', 1000, 4)], (16, 4))
        >>> m.combine([torch.ones(2, 4)], None).shape
        torch.Size([2, 16])
    """

    additive = True

    def __init__(self, spec: TableSpec, rank: int):
        super().__init__(spec)
        self.rank = int(rank)
        self.projection = nn.Linear(self.rank, spec.dim, bias=False)
        nn.init.orthogonal_(self.projection.weight)

    def plain_tables(self) -> list[PlainTable]:
        return [PlainTable("factors", self.spec.num_embeddings, self.rank)]

    def transform(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return [ids.long()]

    def combine(self, parts: list[torch.Tensor], ids: torch.Tensor | None) -> torch.Tensor:
        return self.projection(parts[0])

    def stream_queries(self, queries: torch.Tensor) -> list[torch.Tensor]:
        """q . (P e) = (q P) . e with P the (D, r) projection weight: the rows are scored r wide."""
        return [queries @ self.projection.weight]


def low_rank_bytes(spec: TableSpec, rank: int) -> int:
    """Bytes of the N x r table and the r x D projection (float32).

    Example:
        >>> low_rank_bytes(TableSpec("item", 1000, 64, ("item",)), 4)
        17024
    """
    return 4 * rank * (spec.num_embeddings + spec.dim)


@dataclass
class LowRank(Compression):
    """Low-rank factorized tables (``embedding=low_rank``): an N x r table times a learned r x D
    projection (see the module docstring). Give either ``rank`` or ``budget``.

    Args:
        rank: r (1..D), taken as given.
        budget: fraction (0, 1] of the full table's bytes the table and the projection may use; r is
            the largest multiple of ``rank_multiple`` (at most D) that fits.
        rank_multiple: the budget's rank is a multiple of this; 4 by default, as FBGEMM's fused
            kernels need widths divisible by 4 (1 = any rank).

    Example:
        >>> LowRank(budget=0.25).build(TableSpec("item", 1000, 64, ("item",))).rank  # 15.04 -> 12
        12
        >>> LowRank(budget=0.25, rank_multiple=1).build(TableSpec("item", 1000, 64, ("item",))).rank
        15
    """

    rank: int | None = None
    budget: float | None = None
    rank_multiple: int = 4

    def __post_init__(self):
        if self.rank is None and self.budget is None:
            raise ConfigError("low_rank needs rank or budget; both are None")
        if self.rank is not None and self.budget is not None:
            raise ConfigError(f"low_rank takes rank or budget, not both (got rank={self.rank}, budget={self.budget})")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, Integral)
                                      or self.rank < 1):
            raise ConfigError(f"low_rank.rank must be an integer >= 1, got {self.rank!r}")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, Real)
                                        or not 0 < self.budget <= 1):
            raise ConfigError(f"low_rank.budget must be a fraction of the full table's bytes in (0, 1], "
                              f"got {self.budget!r}")
        if (isinstance(self.rank_multiple, bool) or not isinstance(self.rank_multiple, Integral)
                or self.rank_multiple < 1):
            raise ConfigError(f"low_rank.rank_multiple must be an integer >= 1, got {self.rank_multiple!r}")

    def build(self, spec: TableSpec, stats: TableStats | None = None) -> LowRankTables:
        if self.rank is not None:
            if self.rank > spec.dim:
                raise ConfigError(f"table '{spec.name}': low_rank.rank={self.rank} exceeds the table's dim={spec.dim}; "
                                  f"the plain table is r wide and projected to D, so rank must be <= {spec.dim}")
            return LowRankTables(spec, self.rank)
        return LowRankTables(spec, self._budget_rank(spec))

    def _budget_rank(self, spec: TableSpec) -> int:
        """The largest multiple of ``rank_multiple``, at most D, whose bytes fit the budget, or, when no multiple
        fits, the largest rank that does (its table then runs data-parallel on the dense kernel under the default
        sharding); ConfigError when not even rank 1 fits."""
        multiple, target = int(self.rank_multiple), self.budget * spec.full_bytes
        if multiple > spec.dim:
            raise ConfigError(f"table '{spec.name}': low_rank.rank_multiple={multiple} exceeds the table's "
                              f"dim={spec.dim}, so no rank in 1..{spec.dim} is a multiple of it")
        rank = min(int(target // low_rank_bytes(spec, 1)), spec.dim)
        while rank > 0 and low_rank_bytes(spec, rank) > target:  # float rounding of the division
            rank -= 1
        if rank < 1:
            floor = low_rank_bytes(spec, 1)
            raise ConfigError(f"table '{spec.name}': low_rank.budget={self.budget} ({target:.0f} bytes) is below the "
                              f"smallest layout, rank 1 ({floor} bytes, budget {floor / spec.full_bytes:.4g}); use a "
                              "larger budget")
        return rank - rank % multiple if rank >= multiple else rank
