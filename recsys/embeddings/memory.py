"""Memory of embedding tables, measured from the real tensors (sharded or not)."""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.tensor_types import UIntXTensor

TABLE_KEY = re.compile(r"(?:^|\.)(?:embedding_bags|embeddings)\.([^.]+)\.weight$")


def narrowest_int_dtype(n: int) -> torch.dtype:
    """The smallest integer dtype holding the values 0..n-1 (uint8, int16, int32 or int64)."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if n - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes held by ``tensor`` on this rank (local shards of a ShardedTensor / DTensor; the packed
    bytes of TorchRec's int4 / int2 ``UIntXTensor``, whose shape counts sub-byte values)."""
    if isinstance(tensor, UIntXTensor):
        tensor = tensor.elem
    if isinstance(tensor, ShardedTensor):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in tensor.local_shards())
    if hasattr(tensor, "to_local"):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def table_memory(module: nn.Module) -> dict[str, int]:
    """Bytes per embedding table of ``module``, summed over all ranks.

    Tables are the state-dict entries of TorchRec embedding modules (``...embedding_bags.<t>.weight``
    or ``...embeddings.<t>.weight``); the key is the table name.

    Example:
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        >>> config = EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["f"])
        >>> ebc = EmbeddingBagCollection([config])
        >>> table_memory(ebc)
        {'t': 160}
    """
    sizes: dict[str, int] = {}
    for key, value in module.state_dict().items():
        if match := TABLE_KEY.search(key):
            sizes[match[1]] = sizes.get(match[1], 0) + tensor_bytes(value)
    if dist.is_initialized() and dist.get_world_size() > 1 and sizes:
        names = sorted(sizes)
        totals = torch.tensor([sizes[n] for n in names], dtype=torch.int64)
        dist.all_reduce(totals)
        sizes = dict(zip(names, totals.tolist()))
    return sizes
