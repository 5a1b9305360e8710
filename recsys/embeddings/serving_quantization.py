"""Post-training quantization of a collection's plain tables for inference (int8, int4, fp16).

``quantize_tables`` swaps the collection's plain TorchRec tables (the ``bags``
``EmbeddingBagCollection`` and the ``sequences`` ``EmbeddingCollection``) for their quantized
TorchRec counterparts (``torchrec.quant.embedding_modules``), which FBGEMM's
``IntNBitTableBatchedEmbeddingBagsCodegen`` kernels run on CPU or GPU. The id transforms,
buffers and combiners of the compression methods are left as they are, so every method
(full, hashing, GraphHash, compositional, mixed dimension, PQ codebooks, ...) is quantized the
same way: only its plain tables change precision, and lookups come back as float32 vectors for
the combiner. Export training-time methods first (``DifferentiableVQ`` to product quantization):
a table only training reads is quantized, stored and counted like the others.

Row formats (FBGEMM's, one row per id; ``D`` = the table's dim):

- ``int8``: D uint8 codes plus a float16 scale and bias (4 bytes) per row;
  ``x ~ scale * q + bias`` with ``bias = fp16(min(row))``,
  ``scale = fp16((max(row) - bias) / (2**bits - 1))``, ``q = round((x - bias) / scale)``.
- ``int4``: the same with 4-bit codes, two per byte: D / 2 + 4 bytes per row.
- ``fp16``: D float16 values (2 D bytes) per row.

FBGEMM's quantizer needs whole 2-byte words of codes: D even for int8, D a multiple of 4 for
int4. A table of another dim is padded on the right by repeating its last column (which keeps
each row's min and max, so the step is unchanged); the padded columns are stored (and counted
by ``memory()``) but cut from every lookup. Rows are packed without alignment padding on CPU
(FBGEMM's CPU default; TorchRec's ``from_float`` would pad every row to 16 bytes) and aligned to
16 bytes on GPU.

The result is a new inference-only collection (``eval()``, no gradients); the float collection
is left untouched. ``memory()`` of the result reports the bytes of the quantized rows, scale
and bias included, read from the quantized tensors themselves.

A model trained under DistributedModelParallel is first brought to one process: build the same
model unsharded (same specs, settings and stats, on CPU), load the trained weights into its
``state_dict()`` (DCP checkpoints reshard to any number of processes, one included), then
quantize its collection::

    model = MatrixFactorization(CompressedEmbeddings(specs, settings, stats))   # unsharded
    checkpoint.load(path, {"model": model.state_dict()})                        # keys as saved
    model.embeddings = quantize_tables(model.embeddings, "int8")
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.embedding_configs import dtype_to_data_type
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.quant.embedding_modules import EmbeddingCollection as QuantEmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from recsys.embeddings.collection import CompressedEmbeddings
from recsys.errors import ConfigError

QuantDtype = Literal["int8", "int4", "fp16"]

# dtype name -> (TorchRec's weight dtype, bits per value, multiple of the dim FBGEMM quantizes)
FORMATS: dict[str, tuple[torch.dtype, int, int]] = {
    "int8": (torch.quint8, 8, 2),
    "int4": (torch.quint4x2, 4, 4),
    "fp16": (torch.float16, 16, 1),
}
SCALE_BIAS_BYTES = 4
"""Bytes of the float16 scale and bias stored in every int8 / int4 row."""


def quantize_tables(collection: CompressedEmbeddings, dtype: QuantDtype) -> CompressedEmbeddings:
    """An inference copy of ``collection`` whose plain tables are row-wise quantized.

    Args:
        collection: a plain (unsharded) float collection; it is not modified.
        dtype: ``int8`` or ``int4`` (row-wise codes with a float16 scale and bias per row) or
            ``fp16``.

    Returns:
        A ``CompressedEmbeddings`` in eval mode, without gradients, giving float32 outputs of
        the same shapes as ``collection``; its ``bags`` / ``sequences`` are TorchRec's quantized
        ``EmbeddingBagCollection`` / ``EmbeddingCollection`` (inside a ``TrimmedLookup`` when a
        table's dim was padded).

    Example:
        >>> emb = CompressedEmbeddings([TableSpec("item", 100, 8, ("item",))])
        >>> served = quantize_tables(emb, "int8")
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["item"], torch.tensor([1, 2, 3]), torch.tensor([2, 1]))
        >>> served(kjt)["item"].shape, served.memory()["item"], emb.memory()["item"]
        (torch.Size([2, 8]), 1200, 3200)
    """
    if dtype not in FORMATS:
        raise ConfigError(f"quantize_tables: dtype must be one of {sorted(FORMATS)}, got {dtype!r}")
    if not isinstance(collection, CompressedEmbeddings):
        raise ConfigError(f"quantize_tables: expected a CompressedEmbeddings, got {type(collection).__name__} "
                          f"(unwrap a DistributedModelParallel model to its unsharded collection first)")
    modules = [("bags", collection.bags, EmbeddingBagCollection)]
    modules += [(f"sequences.{d}", m, EmbeddingCollection) for d, m in collection.sequences.items()]
    for name, module, expected in modules:
        if module is not None and type(module) is not expected:
            raise ConfigError(
                f"quantize_tables: collection.{name} is a {_qualname(type(module))}, expected {_qualname(expected)}; "
                f"quantize an unsharded float collection (load a sharded model's state dict into an unsharded "
                f"CompressedEmbeddings first; an already quantized one cannot be re-quantized)")
    # Deep-copy everything but the float tables (the memo maps them to None), then swap them in.
    skip = {id(m): None for m in collection.lookups()}
    quantized = copy.deepcopy(collection, skip)
    quantized.bags = None if collection.bags is None else _quantize(collection.bags, dtype)
    quantized.sequences = nn.ModuleDict({d: _quantize(m, dtype) for d, m in collection.sequences.items()})
    quantized.requires_grad_(False)
    return quantized.eval()


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _quantize(module: EmbeddingBagCollection | EmbeddingCollection, dtype: str) -> nn.Module:
    """TorchRec's quantized twin of a float EBC / EC (wrapped in ``TrimmedLookup`` if dims were padded)."""
    weight_dtype, bits, multiple = FORMATS[dtype]
    pooled = isinstance(module, EmbeddingBagCollection)
    configs = copy.deepcopy(module.embedding_bag_configs() if pooled else module.embedding_configs())
    prefix = "embedding_bags" if pooled else "embeddings"
    state = module.state_dict()
    weights, dims = {}, {}
    device = torch.device("cpu")
    for config in configs:
        rows = state[f"{prefix}.{config.name}.weight"].detach()
        if rows.is_meta:
            raise ConfigError(f"quantize_tables: table '{config.name}' is on the meta device (not materialised); "
                              f"load trained weights into a collection built on a real device first")
        device = rows.device
        width = -(-config.embedding_dim // multiple) * multiple
        if width != config.embedding_dim:
            rows = torch.cat([rows, rows[:, -1:].expand(-1, width - config.embedding_dim)], dim=1)
            dims.update({f: config.embedding_dim for f in config.feature_names})
            config.embedding_dim = width
        config.data_type = dtype_to_data_type(weight_dtype)
        weights[config.name] = _fused_rows(rows, bits)
    common = dict(device=device, output_dtype=torch.float, table_name_to_quantized_weights=weights,
                  row_alignment=1 if device.type == "cpu" else 16)
    if pooled:
        quantized = QuantEmbeddingBagCollection(configs, is_weighted=module.is_weighted(), **common)
    else:
        quantized = QuantEmbeddingCollection(configs, need_indices=False, **common)
    return TrimmedLookup(quantized, dims) if dims else quantized


def _fused_rows(rows: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(R, D) float rows -> (uint8 codes (R, D * bits / 8), uint8 fp16 scale+bias (R, 4) or None)."""
    rows = rows.float().contiguous()
    if bits == 16:
        return rows.half().view(torch.uint8), None
    fused = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(rows, bits)
    return fused[:, :-SCALE_BIAS_BYTES], fused[:, -SCALE_BIAS_BYTES:]


class TrimmedLookup(nn.Module):
    """A quantized TorchRec collection whose tables were padded to a dim FBGEMM quantizes; every
    lookup is cut back to its table's dim.

    Args:
        tables: TorchRec's quantized ``EmbeddingBagCollection`` or ``EmbeddingCollection``.
        dims: true dim of each padded feature (features not listed are returned as they are).

    Example:
        >>> emb = CompressedEmbeddings([TableSpec("tag", 10, 6, ("tag",))])
        >>> served = quantize_tables(emb, "int4")           # 6 columns padded to 8
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["tag"], torch.tensor([1, 2]), torch.tensor([2]))
        >>> type(served.bags).__name__, served(kjt)["tag"].shape
        ('TrimmedLookup', torch.Size([1, 6]))
    """

    def __init__(self, tables: nn.Module, dims: dict[str, int]):
        super().__init__()
        self.tables = tables
        self.dims = dict(dims)

    def forward(self, features: KeyedJaggedTensor) -> dict[str, torch.Tensor | JaggedTensor]:
        """features -> {feature: (B, d) pooled vectors or a JaggedTensor of (n_ids, d)}."""
        result = self.tables(features)
        result = result.to_dict() if hasattr(result, "to_dict") else result
        out = {}
        for key, value in result.items():
            dim = self.dims.get(key)
            if dim is None:
                out[key] = value
            elif isinstance(value, JaggedTensor):
                out[key] = JaggedTensor(values=value.values()[:, :dim], lengths=value.lengths())
            else:
                out[key] = value[:, :dim]
        return out
