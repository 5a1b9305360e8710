"""The contract every compression method follows: id transform, plain tables, combiner.

A method turns each id of its logical table into S id *streams* (one lookup each, or none where
the stream id is -1); each stream reads one of its plain TorchRec tables; the combiner turns
the S looked-up vectors into one D-dimensional vector. When the combiner is *additive* (a sum
of per-stream linear maps, e.g. sum, concat or projections), it commutes with sum pooling and
the collection pools inside FBGEMM's kernels; otherwise ids are looked up one by one, combined,
then pooled.

Items are scored in their stored form (``item_scores``): for an additive combiner, the inner product of a
query q with an id's vector is a sum over its streams of ``u_s . row_s`` with ``u_s`` the combiner's adjoint
applied to q (``stream_queries``), so every stored row is scored once and the ids gather their rows' scores;
other combiners decode ids chunk by chunk.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from recsys.embeddings.memory import tensor_bytes
from recsys.embeddings.spec import TableSpec, TableStats


@dataclass(frozen=True)
class PlainTable:
    """One plain TorchRec table of a method: ``rows`` x ``dim``, named ``<table>__<suffix>``."""

    suffix: str
    rows: int
    dim: int


class Method(nn.Module, ABC):
    """Base of the compression methods (see the module docstring).

    Subclasses set ``additive`` and implement ``plain_tables``, ``stream_tables``, ``transform``
    and ``combine``; buffers (id maps, codes) and combiner parameters live on the module.

    Args:
        spec: the logical table.
    """

    additive: ClassVar[bool] = True
    partial_streams: ClassVar[bool] = False  # transform may give -1: an id that reads no row of that stream

    def __init__(self, spec: TableSpec):
        super().__init__()
        self.spec = spec

    @abstractmethod
    def plain_tables(self) -> list[PlainTable]:
        """The plain tables this method stores."""

    def stream_tables(self) -> list[int]:
        """For each stream, the index of the plain table it reads."""
        return list(range(len(self.plain_tables())))

    @abstractmethod
    def transform(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """(n,) logical ids -> one (n,) int64 tensor per stream; -1 = no lookup in that stream."""

    @abstractmethod
    def combine(self, parts: list[torch.Tensor], ids: torch.Tensor | None) -> torch.Tensor:
        """Per-stream vectors (rows x d_s each) -> (rows, D).

        For additive methods the rows are pooled bags and ``ids`` is None; otherwise the rows are
        single ids and ``ids`` holds them.
        """

    def stream_queries(self, queries: torch.Tensor) -> list[torch.Tensor] | None:
        """Per stream s, the (B, d_s) vectors u_s with ``q . combine(parts) = sum_s u_s . parts[s]`` for (B, D)
        queries q (the combiner's adjoint), or None when the combiner is not linear in the parts."""
        return None

    def decode(self, ids: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        """(n,) ids -> (n, D) vectors from the plain tables' rows ``weights`` (``plain_tables`` order), as the
        collection looks up single ids."""
        parts = [_rows(weights[t], stream) for stream, t in zip(self.transform(ids), self.stream_tables())]
        return self.combine(parts, ids)

    def item_scores(self, queries: torch.Tensor, weights: list[torch.Tensor], chunk: int = 65536
                    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Inner products of (B, D) ``queries`` with every id's vector, computed from the stored rows: yields
        ``(start, (B, n) scores of ids start .. start + n - 1)`` for consecutive chunks of at most ``chunk`` ids.

        With ``stream_queries`` (a combiner linear in the parts), each stream scores its table's rows once, giving
        a lookup table of (rows, B) scores, and every id sums its rows' scores in one fused ``embedding_bag`` (the PQ
        asymmetric scan; for hashing and mixed dimensions the same). Otherwise, or when the lookup table would pass
        ``PRECOMPUTED_SCORES``, a chunk of ids is decoded (n x D) and multiplied.

        Args:
            queries: (B, D) query vectors.
            weights: rows of each plain table, in ``plain_tables`` order.
            chunk: ids per yielded block.
        """
        adjoint = self.stream_queries(queries)
        n = self.spec.num_embeddings
        rows = [weights[t] for t in self.stream_tables()]
        if adjoint is None or len(queries) * sum(len(r) for r in rows) > PRECOMPUTED_SCORES:
            for start in range(0, n, chunk):
                yield start, queries @ self.decode(torch.arange(start, min(start + chunk, n)), weights).T
            return
        lookup = torch.cat([r @ u.T for u, r in zip(adjoint, rows)] + [queries.new_zeros(1, len(queries))])
        pad = len(lookup) - 1  # a zero row: what an id outside a stream reads
        offsets = torch.tensor([0] + [len(r) for r in rows[:-1]]).cumsum(0).int()  # int32 indices: half the traffic
        for start in range(0, n, chunk):
            stream_rows = self.stream_rows(start, min(start + chunk, n))
            index = stream_rows.int() + offsets
            if self.partial_streams:
                index = index.masked_fill_(stream_rows < 0, pad)
            yield start, F.embedding_bag(index, lookup, mode="sum").T  # (n, B): one pass over the ids

    def stream_rows(self, start: int, stop: int) -> torch.Tensor:
        """(n, S) rows each of the ids ``start .. stop - 1`` reads in each stream, -1 for none (``transform``: item
        scoring walks every id in ranges); methods that keep per-id state (e.g. PQ codes) slice it instead."""
        return torch.stack(self.transform(torch.arange(start, stop)), dim=1)

    def exported(self, weights: list[torch.Tensor]) -> Compression | None:
        """The compression that serves this trained table in less memory than training needs, built with the
        trained tensors (``weights``: the plain tables' rows), or None when the trained form is what serves."""
        return None

    def budget_bytes(self) -> int:
        """Bytes this table counts against a budget shared with other tables: its plain tables as float32 and
        its buffers and parameters."""
        return sum(4 * t.rows * t.dim for t in self.plain_tables()) + self.extra_memory()

    def rebuild_stats(self) -> dict[str, torch.Tensor]:
        """``TableStats`` fields (e.g. ``clusters``) that rebuild this exact method without the training data, for
        model packages; empty when the config and the stored counts suffice."""
        return {}

    def initial_weights(self) -> dict[str, torch.Tensor]:
        """Starting rows of some plain tables, by suffix (e.g. k-means codebooks); others start from ``init_fn``."""
        return {}

    def init_fn(self, table: PlainTable, init_scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """How plain table ``table`` starts when ``initial_weights`` does not give its rows: an in-place init of
        i.i.d. entries (so DMP can run it on any shard). Uniform in ±init_scale / sqrt(dim) by default; methods
        whose combiner multiplies tables (e.g. tensor-train cores) scale it so decoded rows start like a full
        table's."""
        bound = init_scale / table.dim**0.5
        return lambda weight: nn.init.uniform_(weight, -bound, bound)

    def auxiliary_loss(self) -> torch.Tensor | None:
        """A loss term the method adds to training (e.g. VQ commitment), from the last forward."""
        return None

    def extra_memory_parts(self) -> dict[str, int]:
        """Bytes held besides the plain tables, by kind and name: id maps and codes (buffers),
        combiner parameters (e.g. projections)."""
        return {**{f"buffer/{n}": tensor_bytes(t) for n, t in self.named_buffers()},
                **{f"parameter/{n}": tensor_bytes(t) for n, t in self.named_parameters()}}

    def extra_memory(self) -> int:
        """Total bytes held besides the plain tables."""
        return sum(self.extra_memory_parts().values())


PRECOMPUTED_SCORES = 1 << 22  # B x (rows of all streams) up to this: one lookup table of stream scores (16 MiB)


def _rows(table: torch.Tensor, stream: torch.Tensor) -> torch.Tensor:
    """Rows of ``table`` at ``stream`` ids, zero where the stream has no lookup (-1)."""
    valid = stream >= 0
    rows = table[stream.clamp(min=0)]
    return rows if bool(valid.all()) else rows * valid.unsqueeze(1).to(rows.dtype)


class Compression(ABC):
    """Base of the method configs: ``build(spec, stats)`` returns the ``Method``."""

    @abstractmethod
    def build(self, spec: TableSpec, stats: TableStats | None = None) -> Method:
        """The method module for ``spec`` (``stats`` carries frequencies or clusters if needed)."""

    def stored(self) -> Compression:
        """This config as a package's JSON stores it: tensors it carries (e.g. PQ codes) travel in the package's
        weights instead, and the config builds a module of the same shapes for them to load into."""
        return self
