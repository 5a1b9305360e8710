"""Mixed dimension embeddings (Ginart et al., ISIT 2021).

"Mixed Dimension Embeddings with Application to Memory-Efficient Recommendation Systems"
gives popular ids wide rows and rare ids narrow ones. The ids are sorted by frequency and cut
into k blocks; block i stores its ``n_i`` ids in a plain ``n_i x d_i`` table and a learned
projection ``P_i`` (``d_i -> D``) brings its rows to the common dimension D.

The dimensions follow the paper's popularity-based power rule (its Algorithm 1): with ``p_i``
the popularity of block i (the mean access probability of its ids),

    d_i = round(base_dim * (p_i / max_j p_j) ** alpha),   at least 1,

so the most popular block gets ``base_dim`` and a block 2^(1/alpha) times less popular gets
half of it; ``alpha = 0`` gives every block ``base_dim``. FBGEMM's fused kernels, which train
the tables under DistributedModelParallel, need widths divisible by 4, so by default the dims
are rounded to multiples of 4 instead (``dim_multiple=1`` gives the rule above exactly).

Id transform: id -> (block, row within block), one stream per block, -1 where the id is not in
that block. Combiner: ``sum_i P_i e_i``, linear per stream, so pooling happens inside FBGEMM's
kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real
from typing import Sequence

import numpy as np
import torch
from torch import nn

from recsys.embeddings.base import Compression, Method, PlainTable
from recsys.embeddings.memory import narrowest_int_dtype
from recsys.embeddings.spec import TableSpec, TableStats
from recsys.errors import ConfigError, DataError


class MixedDimensionTables(Method):
    """One plain table per frequency block, each projected to D and summed.

    Ids are laid out block after block in ``slot`` order (block i holds slots
    ``starts[i] .. starts[i+1] - 1``); the row of an id in its block is its slot minus the
    block's start. ``slot`` is a buffer (narrowest int dtype), omitted when it is the identity;
    ``starts`` is omitted for a single block.

    Args:
        spec: the logical table (N rows, dimension D).
        sizes: ids per block ``n_i`` (summing to N).
        dims: dimension ``d_i`` of each block's table.
        slot: (N,) slot of each id, or None when slot = id.

    Example:
        >>> m = MixedDimensionTables(TableSpec("item", 6, 4, ("item",)), [2, 4], [4, 1], None)
        >>> [(t.rows, t.dim) for t in m.plain_tables()]
        [(2, 4), (4, 1)]
        >>> [s.tolist() for s in m.transform(torch.tensor([1, 2, 5]))]
        [[1, -1, -1], [-1, 0, 3]]
    """

    additive = True
    partial_streams = True  # ids outside a stream read nothing there

    def __init__(self, spec: TableSpec, sizes: Sequence[int], dims: Sequence[int], slot: np.ndarray | None):
        super().__init__(spec)
        self.sizes, self.dims = [int(n) for n in sizes], [int(d) for d in dims]
        self.register_buffer("starts", None if len(self.sizes) == 1 else
                             torch.tensor(np.cumsum([0, *self.sizes[:-1]]), dtype=torch.int64))
        self.register_buffer("slot", None if slot is None else
                             torch.from_numpy(np.asarray(slot)).to(narrowest_int_dtype(spec.num_embeddings)))
        self.projections = nn.ModuleList(
            nn.Identity() if d == spec.dim else nn.Linear(d, spec.dim, bias=False) for d in self.dims)
        for projection in self.projections:
            if isinstance(projection, nn.Linear):  # entries of variance 1/D: P e keeps the norm of e on average
                nn.init.normal_(projection.weight, std=spec.dim**-0.5)

    def plain_tables(self) -> list[PlainTable]:
        return [PlainTable(f"block{i}", n, d) for i, (n, d) in enumerate(zip(self.sizes, self.dims))]

    def transform(self, ids: torch.Tensor) -> list[torch.Tensor]:
        slot = ids.long() if self.slot is None else self.slot[ids].long()
        if len(self.sizes) == 1:
            return [slot]
        block = torch.bucketize(slot, self.starts[1:], right=True)
        row = slot - self.starts[block]
        return [torch.where(block == i, row, -1) for i in range(len(self.sizes))]

    def combine(self, parts: list[torch.Tensor], ids: torch.Tensor | None) -> torch.Tensor:
        out = self.projections[0](parts[0])
        for projection, part in zip(self.projections[1:], parts[1:]):
            out = out + projection(part)
        return out

    def stream_queries(self, queries: torch.Tensor) -> list[torch.Tensor]:
        """q . (P_i e) = (q P_i) . e: each block scores its narrow rows with the query projected back."""
        return [queries if isinstance(p, nn.Identity) else queries @ p.weight for p in self.projections]


def power_rule_dims(scale, ratios: np.ndarray, multiple: int = 1, cap: int | None = None) -> np.ndarray:
    """``round(scale * ratio_i)`` per block, to the nearest multiple of ``multiple`` (half to even),
    at least ``multiple`` and at most ``cap``; ``scale`` and ``ratios`` broadcast.

    Example:
        >>> power_rule_dims(64, np.array([1.0, 0.3, 0.01])).tolist()
        [64, 19, 1]
        >>> power_rule_dims(64, np.array([1.0, 0.3, 0.01]), multiple=4).tolist()
        [64, 20, 4]
    """
    dims = multiple * np.maximum(1, np.rint(np.asarray(scale) * ratios / multiple)).astype(np.int64)
    return dims if cap is None else np.minimum(dims, cap)


@dataclass
class MixedDimension(Compression):
    """Mixed dimension embeddings (``embedding=mixed_dim``): frequency blocks with dimensions from
    the popularity power rule, projected to D (see the module docstring).

    Frequencies come from ``TableStats.counts`` (ties keep id order; the OOV row, index 0, stays
    first, in the widest block: every id unseen in training reads it). With ``rank_by=index``,
    or without counts, ids are taken to be indexed by decreasing frequency, as the platform's
    vocabularies are (``recsys.data.vocab``), which needs no id map (2 bytes per id: a quarter
    of the 8 bytes per id that 1/16 of a D = 32 table leaves); without counts they are also
    taken to follow Zipf's law (probability of the id at index j proportional to 1 / (j + 1)),
    which gives the block popularities. Within a block rows follow id order, so one block is
    the full table.
    Tables with fewer ids than blocks get one block per id.

    Args:
        blocks: number of equal-size blocks (sizes differ by at most one, the popular blocks
            larger), or the fraction of the ids in each block, most popular first (summing to 1).
        alpha: the power rule's temperature (>= 0): 0 gives every block ``base_dim``, larger
            values shrink the rare blocks faster.
        base_dim: dimension of the most popular block (1..D; default D unless ``budget`` is set).
        budget: fraction of the full table's bytes that the block tables, projections and id map
            may use; ``base_dim`` is scaled (alpha kept) to the largest value whose layout fits.
        dim_multiple: dims are rounded to multiples of this (at least one multiple, at most D);
            4 by default, as FBGEMM's fused kernels need widths divisible by 4; 1 = the exact rule.
        rank_by: ``counts``: the blocks follow the training counts (an id map unless that is id
            order); ``index``: they follow the id order (a vocabulary ranked by frequency, e.g.
            over the whole input before the split) and the counts only give their popularities.

    Example:
        >>> spec = TableSpec("item", 1000, 64, ("item",))
        >>> counts = 1000 // np.arange(1, 1001)
        >>> m = MixedDimension(blocks=4, alpha=0.5, dim_multiple=1).build(spec, TableStats(counts=counts))
        >>> m.sizes, m.dims
        ([250, 250, 250, 250], [64, 20, 13, 13])
        >>> MixedDimension(blocks=4, alpha=0.5).build(spec, TableStats(counts=counts)).dims
        [64, 20, 12, 12]
    """

    blocks: int | list[float] = 4
    alpha: float = 0.5
    base_dim: int | None = None
    budget: float | None = None
    dim_multiple: int = 4
    rank_by: str = "counts"

    def __post_init__(self):
        if isinstance(self.blocks, Integral) and not isinstance(self.blocks, bool):
            if self.blocks < 1:
                raise ConfigError(f"mixed_dim.blocks must be >= 1, got {self.blocks}")
        else:
            fractions = _as_fractions(self.blocks)
            if fractions is None or not fractions or any(not f > 0 for f in fractions) \
                    or abs(sum(fractions) - 1) > 1e-6:
                raise ConfigError(f"mixed_dim.blocks must be an integer >= 1 or a list of positive fractions "
                                  f"summing to 1, got {self.blocks!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, Real) or not self.alpha >= 0:
            raise ConfigError(f"mixed_dim.alpha must be a number >= 0, got {self.alpha!r}")
        if self.base_dim is not None and self.budget is not None:
            raise ConfigError(f"mixed_dim takes base_dim or budget, not both (got base_dim={self.base_dim}, "
                              f"budget={self.budget})")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, Real)
                                        or not self.budget > 0):
            raise ConfigError(f"mixed_dim.budget must be a number > 0 (a fraction of the full table's bytes), "
                              f"got {self.budget!r}")
        if self.base_dim is not None and (isinstance(self.base_dim, bool) or not isinstance(self.base_dim, Integral)
                                          or self.base_dim < 1):
            raise ConfigError(f"mixed_dim.base_dim must be an integer >= 1, got {self.base_dim!r}")
        if isinstance(self.dim_multiple, bool) or not isinstance(self.dim_multiple, Integral) or self.dim_multiple < 1:
            raise ConfigError(f"mixed_dim.dim_multiple must be an integer >= 1, got {self.dim_multiple!r}")
        if self.rank_by not in ("counts", "index"):
            raise ConfigError(f"mixed_dim.rank_by must be counts or index, got {self.rank_by!r}")

    def build(self, spec: TableSpec, stats: TableStats | None = None) -> MixedDimensionTables:
        n, dim = spec.num_embeddings, spec.dim
        if self.base_dim is not None and self.base_dim > dim:
            raise ConfigError(f"table '{spec.name}': mixed_dim.base_dim={self.base_dim} exceeds the table's "
                              f"dim={dim}; the projections map each block to D, so base_dim must be <= {dim}")
        counts = None if stats is None else stats.counts
        if counts is not None:
            counts = np.asarray(counts, dtype=np.float64)
            if counts.shape != (n,):
                raise DataError(f"table '{spec.name}': stats.counts has shape {counts.shape}, expected ({n},) "
                                f"(one count per row, index 0 = OOV)")
            order = (np.arange(n) if self.rank_by == "index"
                     else np.concatenate([[0], 1 + np.argsort(-counts[1:], kind="stable")]))
            probability = counts
        else:
            order = np.arange(n)
            probability = 1.0 / np.arange(1, n + 1)
        sizes = self._sizes(spec)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        slot = np.empty(n, dtype=np.int64)
        popularity = np.empty(len(sizes))
        for i in range(len(sizes)):
            members = np.sort(order[starts[i]:starts[i + 1]])
            slot[members] = np.arange(starts[i], starts[i + 1])
            popularity[i] = probability[members].mean()
        ratios = block_ratios(popularity, self.alpha)
        identity = bool((slot == np.arange(n)).all())
        if self.budget is None:
            dims = power_rule_dims(self.base_dim or dim, ratios, self.dim_multiple, dim)
        else:
            id_map = 0 if identity else n * torch.empty((), dtype=narrowest_int_dtype(n)).element_size()
            block_starts = 0 if len(sizes) == 1 else 8 * len(sizes)
            dims = self._budget_dims(spec, sizes, ratios, fixed_bytes=id_map + block_starts)
        return MixedDimensionTables(spec, sizes, dims.tolist(), None if identity else slot)

    def _sizes(self, spec: TableSpec) -> list[int]:
        n = spec.num_embeddings
        if isinstance(self.blocks, Integral):
            k = min(int(self.blocks), n)
            return [n // k + (1 if i < n % k else 0) for i in range(k)]
        edges = np.rint(np.cumsum([0.0, *_as_fractions(self.blocks)]) * n).astype(np.int64)
        edges[-1] = n
        sizes = np.diff(edges)
        if (sizes < 1).any():
            raise ConfigError(f"table '{spec.name}': mixed_dim.blocks {list(self.blocks)} leaves an empty block "
                              f"over {n} ids (block sizes {sizes.tolist()})")
        return sizes.tolist()

    def _budget_dims(self, spec: TableSpec, sizes: list[int], ratios: np.ndarray, fixed_bytes: int,
                     multiple: int | None = None) -> np.ndarray:
        """Block dims ``power_rule_dims(scale, ratios)`` for the largest scale in (0, D] whose tables,
        projections and id map (``fixed_bytes``) fit the budget, in multiples of ``dim_multiple`` or, when no
        such layout fits, of 1 (those blocks then run data-parallel on the dense kernel under the default sharding).

        The dims grow with the scale and only change where ``scale * ratio_i / dim_multiple``
        crosses a half-integer, so trying the scale just past each crossing (and the smallest
        scale, where every block has the smallest dim) tries every possible set of dims. The bytes
        are not monotone in the scale (a block reaching D drops its projection), hence the largest
        fitting scale rather than the costliest layout: it has the widest blocks.
        """
        dim, target, multiple = spec.dim, self.budget * spec.full_bytes, multiple or self.dim_multiple
        half = multiple * (np.arange(-(-dim // multiple)) + 0.5)
        crossings = (half[None, :] / ratios[ratios > 0][:, None]).ravel() * (1 + 1e-9)
        scales = np.sort(np.concatenate([[1e-9, dim], crossings[crossings <= dim]]))
        dims = power_rule_dims(scales[:, None], ratios[None, :], multiple, dim)  # (candidates, blocks)
        size = np.asarray(sizes)
        cost = 4 * (dims @ size + np.where(dims != dim, dims * dim, 0).sum(1)) + fixed_bytes
        feasible = cost <= target
        if not feasible.any() and multiple > 1:
            return self._budget_dims(spec, sizes, ratios, fixed_bytes, multiple=1)
        if not feasible.any():
            raise ConfigError(f"table '{spec.name}': mixed_dim.budget={self.budget} ({target:.0f} bytes) is below "
                              f"the smallest layout, {len(sizes)} blocks of dim {dims[0].min()} ({cost.min()} bytes, "
                              f"budget {cost.min() / spec.full_bytes:.4g}); use fewer blocks or a larger budget")
        return dims[np.flatnonzero(feasible)[-1]]


def block_ratios(popularity: np.ndarray, alpha: float) -> np.ndarray:
    """``(p_i / max_j p_j) ** alpha`` per block (all ones when no id was ever seen).

    Example:
        >>> block_ratios(np.array([0.4, 0.1, 0.0]), 0.5).tolist()
        [1.0, 0.5, 0.0]
    """
    top = popularity.max()
    if not top > 0:
        return np.ones_like(popularity)
    return np.power(popularity / top, alpha)


def _as_fractions(blocks) -> list[float] | None:
    try:
        values = list(blocks)
    except TypeError:
        return None
    if any(isinstance(v, bool) or not isinstance(v, Real) for v in values):
        return None
    return [float(v) for v in values]
