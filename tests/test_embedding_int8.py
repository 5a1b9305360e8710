"""Post-training int8 / int4 / fp16 quantization of a collection's plain tables (serving).

One float collection holds every path: pooled full tables (one of an odd dim, padded for
FBGEMM), double hashing (two streams into one table, mean pooling), GraphHash (an id map
buffer), an unpooled full table and a non-additive test method (per-id lookups, combined by a
product, then pooled) whose tables live in the ``EmbeddingCollection``.

Error bound of FBGEMM's row-wise quantizer, for a row x with min m and max M, L = 2**bits - 1:
the stored bias is b = fp16(m) and the stored step s = fp16((M - b) / L); each value is coded
q = clamp(round((x - b) / s), 0, L) and read back as s * q + b. Unclamped, the error is at
most s / 2. q clamps at 0 only when x < b - s / 2, i.e. x >= m lies below b: error b - x <= b - m.
q clamps at L only when x > b + s * (L + 1/2): error x - b - s * L <= M - b - s * L. So every
value of the row is within

    e_row = s / 2 + |b - m| + max(0, M - b - s * L)

(with exact fp16 rounding, e_row ~ (M - m) / L / 2, the brief's half step). fp16 rows are
within |x| * 2**-11 (+ 2**-25 for subnormals) of x. A looked-up vector of an additive method
sums the rows of its streams, so a pooled output element is within the sum of the bounds of the
rows its ids read (divided by the bag length for mean pooling), plus float32 summation noise.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor
from torchrec.sparse.jagged_tensor import JaggedTensor

from recsys.embeddings.base import Compression, Method, PlainTable
from recsys.embeddings.collection import CompressedEmbeddings, EmbeddingSettings
from recsys.embeddings.graph_hash import GraphHash
from recsys.embeddings.hashing import DoubleHashing
from recsys.embeddings.serving_quantization import TrimmedLookup, quantize_tables
from recsys.embeddings.spec import TableSpec, TableStats
from recsys.errors import ConfigError

N, D = 64, 8
BITS = {"int8": 8, "int4": 4}
MULTIPLE = {"int8": 2, "int4": 4}
"""FBGEMM quantizes whole 2-byte words of codes: dims are padded to these multiples."""
ROW_BYTES = {"int8": lambda d: -(-d // 2) * 2 + 4, "int4": lambda d: -(-d // 4) * 2 + 4, "fp16": lambda d: 2 * d}
"""Bytes of one quantized row of a table of dim d (codes of the padded dim + fp16 scale and bias)."""


class ProductTables(Method):
    """A non-additive test method: ``E_left[id % 8] * E_right[id // 8]`` (elementwise).

    Args:
        spec: the logical table.

    Example:
        >>> ProductTables(TableSpec("pair", 64, 8, ("pair",))).transform(torch.tensor([9]))
        [tensor([1]), tensor([1])]
    """

    additive = False

    def plain_tables(self) -> list[PlainTable]:
        spec = self.spec
        return [PlainTable("left", 8, spec.dim), PlainTable("right", spec.num_embeddings // 8 + 1, spec.dim)]

    def transform(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return [ids % 8, ids // 8]

    def combine(self, parts: list[torch.Tensor], ids: torch.Tensor | None) -> torch.Tensor:
        return parts[0] * parts[1]


@dataclass
class Product(Compression):
    def build(self, spec: TableSpec, stats: TableStats | None = None) -> ProductTables:
        return ProductTables(spec)


SPECS = [
    TableSpec("item", N, D, ("item", "neg_item")),                                  # full, pooled
    TableSpec("tag", N, 6, ("tag",)),                                               # odd dim: padded for int4
    TableSpec("user", N, D, ("user",), pooling="mean", compression=DoubleHashing(rows=24)),
    TableSpec("cluster", N, D, ("cluster",), compression=GraphHash()),
    TableSpec("hist", N, D, ("hist",), pooling="none"),                             # unpooled: EmbeddingCollection
    TableSpec("pair", N, D, ("pair",), compression=Product()),                      # non-additive: per-id path
]
ADDITIVE = ["item", "neg_item", "tag", "user", "cluster", "hist"]


@pytest.fixture(scope="module")
def emb() -> CompressedEmbeddings:
    torch.manual_seed(0)
    stats = {"cluster": TableStats(clusters=np.arange(N) % 8)}
    return CompressedEmbeddings(SPECS, EmbeddingSettings(init_scale=1.0), stats)


def batch(seed: int = 0, batch_size: int = 5) -> KeyedJaggedTensor:
    """Bags of 0-5 ids over every feature (bag 1 of the first feature is empty)."""
    keys = [f for s in SPECS for f in s.feature_names]
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 6, (len(keys) * batch_size,), generator=g)
    lengths[1] = 0
    values = torch.randint(0, N, (int(lengths.sum()),), generator=g)
    return KeyedJaggedTensor.from_lengths_sync(keys, values, lengths.int())


def values(out):
    return out.values() if isinstance(out, JaggedTensor) else out


def plain_rows(emb: CompressedEmbeddings) -> dict[str, torch.Tensor]:
    """Float rows of every plain table, by table name."""
    modules = emb.lookups()
    return {key.split(".")[-2]: value for m in modules for key, value in m.state_dict().items()}


def element_bounds(rows: torch.Tensor, dtype: str) -> torch.Tensor:
    """(R, d) float rows -> (R, d) bound on |dequantized - float| of each value (module docstring)."""
    if dtype == "fp16":
        return rows.abs() * 2.0**-11 + 2.0**-25
    levels = 2 ** BITS[dtype] - 1
    low, high = rows.min(1).values, rows.max(1).values
    bias = low.half().float()
    step = ((high - bias) / levels).half().float()
    bound = step / 2 + (bias - low).abs() + (high - bias - step * levels).clamp(min=0)
    return bound.unsqueeze(1).expand_as(rows)


def output_bounds(emb: CompressedEmbeddings, kjt: KeyedJaggedTensor, feature: str, dtype: str) -> torch.Tensor:
    """Bound on each output element of an additive feature: the summed bounds of the rows it reads."""
    spec = next(s for s in emb.specs.values() if feature in s.feature_names)
    method, rows = emb.methods[spec.name], plain_rows(emb)
    tables = [f"{spec.name}__{t.suffix}" for t in method.plain_tables()]
    ids, lengths = kjt[feature].values(), kjt[feature].lengths()
    per_id = torch.zeros(len(ids), spec.dim)
    for stream, table in zip(method.transform(ids), method.stream_tables()):
        valid = stream >= 0
        per_id[valid] += element_bounds(rows[tables[table]], dtype)[stream[valid]]
    if spec.pooling == "none":
        return per_id
    bag = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    pooled = torch.zeros(len(lengths), spec.dim).index_add_(0, bag, per_id)
    return pooled / lengths.clamp(min=1).unsqueeze(1) if spec.pooling == "mean" else pooled


def dequantized(emb: CompressedEmbeddings, dtype: str) -> CompressedEmbeddings:
    """A float copy of ``emb`` (in eval mode) whose rows are replaced by FBGEMM's own quantize ->
    dequantize of them."""
    ref = copy.deepcopy(emb).eval()
    for rows in plain_rows(ref).values():
        if dtype == "fp16":
            restored = rows.half().float()
        else:
            width = -(-rows.shape[1] // MULTIPLE[dtype]) * MULTIPLE[dtype]
            padded = torch.cat([rows, rows[:, -1:].expand(-1, width - rows.shape[1])], 1).contiguous()
            fused = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(padded, BITS[dtype])
            restored = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(fused, BITS[dtype])[:, :rows.shape[1]]
        with torch.no_grad():
            rows.copy_(restored)
    return ref


@pytest.mark.parametrize("dtype", ["int8", "int4", "fp16"])
def test_error_stays_within_the_quantization_step(emb, dtype):
    served = quantize_tables(emb, dtype)
    kjt = batch(1)
    with torch.no_grad():
        exact, approx = copy.deepcopy(emb).eval()(kjt), served(kjt)
    for feature in ADDITIVE:
        error = (values(approx[feature]) - values(exact[feature])).abs()
        bound = output_bounds(emb, kjt, feature, dtype)
        assert error.shape == bound.shape, feature
        assert torch.all(error <= bound + 1e-6), (feature, (error - bound).max().item())
        if dtype != "fp16":
            assert error.max() > 0, feature  # the rows really were quantized
    error = (approx["pair"] - exact["pair"]).abs()
    assert torch.all(error <= product_bounds(emb, kjt, dtype) + 1e-6)


def product_bounds(emb: CompressedEmbeddings, kjt: KeyedJaggedTensor, dtype: str) -> torch.Tensor:
    """Bound on the pooled ``pair`` outputs: |a'b' - ab| <= |a| e_b + |b| e_a + e_a e_b per id."""
    rows, ids, lengths = plain_rows(emb), kjt["pair"].values(), kjt["pair"].lengths()
    a, b = rows["pair__left"][ids % 8], rows["pair__right"][ids // 8]
    e_a = element_bounds(rows["pair__left"], dtype)[ids % 8]
    e_b = element_bounds(rows["pair__right"], dtype)[ids // 8]
    bag = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    return torch.zeros(len(lengths), D).index_add_(0, bag, a.abs() * e_b + b.abs() * e_a + e_a * e_b)


@pytest.mark.parametrize("dtype", ["int8", "int4", "fp16"])
def test_every_method_reads_fbgemm_dequantized_rows(emb, dtype):
    """Pooled, unpooled, hashed, clustered, padded and non-additive lookups all equal the float
    collection run on FBGEMM's quantize -> dequantize of its rows."""
    served, reference = quantize_tables(emb, dtype), dequantized(emb, dtype)
    kjt = batch(2)
    with torch.no_grad():
        got, want = served(kjt), reference(kjt)
    assert set(got) == set(want)
    for feature in want:
        assert type(got[feature]) is type(want[feature]), feature
        torch.testing.assert_close(values(got[feature]), values(want[feature]), rtol=1e-5, atol=1e-6)
        if isinstance(want[feature], JaggedTensor):
            assert torch.equal(got[feature].lengths(), want[feature].lengths())
    assert torch.count_nonzero(got["item"][1]) == 0  # the empty bag pools to zeros


OTHER_METHODS = {
    "quotient_remainder_mult": ("recsys.embeddings.compositional", "QuotientRemainder", dict(collisions=8)),
    "compositional_concat": ("recsys.embeddings.compositional", "Compositional",
                             dict(partitions=[4, 4, 4], combiner="concat")),           # dims 4, 3, 3
    "mixed_dim": ("recsys.embeddings.mixed_dim", "MixedDimension", dict(blocks=3)),      # dims 10, 4, 3
    "product_quantization": ("recsys.embeddings.quantization", "ProductQuantization",
                             dict(subspaces=2, codewords=16)),
    "frequency_hashing": ("recsys.embeddings.hashing", "FrequencyHashing", dict(private=8, rows=16)),
    "hash_embedding": ("recsys.embeddings.hashing", "MultiHash", dict(k=2, rows=16, importance=True)),
    "low_rank": ("recsys.embeddings.low_rank", "LowRank", dict(rank=3)),                  # dim 3
    "tensor_train": ("recsys.embeddings.tensor_train", "TensorTrain", dict(rank=2)),     # cores 10, 4, 4 wide
}


@pytest.mark.parametrize("dtype", ["int8", "int4", "fp16"])
@pytest.mark.parametrize("method", sorted(OTHER_METHODS))
def test_other_compression_methods_read_dequantized_rows(method, dtype):
    """Every other method's tables (dims 3-10, padded where FBGEMM needs it) are quantized alike."""
    module, name, kwargs = OTHER_METHODS[method]
    compression = getattr(pytest.importorskip(module), name)(**kwargs)
    torch.manual_seed(0)
    counts = (1000 / np.arange(1, N + 1)).astype(np.int64)
    emb = CompressedEmbeddings([TableSpec("item", N, 10, ("item",))], EmbeddingSettings(compression, init_scale=1.0),
                               {"item": TableStats(counts=counts)})
    served, reference = quantize_tables(emb, dtype), dequantized(emb, dtype)
    kjt = KeyedJaggedTensor.from_lengths_sync(["item"], torch.arange(3, 63, 5), torch.tensor([3, 0, 4, 5]).int())
    with torch.no_grad():
        torch.testing.assert_close(served(kjt)["item"], reference(kjt)["item"], rtol=1e-5, atol=1e-6)
    method_module = emb.methods["item"]
    rows = sum(t.rows * ROW_BYTES[dtype](t.dim) for t in method_module.plain_tables())
    assert served.memory()["item"] == rows + method_module.extra_memory()


def test_swaps_in_torchrec_quantized_modules_and_leaves_the_float_collection(emb):
    kjt = batch(3)
    before = {k: values(v).clone() for k, v in emb(kjt).items()}
    int8, int4 = quantize_tables(emb, "int8"), quantize_tables(emb, "int4")
    assert type(int8.bags).__module__ == "torchrec.quant.embedding_modules"
    assert all(type(m).__module__ == "torchrec.quant.embedding_modules" for m in int8.sequences.values())
    assert isinstance(int4.bags, TrimmedLookup)  # the 6-dim table was padded to 8 for int4
    assert not int8.training and not any(p.requires_grad for p in int8.parameters())
    assert type(emb.bags).__module__ == "torchrec.modules.embedding_modules" and emb.training
    for key, value in emb(kjt).items():
        torch.testing.assert_close(values(value), before[key], rtol=0, atol=0)
    expected = (r"collection.bags is a torchrec.quant.embedding_modules.EmbeddingBagCollection, "
                r"expected torchrec.modules.embedding_modules.EmbeddingBagCollection")
    with pytest.raises(ConfigError, match=expected):
        quantize_tables(int8, "int4")


@pytest.mark.parametrize("dtype", ["int8", "int4", "fp16"])
def test_memory_is_the_bytes_of_the_quantized_rows(emb, dtype):
    served = quantize_tables(emb, dtype)
    memory = served.memory()
    for spec in SPECS:
        method = emb.methods[spec.name]
        rows = sum(t.rows * ROW_BYTES[dtype](t.dim) for t in method.plain_tables())
        assert memory[spec.name] == rows + method.extra_memory(), spec.name
    # FBGEMM allocates exactly these rows, plus < 128 bytes of cache-line padding per table.
    allocated, tables = 0, 0
    for module in served.lookups():
        module = module.tables if isinstance(module, TrimmedLookup) else module
        allocated += sum(tbe.weights_host.numel() for tbe in module._emb_modules)
        tables += len(module.state_dict())
    stored = sum(memory.values()) - sum(m.extra_memory() for m in emb.methods.values())
    assert stored <= allocated < stored + 128 * tables


@pytest.mark.parametrize("dtype, ratio", [("int8", 4 * 64 / 68), ("int4", 4 * 64 / 36), ("fp16", 2.0)])
def test_memory_shrinks_by_the_bit_width(dtype, ratio):
    """A 512 x 64 table: int8 rows are 64 + 4 bytes (3.8x smaller than 256), int4 rows 32 + 4 (7.1x), fp16 2x."""
    torch.manual_seed(0)
    full = CompressedEmbeddings([TableSpec("item", 512, 64, ("item",))])
    served = quantize_tables(full, dtype)
    assert full.memory()["item"] == 512 * 64 * 4
    assert full.memory()["item"] / served.memory()["item"] == pytest.approx(ratio)
    assert ratio >= {"int8": 3.7, "int4": 7.0, "fp16": 2.0}[dtype]


@pytest.mark.parametrize("dtype", ["int2", "float32", "INT8", None])
def test_unknown_dtype_is_a_config_error(emb, dtype):
    with pytest.raises(ConfigError, match=rf"dtype must be one of \['fp16', 'int4', 'int8'\], got {dtype!r}"):
        quantize_tables(emb, dtype)


def test_only_collections_are_quantized():
    with pytest.raises(ConfigError, match="expected a CompressedEmbeddings, got Linear"):
        quantize_tables(torch.nn.Linear(2, 2), "int8")


@pytest.mark.parametrize("dtype", ["int8", "int4", "fp16"])
def test_quantized_items_score_as_their_looked_up_vectors(emb, dtype):
    quantized = quantize_tables(emb, dtype)
    table = next(s for s in quantized.specs.values() if s.pooling != "none")
    ids = torch.arange(table.num_embeddings)
    feature = table.feature_names[0]
    vectors = quantized(KeyedJaggedTensor.from_lengths_sync([feature], ids, torch.ones(len(ids), dtype=torch.int32)))
    queries = torch.randn(2, table.dim, generator=torch.Generator().manual_seed(0))
    got = torch.cat([scores for _, scores in quantized.item_scores(table.name, queries, chunk=10)], dim=1)
    torch.testing.assert_close(got, queries @ vectors[feature].float().T)
