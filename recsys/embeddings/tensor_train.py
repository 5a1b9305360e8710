"""Tensor-train tables, TT-Rec (Yin et al., MLSys 2021).

"TT-Rec: Tensor Train Decomposition for Efficient Deep Learning Recommendation Model Embeddings"
stores the N x D table as a tensor-train matrix of 3 small cores. The rows are factored as
``N <= n_0 n_1 n_2`` (padding allowed) and the dimension as ``D = d_0 d_1 d_2``; an id is read as its
mixed-radix digits (most significant first) and a column as its digits in the same way::

    id = (i_0 n_1 + i_1) n_2 + i_2,     j = (j_0 d_1 + j_1) d_2 + j_2
    W[id, j] = sum_{a, b} G_0[i_0][j_0, a] G_1[i_1][a, j_1, b] G_2[i_2][b, j_2]

Core k is a plain TorchRec table with one row per digit value, ``r_{k-1} d_k r_k`` wide (row-major
``(r_{k-1}, d_k, r_k)``, with r_{-1} = r_2 = 1 and both inner ranks r), as TT-Rec's kernels
(FBTT-Embedding) lay them out; a core keeps only the digit values ids reach (core 0:
``ceil(N / (n_1 n_2))`` rows). Those kernels are CUDA-only, so the lookup here is the plain-torch path
of the contract: id transform = the 3 digits (3 streams), combiner = two batched matrix products per
id (not linear in the cores, so ids are combined one by one, then pooled). No N x D table is ever
materialized; items are scored by contracting the queries with the cores (``item_scores``).

Cores start Gaussian (TT-Rec's sampled Gaussian initialisation), every entry with variance
``(s^2 / (3 D r^2)) ^ (1/3)`` for ``s = init_scale``: a decoded entry, a sum of r^2 products of three
entries, then has variance ``s^2 / (3 D)``, that of a full table's uniform rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product
from numbers import Integral, Real
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from recsys.embeddings.base import Compression, Method, PlainTable
from recsys.embeddings.spec import TableSpec, TableStats
from recsys.errors import ConfigError

CORES = 3


class TensorTrainTables(Method):
    """Three TT cores, one plain table each, read by the id's three digits.

    Args:
        spec: the logical table (N rows, dimension D).
        row_shape: ``(n_0, n_1, n_2)``, the radices of the id's digits (product >= N).
        dim_shape: ``(d_0, d_1, d_2)``, the factors of D.
        rank: the TT rank r of both inner bonds.

    Example:
        >>> m = TensorTrainTables(TableSpec("item", 100, 8, ("item",)), (5, 4, 5), (2, 2, 2), rank=4)
        >>> [(t.suffix, t.rows, t.dim) for t in m.plain_tables()]
        [('core0', 5, 8), ('core1', 4, 32), ('core2', 5, 8)]
        >>> [s.tolist() for s in m.transform(torch.tensor([0, 7, 99]))]  # 99 = (4 * 4 + 3) * 5 + 4
        [[0, 0, 4], [0, 1, 3], [0, 2, 4]]
        >>> m.combine([torch.ones(2, 8), torch.ones(2, 32), torch.ones(2, 8)], None)[0].tolist()  # r^2 = 16
        [16.0, 16.0, 16.0, 16.0, 16.0, 16.0, 16.0, 16.0]
    """

    additive = False

    def __init__(self, spec: TableSpec, row_shape: Sequence[int], dim_shape: Sequence[int], rank: int):
        super().__init__(spec)
        self.row_shape, self.dim_shape, self.rank = tuple(map(int, row_shape)), tuple(map(int, dim_shape)), int(rank)
        self.places = [math.prod(self.row_shape[k + 1:]) for k in range(CORES)]  # value of one unit of digit k
        self.rows = [min(n, -(-spec.num_embeddings // place)) for n, place in zip(self.row_shape, self.places)]
        self.ranks = [1, self.rank, self.rank, 1]

    def plain_tables(self) -> list[PlainTable]:
        return [PlainTable(f"core{k}", self.rows[k], self.ranks[k] * self.dim_shape[k] * self.ranks[k + 1])
                for k in range(CORES)]

    def transform(self, ids: torch.Tensor) -> list[torch.Tensor]:
        ids = ids.long()
        return [torch.div(ids, place, rounding_mode="floor") % n for n, place in zip(self.row_shape, self.places)]

    def combine(self, parts: list[torch.Tensor], ids: torch.Tensor | None) -> torch.Tensor:
        """(n, d_0 r), (n, r d_1 r), (n, r d_2) core rows -> (n, D): ``G_0 @ G_1 @ G_2`` per id."""
        n, (d0, d1, d2), r = parts[0].shape[0], self.dim_shape, self.rank
        out = torch.bmm(parts[0].reshape(n, d0, r), parts[1].reshape(n, r, d1 * r))  # (n, d0, d1 r)
        out = torch.bmm(out.reshape(n, d0 * d1, r), parts[2].reshape(n, r, d2))  # (n, d0 d1, d2)
        return out.reshape(n, self.spec.dim)

    def init_fn(self, table: PlainTable, init_scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """Gaussian cores, each entry of variance ``(init_scale^2 / (3 D r^2)) ^ (1/3)`` (see the module docstring)."""
        std = (init_scale**2 / (3 * self.spec.dim * self.rank**2)) ** (1 / 6)
        return lambda weight: nn.init.normal_(weight, std=std)

    def cores(self, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """The plain tables' rows as cores: (rows_0, d_0, r), (rows_1, r, d_1, r), (rows_2, r, d_2)."""
        (d0, d1, d2), r = self.dim_shape, self.rank
        return [weights[0].reshape(-1, d0, r), weights[1].reshape(-1, r, d1, r), weights[2].reshape(-1, r, d2)]

    def item_scores(self, queries: torch.Tensor, weights: list[torch.Tensor], chunk: int = 65536
                    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Scores without decoding: the (B, D) queries, seen as (B, d_0, d_1, d_2), are contracted with the
        core-0 and core-1 rows of a block of id prefixes ``i_0 n_1 + i_1`` (O(B D r) each), then with every
        core-2 row at once, giving the ids ``prefix n_2 + i_2`` in order. Blocks hold ``chunk // n_2`` prefixes."""
        g0, g1, g2 = self.cores(weights)
        q = queries.reshape(len(queries), *self.dim_shape)
        n, per_prefix = self.spec.num_embeddings, self.places[1]
        prefixes = -(-n // per_prefix)
        step = max(1, chunk // per_prefix)
        for first in range(0, prefixes, step):
            prefix = torch.arange(first, min(first + step, prefixes))
            a = torch.einsum("bxyz,pxr->bpryz", q, g0[prefix // self.row_shape[1]])
            b = torch.einsum("bpryz,prys->bpsz", a, g1[prefix % self.row_shape[1]])
            scores = torch.einsum("bpsz,ksz->bpk", b, g2).flatten(1)  # ids first * n_2 ... in order
            start = first * per_prefix
            yield start, scores[:, :n - start]


def tt_bytes(rows: Sequence[int], dim_shape: Sequence[int], rank: int) -> int:
    """Bytes of three float32 cores of ``rows`` rows and rank r: ``4 (R_0 d_0 r + R_1 r d_1 r + R_2 r d_2)``.

    Example:
        >>> tt_bytes([10, 10, 10], [4, 4, 4], 8)  # 4 (320 + 2560 + 320)
        12800
    """
    r0, r1, r2 = rows
    d0, d1, d2 = dim_shape
    return 4 * (r0 * d0 * rank + r1 * d1 * rank * rank + r2 * d2 * rank)


def row_factors(n: int) -> tuple[int, int, int]:
    """Radices ``(n_0, n_1, n_2)`` near N^(1/3) with product >= N: n_2 = c, the smallest integer with c^3 >= N;
    n_1 = ceil(N / c^2) (the middle core, r^2 wide per d_1, gets the fewest rows); n_0 = ceil(N / (n_1 n_2)).

    Example:
        >>> row_factors(64), row_factors(1000), row_factors(2000)
        ((4, 4, 4), (10, 10, 10), (13, 12, 13))
    """
    c = max(1, round(n ** (1 / 3)))
    while c**3 < n:
        c += 1
    while c > 1 and (c - 1) ** 3 >= n:
        c -= 1
    middle = -(-n // (c * c))
    return -(-n // (middle * c)), middle, c


def dim_factors(dim: int) -> tuple[int, int, int]:
    """A factorization ``d_0 d_1 d_2 = D``: the most balanced (smallest sum), then the smallest middle factor
    (the r^2-wide core), then the larger outer factor first.

    Example:
        >>> dim_factors(8), dim_factors(16), dim_factors(32), dim_factors(64), dim_factors(7)
        ((2, 2, 2), (4, 2, 2), (4, 2, 4), (4, 4, 4), (7, 1, 1))
    """
    divisors = [d for d in range(1, dim + 1) if dim % d == 0]
    triples = [(a, b, dim // (a * b)) for a, b in product(divisors, divisors) if dim % (a * b) == 0]
    return min(triples, key=lambda t: (sum(t), t[1], -t[0]))


@dataclass
class TensorTrain(Compression):
    """TT-Rec tensor-train tables (``embedding=tensor_train``): 3 TT cores read by the id's digits
    (see the module docstring). Give either ``rank`` or ``budget``.

    Args:
        rank: the TT rank r (>= 1), taken as given.
        budget: fraction (0, 1] of the full table's bytes the cores may use; r is the largest multiple
            of ``rank_multiple`` that fits.
        row_shape: ``[n_0, n_1, n_2]`` with product >= N (default ``row_factors(N)``).
        dim_shape: ``[d_0, d_1, d_2]`` with product D (default ``dim_factors(D)``).
        rank_multiple: the budget's rank is a multiple of this; 4 by default, so every core's width
            ``r_{k-1} d_k r_k`` is divisible by 4, as FBGEMM's fused kernels need (1 = any rank).

    Example:
        >>> m = TensorTrain(budget=0.25).build(TableSpec("item", 1000, 64, ("item",)))
        >>> m.row_shape, m.dim_shape, m.rank  # 4 (40 r + 40 r^2 + 40 r) <= 64000 bytes: r <= 19 -> 16
        ((10, 10, 10), (4, 4, 4), 16)
        >>> TensorTrain(rank=4, row_shape=[8, 5, 25], dim_shape=[2, 4, 8]).build(
        ...     TableSpec("item", 1000, 64, ("item",))).rows
        [8, 5, 25]
    """

    rank: int | None = None
    budget: float | None = None
    row_shape: list[int] | None = None
    dim_shape: list[int] | None = None
    rank_multiple: int = 4

    def __post_init__(self):
        if self.rank is None and self.budget is None:
            raise ConfigError("tensor_train needs rank or budget; both are None")
        if self.rank is not None and self.budget is not None:
            raise ConfigError(f"tensor_train takes rank or budget, not both (got rank={self.rank}, "
                              f"budget={self.budget})")
        if self.rank is not None and not _positive_int(self.rank):
            raise ConfigError(f"tensor_train.rank must be an integer >= 1, got {self.rank!r}")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, Real)
                                        or not 0 < self.budget <= 1):
            raise ConfigError(f"tensor_train.budget must be a fraction of the full table's bytes in (0, 1], "
                              f"got {self.budget!r}")
        for name in ("row_shape", "dim_shape"):
            shape = getattr(self, name)
            if shape is not None and (not isinstance(shape, Sequence) or isinstance(shape, str)
                                      or len(shape) != CORES or not all(_positive_int(n) for n in shape)):
                shown = list(shape) if isinstance(shape, Sequence) and not isinstance(shape, str) else repr(shape)
                raise ConfigError(f"tensor_train.{name} must be a list of {CORES} integers >= 1, got {shown}")
            if shape is not None:  # a plain list (Hydra gives a ListConfig), as a package's JSON stores it
                setattr(self, name, [int(n) for n in shape])
        if not _positive_int(self.rank_multiple):
            raise ConfigError(f"tensor_train.rank_multiple must be an integer >= 1, got {self.rank_multiple!r}")

    def build(self, spec: TableSpec, stats: TableStats | None = None) -> TensorTrainTables:
        row_shape = row_factors(spec.num_embeddings) if self.row_shape is None else tuple(map(int, self.row_shape))
        dim_shape = dim_factors(spec.dim) if self.dim_shape is None else tuple(map(int, self.dim_shape))
        if math.prod(row_shape) < spec.num_embeddings:
            raise ConfigError(f"table '{spec.name}': tensor_train.row_shape {list(row_shape)} multiplies to "
                              f"{math.prod(row_shape)} < num_embeddings={spec.num_embeddings}; distinct ids need "
                              f"distinct digits, so the product must be >= N")
        if math.prod(dim_shape) != spec.dim:
            raise ConfigError(f"table '{spec.name}': tensor_train.dim_shape {list(dim_shape)} multiplies to "
                              f"{math.prod(dim_shape)}, not the table's dim={spec.dim}")
        if self.rank is not None:
            return TensorTrainTables(spec, row_shape, dim_shape, self.rank)
        return TensorTrainTables(spec, row_shape, dim_shape, self._budget_rank(spec, row_shape, dim_shape))

    def _budget_rank(self, spec: TableSpec, row_shape: tuple[int, ...], dim_shape: tuple[int, ...]) -> int:
        """The largest multiple of ``rank_multiple`` whose cores fit the budget; ConfigError if none."""
        multiple, target = int(self.rank_multiple), self.budget * spec.full_bytes
        rows = TensorTrainTables(spec, row_shape, dim_shape, 1).rows
        quadratic, linear = 4 * rows[1] * dim_shape[1], 4 * (rows[0] * dim_shape[0] + rows[2] * dim_shape[2])
        rank = int((-linear + math.sqrt(linear * linear + 4 * quadratic * target)) / (2 * quadratic))
        rank -= rank % multiple
        while tt_bytes(rows, dim_shape, rank + multiple) <= target:  # float rounding of the root
            rank += multiple
        while rank > 0 and tt_bytes(rows, dim_shape, rank) > target:
            rank -= multiple
        if rank < multiple:
            floor = tt_bytes(rows, dim_shape, multiple)
            raise ConfigError(f"table '{spec.name}': tensor_train.budget={self.budget} ({target:.0f} bytes) is below "
                              f"the smallest layout, rank {multiple} with row_shape {list(row_shape)} and dim_shape "
                              f"{list(dim_shape)} ({floor} bytes, budget {floor / spec.full_bytes:.4g}); use a larger "
                              f"budget or a smaller rank_multiple")
        return rank


def _positive_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, Integral) and value >= 1
