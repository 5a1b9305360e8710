"""Tensor-train (TT-Rec) tables: the contract, decoded rows against the explicit reconstruction of hand-made and
TT-SVD cores, the digits, the shapes and the budget's rank, the starting variance, errors, one MF epoch."""

import math

import pytest
import torch
from hydra.utils import instantiate
from torchrec import KeyedJaggedTensor

from recsys.embeddings.collection import CompressedEmbeddings, EmbeddingSettings
from recsys.embeddings.full import Full
from recsys.embeddings.memory import TABLE_KEY
from recsys.embeddings.spec import TableSpec
from recsys.embeddings.tensor_train import TensorTrain, dim_factors, row_factors, tt_bytes
from recsys.errors import ConfigError
from recsys.inference.package import from_config, to_config
from tests.embedding_contract import N, D, mf_one_epoch, EmbeddingContract


class TestTensorTrain(EmbeddingContract):
    def compression(self, spec):  # row_shape (4, 4, 4), dim_shape (2, 2, 2)
        return TensorTrain(rank=4)


class TestTensorTrainShapes(EmbeddingContract):
    def compression(self, spec):  # 75 >= 64 ids: core 0 keeps ceil(64 / 25) = 3 rows
        return TensorTrain(rank=3, row_shape=[3, 5, 5], dim_shape=[2, 1, 4])


class TestTensorTrainBudget(EmbeddingContract):
    def compression(self, spec):
        return TensorTrain(budget=0.5, rank_multiple=1)


def _load_cores(emb: CompressedEmbeddings, table: str, cores: list[torch.Tensor]) -> None:
    """Copies (R_k, r_{k-1}, d_k, r_k) cores into the method's plain tables core0..core2."""
    weights = {match[1]: v for k, v in emb.state_dict().items() if (match := TABLE_KEY.search(k))}
    with torch.no_grad():
        for k, core in enumerate(cores):
            weights[f"{table}__core{k}"].copy_(core.reshape(core.shape[0], -1))


def _reconstruct(cores: list[torch.Tensor], n: int) -> torch.Tensor:
    """The explicit (N, D) table of (n_k, r_{k-1}, d_k, r_k) cores, id and column digits most significant first."""
    g0, g1, g2 = cores
    full = torch.einsum("iaxb,jbyc,kczd->ijkxyz", g0, g1, g2)  # a = d = 0: the outer ranks are 1
    return full.reshape(-1, full.shape[3] * full.shape[4] * full.shape[5])[:n]


def _decoded(emb: CompressedEmbeddings, table: str, n: int) -> dict[str, torch.Tensor]:
    """Every id's vector two ways: one-id bags through the collection, and ``vectors`` (decoded from the rows)."""
    ids = torch.arange(n)
    feature = emb.specs[table].feature_names[0]
    with torch.no_grad():
        bags = emb(KeyedJaggedTensor.from_lengths_sync([feature], ids, torch.ones(n, dtype=torch.int32)))[feature]
    return {"bags": bags, "vectors": emb.vectors(table, ids)}


@pytest.mark.parametrize("row_shape, dim_shape, rank", [((4, 4, 4), (2, 2, 2), 4), ((3, 5, 7), (3, 1, 4), 2),
                                                        ((2, 9, 4), (1, 6, 2), 5)])
def test_decoded_rows_equal_the_explicit_reconstruction_of_hand_made_cores(row_shape, dim_shape, rank):
    n, dim = math.prod(row_shape) - 3, math.prod(dim_shape)  # padded: the last 3 digit tuples are no id
    spec = TableSpec("item", n, dim, ("item",))
    emb = CompressedEmbeddings([spec], EmbeddingSettings(default=TensorTrain(rank=rank, row_shape=list(row_shape),
                                                                             dim_shape=list(dim_shape))))
    g = torch.Generator().manual_seed(0)
    ranks = [1, rank, rank, 1]
    cores = [torch.randn(row_shape[k], ranks[k], dim_shape[k], ranks[k + 1], generator=g) for k in range(3)]
    _load_cores(emb, "item", cores)
    expected = _reconstruct(cores, n)
    for how, got in _decoded(emb, "item", n).items():
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{how}: {m}")
    queries = torch.randn(4, dim, generator=g)
    scores = torch.cat([s for _, s in emb.item_scores("item", queries, chunk=7)], dim=1)
    torch.testing.assert_close(scores, queries @ expected.T, rtol=1e-4, atol=1e-4)


