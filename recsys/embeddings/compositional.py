"""Compositional embeddings from complementary partitions (Shi et al., KDD 2020).

"Compositional Embeddings Using Complementary Partitions for Memory-Efficient Recommendation
Systems" stores k small tables instead of one N-row table. Each table is indexed by one
*partition* of the ids, and the partitions are *complementary*: no two distinct ids fall in
the same class of every partition, so every id still gets its own combination of rows.

The partitions used here are the digits of the id in a mixed radix ``m_0, m_1, ...``
(least significant first)::

    id = d_0 + m_0 * (d_1 + m_1 * (d_2 + ...)),    d_j = (id // (m_0 ... m_{j-1})) % m_j

The digit tuples are distinct for distinct ids as soon as ``m_0 * ... * m_{k-1} >= N``.
Table j then needs ``min(m_j, ceil(N / (m_0 ... m_{j-1})))`` rows. The quotient-remainder
trick is the k = 2 case: streams ``(id // m, id % m)`` read ``ceil(N/m)`` and ``m`` rows.

The looked-up rows are combined by

* ``mult``: elementwise product (not linear, so ids are combined one by one, then pooled),
  parametrised as ``e_0 * (1 + e_1) * ... * (1 + e_{k-1})`` over the streams in order: every
  table starts near zero like any plain table, so the product starts as the first table and the
  others learn multiplicative corrections around 1 (the plain product of near-zero rows would
  start, and learn, orders of magnitude smaller);
* ``add``: sum (additive, pooled inside FBGEMM's kernels);
* ``concat``: concatenation of narrower tables whose widths add up to D (additive as well:
  the concatenation of pooled sums is the pooled sum of the concatenations). Widths are
  multiples of 4 when D allows it: FBGEMM's fused kernels need that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import Iterator, Literal, Sequence

import numpy as np
import torch

from recsys.embeddings.base import Compression, Method, PlainTable
from recsys.embeddings.spec import TableSpec, TableStats
from recsys.errors import ConfigError

Combiner = Literal["mult", "add", "concat"]
COMBINERS = ("mult", "add", "concat")


class CompositionalTables(Method):
    """k plain tables read by the mixed-radix digits of the id, combined by product, sum or concat.

    Stream s reads table s at row ``(id // divisors[s]) % rows[s]``.

    Args:
        spec: the logical table (N rows, dimension D).
        divisors: per stream, the place value ``m_0 ... m_{j-1}`` of its digit.
        rows: per stream, the rows of its table (digit values are below it).
        names: per stream, the suffix of its table name.
        combiner: ``mult``, ``add`` or ``concat``.

    Example:
        >>> m = CompositionalTables(TableSpec("item", 10, 4, ("item",)), [3, 1], [4, 3],
        ...                         ["quotient", "remainder"], "mult")
        >>> [(t.suffix, t.rows, t.dim) for t in m.plain_tables()]
        [('quotient', 4, 4), ('remainder', 3, 4)]
        >>> [s.tolist() for s in m.transform(torch.tensor([0, 7, 9]))]
        [[0, 2, 3], [0, 1, 0]]
    """

    def __init__(self, spec: TableSpec, divisors: Sequence[int], rows: Sequence[int], names: Sequence[str],
                 combiner: Combiner):
        super().__init__(spec)
        self.divisors, self.rows, self.names = [int(d) for d in divisors], [int(r) for r in rows], list(names)
        self.combiner = combiner
        self.additive = combiner != "mult"
        self.dims = part_dims(spec.dim, len(self.rows), combiner)

    def plain_tables(self) -> list[PlainTable]:
        return [PlainTable(n, r, d) for n, r, d in zip(self.names, self.rows, self.dims)]

    def transform(self, ids: torch.Tensor) -> list[torch.Tensor]:
        ids = ids.long()
        return [torch.div(ids, d, rounding_mode="floor") % r for d, r in zip(self.divisors, self.rows)]

    def combine(self, parts: list[torch.Tensor], ids: torch.Tensor | None) -> torch.Tensor:
        if self.combiner == "mult":
            return reduce(lambda product, part: product * (1 + part), parts[1:], parts[0])
        if self.combiner == "add":
            return reduce(torch.add, parts)
        return torch.cat(parts, dim=1)

    def stream_queries(self, queries: torch.Tensor) -> list[torch.Tensor] | None:
        if self.combiner == "add":
            return [queries] * len(self.rows)
        return list(queries.split(self.dims, dim=1)) if self.combiner == "concat" else None

    def item_scores(self, queries: torch.Tensor, weights: list[torch.Tensor], chunk: int = 65536
                    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Two tables combined by product are scored factorized: an id ``a m + b`` (high digit a, low digit b)
        scores ``(q * f_hi(H[a])) . f_lo(L[b])`` with f = identity for stream 0 and 1 + x for the others, so a
        block of high digits costs one (B, a, D) x (D, m) product and no id is decoded."""
        if self.combiner != "mult" or len(self.rows) != 2:
            yield from super().item_scores(queries, weights, chunk)
            return
        low, high = sorted(range(2), key=lambda s: self.divisors[s])
        factor = [weights[0], 1 + weights[1]]
        low_rows, n, m = factor[low], self.spec.num_embeddings, self.divisors[high]
        step = max(1, chunk // m)
        for a in range(0, self.rows[high], step):
            block = queries.unsqueeze(1) * factor[high][a:a + step].unsqueeze(0)  # (B, a, D)
            scores = (block @ low_rows.T).flatten(1)  # ids a m + b in order
            yield a * m, scores[:, :n - a * m]


def part_dims(dim: int, parts: int, combiner: str) -> list[int]:
    """Width of each table: D for ``mult`` and ``add``; D split as evenly as possible for ``concat``,
    the first tables wider. When D is a multiple of 4 with at least 4 per table, the split is in
    units of 4, since FBGEMM's fused kernels (which train the tables under DMP) need widths
    divisible by 4.

    Example:
        >>> part_dims(9, 2, "concat"), part_dims(64, 3, "concat"), part_dims(8, 3, "concat")
        ([5, 4], [24, 20, 20], [3, 3, 2])
    """
    if combiner != "concat":
        return [dim] * parts
    unit = 4 if dim % 4 == 0 and dim >= 4 * parts else 1
    units = dim // unit
    return [unit * (units // parts + (1 if j < units % parts else 0)) for j in range(parts)]


def mixed_radix_tables(num_embeddings: int, moduli: Sequence[int]) -> tuple[list[int], list[int]]:
    """Place values and table rows of the digits of ``moduli`` (least significant first) over N ids.

    Example:
        >>> mixed_radix_tables(100, [4, 5, 6])
        ([1, 4, 20], [4, 5, 5])
    """
    divisors, rows, place = [], [], 1
    for m in moduli:
        divisors.append(place)
        rows.append(min(int(m), -(-num_embeddings // place)))
        place *= int(m)
    return divisors, rows


def _two_part_layouts(n: int, w_low: int, w_high: int, target: float) -> tuple[np.ndarray, np.ndarray]:
    """Candidate moduli m of a two-part split of n ids and their costs ``w_low * m + w_high * ceil(n / m)``
    (the low digit's table has m rows, the high digit's ``ceil(n/m)``).

    m ranges over [2, n-1] (all of [1, n] for n < 3: 1 and n leave a one-row table). Small m
    (up to sqrt n) are all listed; larger m are grouped in intervals of equal ``ceil(n / m)``, on
    which the cost grows with m, and each interval gives its first m (its cheapest) and its last
    m within ``target`` (its best fit). So the cheapest layout and the costliest one within the
    target are both among the O(sqrt n) candidates.
    """
    lo, hi = (2, n - 1) if n >= 3 else (1, n)
    root = math.isqrt(n)
    small = np.arange(lo, min(hi, root + 1) + 1, dtype=np.int64)
    q = np.arange(1, -(-n // (root + 1)) + 1, dtype=np.int64)
    first = np.maximum(-(-n // q), lo)
    last = np.minimum(np.where(q == 1, n, -(-n // np.maximum(q - 1, 1)) - 1), hi)
    fit = np.floor(np.minimum(last, np.maximum(target - w_high * q, -1) / w_low)).astype(np.int64)
    m = np.concatenate([small, first[first <= last], fit[(fit >= first) & (fit <= last)]])
    return m, w_low * m + w_high * -(-n // m)


def _integer_root(n: int, k: int) -> int:
    """floor(n ** (1/k)) for k >= 1."""
    r = int(round(n ** (1.0 / k)))
    while r > 0 and r**k > n:
        r -= 1
    while (r + 1) ** k <= n:
        r += 1
    return r


def _layouts(n: int, row_bytes: Sequence[int], target: float):
    """Candidate layouts of k >= 2 partitions, per value of the shared middle modulus m_s: yields
    (m_s, remaining classes, candidate m, their total cost).

    The layouts are ``[m, m_s, ..., m_s, ceil(N / (m * m_s^(k-2)))]``: the k-2 middle moduli are
    equal (m_s from 2 to the (k-1)-th root of N) and the first and last digits split the
    ``ceil(N / m_s^(k-2))`` remaining classes as in quotient-remainder (the first digit is the
    widest table under ``concat``). So the candidates include the balanced minimum (all moduli
    near N^(1/k)) and reach any cost above it in steps of one row, up to the largest layout of k
    non-trivial partitions (about N / 2^(k-2) rows).
    """
    k = len(row_bytes)
    if k == 2:
        yield 1, n, *_two_part_layouts(n, row_bytes[0], row_bytes[1], target)
        return
    top = _integer_root(n, k - 1)
    for m_s in range(2, top + 1) if top >= 2 else [1]:
        fixed = sum(row_bytes[1:k - 1]) * m_s
        rest = -(-n // m_s ** (k - 2))
        m, cost = _two_part_layouts(rest, row_bytes[0], row_bytes[k - 1], target - fixed)
        yield m_s, rest, m, cost + fixed


def budget_moduli(n: int, row_bytes: Sequence[int], target: float) -> tuple[list[int], int] | None:
    """Moduli (least significant first) of k = len(row_bytes) complementary partitions of n ids whose
    tables cost the most bytes without exceeding ``target`` (among the layouts of ``_layouts``);
    None if none fits. Ties go to the smallest moduli.

    Args:
        n: number of ids N.
        row_bytes: bytes per row of each table, least significant digit first.
        target: the byte budget.

    Example:
        >>> budget_moduli(1000, [32, 32], 1000 * 32 / 4)  # 245 + ceil(1000 / 245) = 250 rows
        ([245, 5], 8000)
    """
    k, best = len(row_bytes), None
    for m_s, rest, m, cost in _layouts(n, row_bytes, target):
        feasible = cost <= target
        if not feasible.any():
            continue
        m, cost = m[feasible], cost[feasible]
        top = np.flatnonzero(cost == cost.max())
        i = top[np.argmin(m[top])]
        if best is None or cost[i] > best[1]:
            best = ([int(m[i])] + [m_s] * (k - 2) + [-(-rest // int(m[i]))], int(cost[i]))
    return best


def smallest_bytes(n: int, row_bytes: Sequence[int]) -> int:
    """Bytes of the cheapest layout ``budget_moduli`` can choose for n ids.

    Example:
        >>> smallest_bytes(10_000, [4, 4])  # 100 + 100 rows of one float
        800
    """
    return int(min(cost.min() for *_, cost in _layouts(n, row_bytes, 0.0) if len(cost)))


def _check_common(name: str, budget: float | None, combiner: str) -> None:
    if combiner not in COMBINERS:
        raise ConfigError(f"{name}.combiner must be one of {list(COMBINERS)}, got {combiner!r}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0):
        raise ConfigError(f"{name}.budget must be a number > 0 (a fraction of the full table's bytes), "
                          f"got {budget!r}")


def _check_concat(spec: TableSpec, name: str, parts: int, combiner: str) -> None:
    if combiner == "concat" and spec.dim < parts:
        raise ConfigError(f"table '{spec.name}': {name}.combiner=concat splits dim={spec.dim} over {parts} "
                          f"tables; it needs dim >= {parts}")


def _solve(spec: TableSpec, name: str, row_bytes: Sequence[int], budget: float) -> list[int]:
    """Moduli (least significant first) whose tables fit ``budget * spec.full_bytes``, or ConfigError."""
    target = budget * spec.full_bytes
    found = budget_moduli(spec.num_embeddings, row_bytes, target)
    if found is None:
        floor = smallest_bytes(spec.num_embeddings, row_bytes)
        raise ConfigError(f"table '{spec.name}': {name}.budget={budget} ({target:.0f} bytes) is below the "
                          f"smallest {len(row_bytes)}-table layout ({floor} bytes, budget "
                          f"{floor / spec.full_bytes:.4g})")
    return found[0]


@dataclass
class QuotientRemainder(Compression):
    """The quotient-remainder trick (``embedding=quotient_remainder``): two tables read by
    ``id // m`` (``ceil(N/m)`` rows) and ``id % m`` (m rows).

    Give either ``collisions`` (m, the number of ids sharing each quotient row) or ``budget``.

    Args:
        collisions: the remainder modulus m.
        budget: fraction of the full table's bytes the two tables may use; m is chosen so they
            come as close to it as possible without exceeding it (m ranges over 2..N-1, so under
            ``concat`` the tables hold at most about floor(D/2)/D of the full bytes).
        combiner: ``mult`` (elementwise product, the paper's default), ``add`` (sum) or
            ``concat`` (the quotient table ``ceil(D/2)`` wide, the remainder table ``floor(D/2)``;
            in multiples of 4 when D is one, see ``part_dims``).

    Example:
        >>> qr = QuotientRemainder(collisions=4).build(TableSpec("item", 10, 8, ("item",)))
        >>> [(t.suffix, t.rows) for t in qr.plain_tables()]
        [('quotient', 3), ('remainder', 4)]
        >>> QuotientRemainder(budget=0.25).build(TableSpec("item", 1000, 8, ("item",))).rows
        [5, 245]
    """

    collisions: int | None = None
    budget: float | None = None
    combiner: Combiner = "mult"

    def __post_init__(self):
        _check_common("quotient_remainder", self.budget, self.combiner)
        if self.collisions is None and self.budget is None:
            raise ConfigError("quotient_remainder needs collisions or budget; both are None")
        if self.collisions is not None and self.budget is not None:
            raise ConfigError(f"quotient_remainder takes collisions or budget, not both (got collisions="
                              f"{self.collisions}, budget={self.budget})")
        if self.collisions is not None and (isinstance(self.collisions, bool) or not isinstance(self.collisions, int)
                                            or self.collisions < 1):
            raise ConfigError(f"quotient_remainder.collisions must be an integer >= 1, got {self.collisions!r}")

    def build(self, spec: TableSpec, stats: TableStats | None = None) -> CompositionalTables:
        _check_concat(spec, "quotient_remainder", 2, self.combiner)
        n = spec.num_embeddings
        quotient_dim, remainder_dim = part_dims(spec.dim, 2, self.combiner)
        m = self.collisions or _solve(spec, "quotient_remainder", [4 * remainder_dim, 4 * quotient_dim], self.budget)[0]
        return CompositionalTables(spec, [m, 1], [-(-n // m), min(m, n)], ["quotient", "remainder"], self.combiner)


@dataclass
class Compositional(Compression):
    """Compositional embeddings from k complementary partitions (``embedding=compositional``):
    k tables read by the mixed-radix digits of the id (see the module docstring).

    Give either ``partitions`` (the moduli) or ``budget`` (with ``parts`` tables, 3 by default).

    Args:
        partitions: the moduli ``m_0, m_1, ...`` (least significant digit first); their product
            must be at least N, so that distinct ids get distinct digit tuples.
        parts: number of partitions k when ``budget`` chooses the moduli.
        budget: fraction of the full table's bytes the k tables may use; the moduli are chosen
            so they come as close to it as possible without exceeding it. k non-trivial
            partitions store at most about N / 2^(k-2) rows: a larger budget gets that layout.
        combiner: ``mult`` (elementwise product), ``add`` (sum) or ``concat`` (D split over the
            k tables as evenly as possible, see ``part_dims``).

    Example:
        >>> m = Compositional(partitions=[4, 5, 6]).build(TableSpec("item", 100, 8, ("item",)))
        >>> [(t.suffix, t.rows) for t in m.plain_tables()]
        [('part0', 4), ('part1', 5), ('part2', 5)]
        >>> [s.tolist() for s in m.transform(torch.tensor([99]))]  # 99 = 3 + 4 * (4 + 5 * 4)
        [[3], [4], [4]]
    """

    partitions: list[int] | None = None
    parts: int | None = None
    budget: float | None = None
    combiner: Combiner = "mult"

    def __post_init__(self):
        _check_common("compositional", self.budget, self.combiner)
        if self.partitions is None and self.budget is None:
            raise ConfigError("compositional needs partitions or budget; both are None")
        if self.partitions is not None and self.budget is not None:
            raise ConfigError(f"compositional takes partitions or budget, not both (got partitions="
                              f"{list(self.partitions)}, budget={self.budget})")
        if self.partitions is not None:
            moduli = list(self.partitions)
            if not moduli or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in moduli):
                raise ConfigError(f"compositional.partitions must be a non-empty list of integers >= 1, got {moduli}")
            if self.parts is not None and self.parts != len(moduli):
                raise ConfigError(f"compositional.parts={self.parts} disagrees with the {len(moduli)} partitions "
                                  f"{moduli}")
        elif self.parts is not None and (isinstance(self.parts, bool) or not isinstance(self.parts, int)
                                         or self.parts < 2):
            raise ConfigError(f"compositional.parts must be an integer >= 2, got {self.parts!r}")

    def build(self, spec: TableSpec, stats: TableStats | None = None) -> CompositionalTables:
        n = spec.num_embeddings
        if self.partitions is not None:
            moduli = [int(m) for m in self.partitions]
            if math.prod(moduli) < n:
                raise ConfigError(f"table '{spec.name}': compositional.partitions {moduli} multiply to "
                                  f"{math.prod(moduli)} < num_embeddings={n}; the partitions are complementary "
                                  f"(distinct ids never share every row) only if the product is >= N")
        else:
            parts = self.parts or 3
            _check_concat(spec, "compositional", parts, self.combiner)
            moduli = _solve(spec, "compositional", [4 * d for d in part_dims(spec.dim, parts, self.combiner)],
                            self.budget)
        _check_concat(spec, "compositional", len(moduli), self.combiner)
        divisors, rows = mixed_radix_tables(n, moduli)
        return CompositionalTables(spec, divisors, rows, [f"part{j}" for j in range(len(moduli))], self.combiner)
