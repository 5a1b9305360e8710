"""The contract every compression method follows: id transform, plain tables, combiner.

A method turns each id of its logical table into S id *streams* (one lookup each, or none where
the stream id is -1); each stream reads one of its plain TorchRec tables; the combiner turns
the S looked-up vectors into one D-dimensional vector. When the combiner is *additive* (a sum
of per-stream linear maps, e.g. sum, concat or projections), it commutes with sum pooling and
the collection pools inside FBGEMM's kernels; otherwise ids are looked up one by one, combined,
then pooled.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
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

    def initial_weights(self) -> dict[str, torch.Tensor]:
        """Starting rows of some plain tables, by suffix (e.g. k-means codebooks); others start uniform."""
        return {}

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


class Compression(ABC):
    """Base of the method configs: ``build(spec, stats)`` returns the ``Method``."""

    @abstractmethod
    def build(self, spec: TableSpec, stats: TableStats | None = None) -> Method:
        """The method module for ``spec`` (``stats`` carries frequencies or clusters if needed)."""