def _tt_svd(table: torch.Tensor, row_shape, dim_shape, rank: int) -> list[torch.Tensor]:
    """TT-SVD (Oseledets 2011) of an (N, D) table as a TT matrix: (n_k, r_{k-1}, d_k, r_k) cores of rank <= ``rank``."""
    (n0, n1, n2), (d0, d1, d2) = row_shape, dim_shape
    tensor = table.reshape(n0, n1, n2, d0, d1, d2).permute(0, 3, 1, 4, 2, 5)  # (i0 j0)(i1 j1)(i2 j2)
    u, s, vh = torch.linalg.svd(tensor.reshape(n0 * d0, -1), full_matrices=False)
    g0 = u[:, :rank].reshape(n0, d0, rank)
    rest = (s[:rank, None] * vh[:rank]).reshape(rank * n1 * d1, n2 * d2)
    u, s, vh = torch.linalg.svd(rest, full_matrices=False)
    g1 = u[:, :rank].reshape(rank, n1, d1, rank)
    g2 = (s[:rank, None] * vh[:rank]).reshape(rank, n2, d2)
    return [g0.unsqueeze(1), g1.permute(1, 0, 2, 3), g2.permute(1, 0, 2).unsqueeze(3)]


def test_tt_svd_of_an_exactly_low_tt_rank_table_is_decoded_exactly():
    """A table made of rank-3 cores has TT rank <= 3: its TT-SVD at rank 3 loaded into the plain tables reproduces
    every row (so the digits, the column order and the contraction agree with the textbook TT matrix)."""
    row_shape, dim_shape, rank = (4, 3, 5), (2, 2, 4), 3
    g = torch.Generator().manual_seed(1)
    ranks = [1, rank, rank, 1]
    made = [torch.randn(row_shape[k], ranks[k], dim_shape[k], ranks[k + 1], generator=g, dtype=torch.float64)
            for k in range(3)]
    table = _reconstruct(made, math.prod(row_shape))
    cores = _tt_svd(table, row_shape, dim_shape, rank)
    torch.testing.assert_close(_reconstruct(cores, len(table)), table)  # the TT-SVD is exact at the TT rank
    spec = TableSpec("item", len(table), math.prod(dim_shape), ("item",))
    emb = CompressedEmbeddings([spec], EmbeddingSettings(default=TensorTrain(rank=rank, row_shape=list(row_shape),
                                                                             dim_shape=list(dim_shape))))
    _load_cores(emb, "item", [c.float() for c in cores])
    for got in _decoded(emb, "item", len(table)).values():
        torch.testing.assert_close(got, table.float(), rtol=1e-4, atol=1e-4)


def test_ids_map_one_to_one_onto_digit_tuples():
    method = TensorTrain(rank=4, row_shape=[7, 11, 13]).build(TableSpec("t", 1000, 8, ("f",)))
    assert method.rows == [7, 11, 13]
    digits = method.transform(torch.arange(1000))
    torch.testing.assert_close((digits[0] * 11 + digits[1]) * 13 + digits[2], torch.arange(1000))
    assert all(int(d.max()) < rows for d, rows in zip(digits, method.rows))
    trimmed = TensorTrain(rank=4, row_shape=[100, 10, 10]).build(TableSpec("t", 250, 8, ("f",)))
    assert trimmed.rows == [3, 10, 10]  # core 0 keeps the rows ids reach


def test_cores_are_per_id_lookups_of_the_layout_fbgemm_uses():
    emb = CompressedEmbeddings([TableSpec("item", N, D, ("item",))], EmbeddingSettings(default=TensorTrain(rank=4)))
    method = emb.methods["item"]
    assert not method.additive and emb.bags is None and sorted(emb.sequences) == ["dim32", "dim8"]
    assert [(t.suffix, t.rows, t.dim) for t in method.plain_tables()] == [("core0", 4, 8), ("core1", 4, 32),
                                                                          ("core2", 4, 8)]
    assert sum(emb.memory().values()) == tt_bytes([4, 4, 4], [2, 2, 2], 4) == method.budget_bytes() == 4 * 192


def test_shapes_by_default():
    assert [row_factors(n) for n in (1, 2, 64, 200, 1001, 100_000)] == [
        (1, 1, 1), (1, 1, 2), (4, 4, 4), (6, 6, 6), (11, 9, 11), (47, 46, 47)]
    for n in (1, 2, 3, 63, 64, 65, 999, 1001, 12345, 100_000):
        n0, n1, n2 = row_factors(n)
        assert n0 * n1 * n2 >= n and (n0 - 1) * n1 * n2 < n  # core 0 holds no row that no id reads
    assert [dim_factors(d) for d in (1, 8, 10, 12, 16, 64, 128)] == [
        (1, 1, 1), (2, 2, 2), (5, 1, 2), (3, 2, 2), (4, 2, 2), (4, 4, 4), (8, 4, 4)]


@pytest.mark.parametrize("budget", [1 / 2, 1 / 4, 1 / 16, 1 / 64])
@pytest.mark.parametrize("multiple", [1, 4])
def test_the_budget_gives_the_largest_fitting_rank(budget, multiple):
    spec = TableSpec("item", 20_000, 64, ("item",))
    method = TensorTrain(budget=budget, rank_multiple=multiple).build(spec)
    r, bound = method.rank, budget * spec.full_bytes
    assert r % multiple == 0
    assert tt_bytes(method.rows, method.dim_shape, r) <= bound < tt_bytes(method.rows, method.dim_shape, r + multiple)
    assert method.budget_bytes() == tt_bytes(method.rows, method.dim_shape, r)


