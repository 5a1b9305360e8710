"""One memory budget split over several tables.

A model-wide budget ("the tables may use 1/16 of their full bytes") is not the same as every
table at 1/16: a small table may have no layout that small (quotient-remainder needs two tables
of about sqrt(N) rows, mixed dimension one column per id and a projection per block), while a
large table has room to give. ``split_budget`` water-fills: every table gets the same fraction
``s`` of its full bytes, raised to its own smallest feasible budget where that is larger, with
``s`` the largest value that keeps the total within the bytes available.

Every compression method keeps its built tables, projections and id maps within ``budget x
full bytes``, so the split's total is an upper bound of the measured memory.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Mapping, Sequence

from recsys.embeddings.base import Compression
from recsys.embeddings.spec import TableSpec, TableStats
from recsys.errors import ConfigError


def with_budget(compression: Compression, budget: float) -> Compression:
    """``compression`` with its ``budget`` field set (a fraction of the full table's bytes)."""
    if not hasattr(compression, "budget"):
        raise ConfigError(f"{type(compression).__name__} takes no budget; a memory budget needs a method sized by "
                          "`budget` (hashing, quotient_remainder, compositional, mixed_dim, vq, ...)")
    return replace(compression, budget=float(budget))


def has_layout(compression: Compression, spec: TableSpec, stats: TableStats | None, budget: float) -> bool:
    """Whether ``compression`` at ``budget`` builds for ``spec`` (methods raise ConfigError when it is too small)."""
    sized = with_budget(compression, budget)  # outside the try: a method without a budget is an error, not "no"
    try:
        sized.build(spec, stats)
    except ConfigError:
        return False
    return True


def smallest_budget(compression: Compression, spec: TableSpec, stats: TableStats | None = None,
                    rel_tol: float = 1e-3) -> float:
    """The smallest budget (within ``rel_tol``, rounded up) at which ``compression`` has a layout for ``spec``.

    Example:
        >>> from recsys.embeddings.compositional import QuotientRemainder
        >>> round(smallest_budget(QuotientRemainder(budget=1.0), TableSpec("user", 885, 32, ("user",))), 3)
        0.068
    """
    if not has_layout(compression, spec, stats, 1.0):
        raise ConfigError(f"table '{spec.name}': {type(compression).__name__} has no layout within the full table's "
                          f"bytes ({spec.full_bytes})")
    low, high = 1.0 / spec.full_bytes, 1.0  # below one byte nothing fits
    while high / low > 1 + rel_tol:
        middle = math.sqrt(low * high)
        low, high = (low, middle) if has_layout(compression, spec, stats, middle) else (middle, high)
    return high


def split_budget(compression: Compression, specs: Sequence[TableSpec], available: int,
                 stats: Mapping[str, TableStats] | None = None) -> dict[str, float]:
    """Per-table budgets for ``compression`` whose total (``sum budget_t x full_bytes_t``) is at most
    ``available`` bytes: ``max(s, smallest_budget_t)`` with the largest such ``s`` <= 1.

    Example:
        >>> from recsys.embeddings.compositional import QuotientRemainder
        >>> specs = [TableSpec("item", 10000, 8, ("item",)), TableSpec("city", 100, 8, ("city",))]
        >>> # 5% of the 323,200 full bytes; city's smallest layout (10 + 10 rows) is 20% of its table
        >>> {k: round(v, 4) for k, v in split_budget(QuotientRemainder(budget=1.0), specs, 16160).items()}
        {'item': 0.0485, 'city': 0.2001}
    """
    stats = stats or {}
    floors = {s.name: smallest_budget(compression, s, stats.get(s.name)) for s in specs}
    full = {s.name: s.full_bytes for s in specs}
    need = sum(floors[n] * full[n] for n in full)
    if need > available:
        raise ConfigError(f"{type(compression).__name__}: the smallest layouts of tables {sorted(full)} need {need:.0f} "
                          f"bytes together, more than the {available} available")

    def total(s: float) -> float:
        return sum(max(s, floors[n]) * full[n] for n in full)

    # total(s) is piecewise linear and increasing: find the segment holding `available`, then solve on it
    points = sorted({*floors.values(), 1.0})
    s = 1.0
    for left, right in zip([0.0, *points], points):
        if total(right) > available:
            free = [n for n in full if floors[n] <= left]  # the tables above their floor on this segment
            s = left + (available - total(left)) / sum(full[n] for n in free)
            break
    return {n: max(s, floors[n]) for n in full}  # s <= 1, and every floor is <= 1
