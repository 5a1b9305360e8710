"""Low-rank factorized tables: the contract, equivalence with a full table at full rank, the budget's rank,
the starting variance, errors, one MF epoch."""

import math
import re

import pytest
import torch
from hydra.utils import instantiate
from torchrec import KeyedJaggedTensor

from recsys.embeddings.collection import CompressedEmbeddings, EmbeddingSettings
from recsys.embeddings.full import Full
from recsys.embeddings.low_rank import LowRank, low_rank_bytes
from recsys.embeddings.memory import TABLE_KEY
from recsys.embeddings.spec import TableSpec
from recsys.errors import ConfigError
from recsys.inference.package import from_config, to_config
from recsys.training.distributed import sharding_types
from tests.embedding_contract import D, N, batch, build, mf_one_epoch, EmbeddingContract


class TestLowRank(EmbeddingContract):
    def compression(self, spec):
        return LowRank(rank=4)


class TestLowRankBudget(EmbeddingContract):
    def compression(self, spec):  # 0.5 x 64 x 8 floats hold rank 3 (216 + 24 per rank)
        return LowRank(budget=0.5, rank_multiple=1)


def _weights(emb: CompressedEmbeddings) -> dict[str, torch.Tensor]:
    return {match[1]: v for k, v in emb.state_dict().items() if (match := TABLE_KEY.search(k))}


@pytest.mark.parametrize("pooling", ["sum", "mean", "none"])
def test_low_rank_equivalence_at_full_rank(pooling):
    """At r = D with the projection set to the identity, the method is a full table with the same rows."""
    full, low = build(Full(), pooling), build(LowRank(rank=D), pooling, seed=1)
    with torch.no_grad():
        _weights(low)["item__factors"].copy_(_weights(full)["item__full"])
        low.methods["item"].projection.weight.copy_(torch.eye(D))
    kjt = batch(5)
    a, b = full(kjt), low(kjt)
    for feature in ("item", "neg_item"):
        if pooling == "none":
            torch.testing.assert_close(b[feature].values(), a[feature].values())
        else:
            torch.testing.assert_close(b[feature], a[feature])
    queries = torch.randn(3, D)
    torch.testing.assert_close(torch.cat([s for _, s in low.item_scores("item", queries)], 1),
                               torch.cat([s for _, s in full.item_scores("item", queries)], 1))


def test_the_combiner_projects_the_pooled_rows():
    emb = build(LowRank(rank=4))
    method, rows = emb.methods["item"], _weights(emb)["item__factors"]
    ids = torch.tensor([3, 40, 3, 7])
    kjt = KeyedJaggedTensor.from_lengths_sync(["item"], ids, torch.tensor([3, 1]).int())
    expected = torch.stack([rows[ids[:3]].sum(0), rows[ids[3]]]) @ method.projection.weight.T
    torch.testing.assert_close(emb(kjt)["item"], expected)
    assert emb.bags is not None and not emb.sequences  # additive: pooled inside the EmbeddingBagCollection


@pytest.mark.parametrize("budget", [1 / 2, 1 / 4, 1 / 8, 1 / 16])
@pytest.mark.parametrize("multiple", [1, 4])
def test_the_budget_gives_the_largest_fitting_rank(budget, multiple):
    spec = TableSpec("item", 10_000, 128, ("item",))
    method = LowRank(budget=budget, rank_multiple=multiple).build(spec)
    bound = budget * spec.full_bytes
    r = method.rank
    assert r % multiple == 0 and low_rank_bytes(spec, r) <= bound < low_rank_bytes(spec, r + multiple)
    emb = CompressedEmbeddings([spec], EmbeddingSettings(default=LowRank(budget=budget, rank_multiple=multiple)))
    assert sum(emb.memory().values()) == low_rank_bytes(spec, r) == method.budget_bytes()