def test_decoded_rows_start_with_a_full_tables_variance():
    spec = TableSpec("item", 8000, 64, ("item",))
    variances = {}
    for name, compression in (("full", Full()), ("tensor_train", TensorTrain(rank=16))):
        torch.manual_seed(0)
        emb = CompressedEmbeddings([spec], EmbeddingSettings(default=compression, init_scale=0.5))
        variances[name] = emb.vectors("item", torch.arange(spec.num_embeddings)).var().item()
    assert variances["full"] == pytest.approx(0.5**2 / (3 * 64), rel=0.02)
    assert variances["tensor_train"] == pytest.approx(variances["full"], rel=0.25)


def test_errors_name_the_field_value_and_table():
    spec = TableSpec("item", N, D, ("item",))
    with pytest.raises(ConfigError, match="tensor_train needs rank or budget; both are None"):
        TensorTrain()
    with pytest.raises(ConfigError, match=r"tensor_train takes rank or budget, not both \(got rank=4, budget=0.5\)"):
        TensorTrain(rank=4, budget=0.5)
    with pytest.raises(ConfigError, match="tensor_train.rank must be an integer >= 1, got 0"):
        TensorTrain(rank=0)
    with pytest.raises(ConfigError, match=r"tensor_train.budget must be a fraction of the full table's bytes in "
                                          r"\(0, 1\], got 0"):
        TensorTrain(budget=0)
    with pytest.raises(ConfigError, match=r"tensor_train.row_shape must be a list of 3 integers >= 1, got \[8, 8\]"):
        TensorTrain(rank=4, row_shape=[8, 8])
    with pytest.raises(ConfigError, match=r"tensor_train.dim_shape must be a list of 3 integers >= 1, got \[2, 0, 4\]"):
        TensorTrain(rank=4, dim_shape=[2, 0, 4])
    with pytest.raises(ConfigError, match="tensor_train.dim_shape must be a list of 3 integers >= 1, got 8"):
        TensorTrain(rank=4, dim_shape=8)
    with pytest.raises(ConfigError, match="tensor_train.rank_multiple must be an integer >= 1, got 0"):
        TensorTrain(budget=0.5, rank_multiple=0)
    with pytest.raises(ConfigError, match=r"table 'item': tensor_train.row_shape \[3, 4, 5\] multiplies to 60 < "
                                          r"num_embeddings=64"):
        TensorTrain(rank=4, row_shape=[3, 4, 5]).build(spec)
    with pytest.raises(ConfigError, match=r"table 'item': tensor_train.dim_shape \[2, 2, 4\] multiplies to 16, not "
                                          r"the table's dim=8"):
        TensorTrain(rank=4, dim_shape=[2, 2, 4]).build(spec)
    # rank 4 over (4, 4, 4) rows and (2, 2, 2) dims: 4 x (32 + 128 + 32) = 768 bytes of the 2048
    with pytest.raises(ConfigError, match=r"table 'item': tensor_train.budget=0.25 \(512 bytes\) is below the smallest "
                                          r"layout, rank 4 with row_shape \[4, 4, 4\] and dim_shape \[2, 2, 2\] \(768 "
                                          r"bytes, budget 0.375\); use a larger budget or a smaller rank_multiple"):
        TensorTrain(budget=0.25).build(spec)


def test_the_config_instantiates_and_builds_within_its_budget(compose_config):
    settings = instantiate(compose_config("train", ("embedding=tensor_train",)).embedding)
    assert isinstance(settings, EmbeddingSettings) and settings.default == TensorTrain(budget=0.25)
    spec = TableSpec("item", 10_000, 64, ("item",))
    emb = CompressedEmbeddings([spec], settings)
    assert sum(emb.memory().values()) <= 0.25 * spec.full_bytes
    explicit = compose_config("train", ("embedding=tensor_train", "embedding.default.budget=null",
                                        "embedding.default.rank=8", "embedding.default.row_shape=[10,20,50]",
                                        "embedding.default.dim_shape=[2,8,4]"))
    method = instantiate(explicit.embedding).default.build(spec)
    assert (method.row_shape, method.dim_shape, method.rank) == ((10, 20, 50), (2, 8, 4), 8)


def test_mf_trains_one_epoch_on_tensor_train_tables(tiny_interactions, tmp_path):
    task, loss, full = mf_one_epoch(tiny_interactions, tmp_path, TensorTrain(budget=0.25), dim=32)
    memory = task.embeddings.memory()
    assert all(memory[t] <= 0.25 * full[t] for t in full)
    assert math.isfinite(loss) and loss > 0


def test_the_config_round_trips_through_a_model_package():
    config = TensorTrain(rank=4, row_shape=[3, 5, 5], dim_shape=[2, 1, 4], rank_multiple=1)
    stored = to_config(config)
    assert stored["_target_"] == "recsys.embeddings.tensor_train.TensorTrain"
    assert from_config(stored, "build.settings.default") == config
