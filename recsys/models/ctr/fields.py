"""What the CTR models share: one table per sparse field, field stacking, MLP blocks, setting checks.

Shapes: B batch rows, F sparse fields, D embedding dimension, n_dense dense features.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn
from torchrec.modules.mlp import MLP

from recsys.data.schemas import CTRSchema
from recsys.embeddings.collection import CompressedEmbeddings
from recsys.embeddings.spec import Pooling, TableSpec
from recsys.models.settings import check, is_int, is_number

FIRST_ORDER_SUFFIX = "_linear"  # first-order tables are named <field>_linear
FIRST_ORDER_WIDTH = 4  # FBGEMM's fused kernels need widths divisible by 4; the row's sum is the weight


def field_specs(schema: CTRSchema, vocab_sizes: Mapping[str, int], dim: int,
                pooling: Pooling = "mean", suffix: str = "") -> list[TableSpec]:
    """One table per sparse field, named ``<field><suffix>``; multi-valued fields pool with ``pooling``.

    Args:
        schema: the CTR schema (single- then multi-valued fields, the KeyedJaggedTensor key order).
        vocab_sizes: rows per field (the vocabulary size, OOV index 0 included).
        dim: D, the width of every table.
        pooling: ``sum`` or ``mean`` over the ids of a multi-valued cell.
        suffix: appended to table names (``FIRST_ORDER_SUFFIX`` for DeepFM's first-order tables).

    Example:
        >>> [s.name for s in field_specs(CTRSchema(sparse=("user",), multi_valued=("tags",)), {"user": 5, "tags": 9}, 8)]
        ['user', 'tags']
    """
    check(pooling in ("sum", "mean"), "multi_valued_pooling", pooling, "sum or mean")
    return [TableSpec(f"{field}{suffix}", vocab_sizes[field], dim, (field,),
                      pooling="sum" if field in schema.sparse else pooling)
            for field in schema.sparse_features]


def embedding_dim(embeddings: CompressedEmbeddings) -> int:
    """D shared by every table of ``embeddings`` (the CTR models stack the fields)."""
    dims = {spec.dim for spec in embeddings.specs.values()}
    check(len(dims) == 1, "dim", sorted(dims), "one embedding dimension shared by every field table")
    return dims.pop()


def stack_fields(pooled: Mapping[str, torch.Tensor], features: Sequence[str]) -> torch.Tensor:
    """{feature: (B, D)} -> (B, F, D) in ``features`` order."""
    return torch.stack([pooled[f] for f in features], dim=1)


def check_layers(layers: Sequence[int], field: str) -> list[int]:
    """MLP hidden sizes as a list of ints >= 1 (empty allowed), or ConfigError naming ``model.<field>``."""
    layers = list(layers)
    check(all(is_int(size) for size in layers), field, layers, "a list of layer sizes >= 1")
    return layers


def check_dropout(dropout: float, field: str = "model.dropout") -> float:
    """``dropout`` as a float in [0, 1), or ConfigError naming ``model.<field>``."""
    check(is_number(dropout) and 0 <= dropout < 1, field, dropout, "a dropout probability in [0, 1)")
    return float(dropout)


def mlp(in_size: int, layers: Sequence[int], dropout: float = 0.0) -> nn.Module:
    """TorchRec's MLP with ReLU, then dropout, after every layer; identity when ``layers`` is empty.

    Example:
        >>> mlp(8, [16, 4], dropout=0.1)(torch.zeros(2, 8)).shape
        torch.Size([2, 4])
    """
    if not layers:
        return nn.Identity()
    if dropout == 0:
        return MLP(in_size, list(layers), activation="relu")
    return MLP(in_size, list(layers), activation=lambda: nn.Sequential(nn.ReLU(), nn.Dropout(dropout)))


def out_size(in_size: int, layers: Sequence[int]) -> int:
    """Width of ``mlp(in_size, layers)``'s output."""
    return layers[-1] if layers else in_size