def test_decoded_rows_start_with_a_full_tables_variance():
    spec = TableSpec("item", 4000, 32, ("item",))
    variances = {}
    for name, compression in (("full", Full()), ("low_rank", LowRank(rank=8))):
        torch.manual_seed(0)
        emb = CompressedEmbeddings([spec], EmbeddingSettings(default=compression))
        variances[name] = emb.vectors("item", torch.arange(spec.num_embeddings)).var().item()
    assert variances["full"] == pytest.approx(0.1**2 / (3 * 32), rel=0.02)
    assert variances["low_rank"] == pytest.approx(variances["full"], rel=0.03)
    projection = emb.methods["item"].projection.weight  # orthonormal columns: |P e| = |e|
    torch.testing.assert_close(projection.T @ projection, torch.eye(8), atol=1e-5, rtol=0)


def test_errors_name_the_field_value_and_table():
    spec = TableSpec("item", N, D, ("item",))
    with pytest.raises(ConfigError, match="low_rank needs rank or budget; both are None"):
        LowRank()
    with pytest.raises(ConfigError, match=r"low_rank takes rank or budget, not both \(got rank=4, budget=0.5\)"):
        LowRank(rank=4, budget=0.5)
    with pytest.raises(ConfigError, match="low_rank.rank must be an integer >= 1, got 0"):
        LowRank(rank=0)
    with pytest.raises(ConfigError, match=r"low_rank.budget must be a fraction of the full table's bytes in \(0, 1\], "
                                          "got 1.5"):
        LowRank(budget=1.5)
    with pytest.raises(ConfigError, match="low_rank.rank_multiple must be an integer >= 1, got 0"):
        LowRank(budget=0.5, rank_multiple=0)
    with pytest.raises(ConfigError, match="table 'item': low_rank.rank=16 exceeds the table's dim=8"):
        LowRank(rank=16).build(spec)
    # 0.25 x 2048 bytes hold 512 bytes: rank 4 needs 4 x 4 x (64 + 8) = 1152, rank 1 288: the largest rank that fits
    assert LowRank(budget=0.25).build(spec).rank == 1
    with pytest.raises(ConfigError, match=r"table 'item': low_rank.budget=0.1 \(205 bytes\) is below the smallest "
                                          r"layout, rank 1 \(288 bytes, budget 0.1406\); use a larger budget"):
        LowRank(budget=0.1).build(spec)
    with pytest.raises(ConfigError, match=r"table 'tiny': low_rank.rank_multiple=4 exceeds the table's dim=2"):
        LowRank(budget=1.0).build(TableSpec("tiny", 100, 2, ("tiny",)))


def test_the_config_instantiates_and_builds_within_its_budget(compose_config):
    settings = instantiate(compose_config("train", ("embedding=low_rank",)).embedding)
    assert isinstance(settings, EmbeddingSettings) and settings.default == LowRank(budget=0.25)
    spec = TableSpec("item", 10_000, 64, ("item",))
    emb = CompressedEmbeddings([spec], settings)
    assert emb.methods["item"].rank == 12  # 0.25 x 64 x 10000 / 10064 = 15.9 -> 12
    assert sum(emb.memory().values()) <= 0.25 * spec.full_bytes


@pytest.mark.parametrize("budget, rank, kind", [(0.5, 12, "table_wise|column_wise|table_column_wise"),
                                               (1 / 16, 1, "data_parallel")])
def test_mf_trains_one_epoch_on_low_rank_tables(tiny_interactions, tmp_path, budget, rank, kind):
    """At 1/16 of D = 32 no rank of 4 fits: rank 1, whose table the default sharding runs data-parallel (FBGEMM's
    fused kernels need widths divisible by 4)."""
    task, loss, full = mf_one_epoch(tiny_interactions, tmp_path, LowRank(budget=budget), dim=32)
    memory = task.embeddings.memory()
    assert all(memory[t] <= budget * full[t] for t in full)
    assert {m.rank for m in task.embeddings.methods.values()} == {rank}
    assert all(re.fullmatch(kind, t) for t in sharding_types(task.model).values())
    assert math.isfinite(loss) and loss > 0


def test_the_config_round_trips_through_a_model_package():
    config = LowRank(rank=4, budget=None, rank_multiple=2)
    stored = to_config(config)
    assert stored["_target_"] == "recsys.embeddings.low_rank.LowRank"
    assert from_config(stored, "build.settings.default") == config
