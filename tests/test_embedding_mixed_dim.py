"""Mixed dimension embeddings: the contract, the popularity power rule, the id -> (block, row) map,
budgets, errors, one MF epoch."""

import math

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torchrec import KeyedJaggedTensor

from recsys.embeddings.collection import CompressedEmbeddings, EmbeddingSettings
from recsys.embeddings.memory import TABLE_KEY
from recsys.embeddings.mixed_dim import MixedDimension, MixedDimensionTables
from recsys.embeddings.spec import TableSpec, TableStats
from recsys.errors import ConfigError, DataError
from tests.embedding_contract import mf_one_epoch, D, EmbeddingContract


class TestMixedDimension(EmbeddingContract):
    def compression(self, spec):
        return MixedDimension(blocks=4, alpha=0.5, base_dim=spec.dim)

    def uncompressed(self, spec):  # one block at alpha 0: one N x D table, no projection
        return MixedDimension(blocks=1, alpha=0.0, base_dim=spec.dim)


class TestMixedDimensionBudget(EmbeddingContract):
    def compression(self, spec):
        return MixedDimension(blocks=3, alpha=1.0, budget=0.5, dim_multiple=1)


class TestMixedDimensionFractions(EmbeddingContract):
    def compression(self, spec):
        return MixedDimension(blocks=[0.25, 0.75], alpha=0.3, base_dim=6, dim_multiple=1)


def zipf_counts(n: int, seed: int = 0) -> np.ndarray:
    """Zipf-like counts in shuffled id order, OOV (index 0) never seen."""
    counts = np.random.default_rng(seed).permutation((100_000 / np.arange(1, n + 1)).astype(np.int64))
    counts[0] = 0
    return counts


def power_rule(counts: np.ndarray, blocks: int, alpha: float, base_dim: int, multiple: int = 1) -> list[int]:
    """The paper's rule, directly: sort by frequency, cut into equal blocks, p_i = mean access
    probability of block i, d_i = round(base_dim * (p_i / max p) ** alpha), at least 1 (or rounded
    to a multiple of ``multiple``, at least one)."""
    ranked = sorted(range(len(counts)), key=lambda i: (i > 0, -counts[i], i))  # the OOV row (0) first
    total, sizes = counts.sum(), [len(part) for part in np.array_split(np.arange(len(counts)), blocks)]
    start, popularity = 0, []
    for size in sizes:
        popularity.append(sum(counts[i] for i in ranked[start:start + size]) / total / size)
        start += size
    return [multiple * max(1, round(base_dim * (p / max(popularity)) ** alpha / multiple)) for p in popularity]


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("blocks, base_dim, multiple", [(4, 64, 1), (7, 37, 1), (5, 64, 4)])
def test_block_dims_follow_the_popularity_power_rule(alpha, blocks, base_dim, multiple):
    counts = zipf_counts(3000)
    method = MixedDimension(blocks=blocks, alpha=alpha, base_dim=base_dim, dim_multiple=multiple).build(
        TableSpec("t", 3000, 64, ("f",)), TableStats(counts=counts))
    assert method.dims == power_rule(counts, blocks, alpha, base_dim, multiple)
    assert method.dims[0] == base_dim and method.dims == sorted(method.dims, reverse=True)
    assert all(d % multiple == 0 for d in method.dims)
    if alpha == 0:
        assert method.dims == [base_dim] * blocks


def test_without_counts_ids_are_taken_as_ranked_and_zipf_distributed():
    n = 1000
    method = MixedDimension(blocks=4, alpha=0.5, dim_multiple=1).build(TableSpec("t", n, 32, ("f",)))
    assert method.slot is None  # id order is frequency order: no id map
    assert method.dims == power_rule(1.0 / np.arange(1, n + 1), 4, 0.5, 32)
    streams = method.transform(torch.tensor([0, 249, 250, 999]))
    assert [s.tolist() for s in streams] == [[0, 249, -1, -1], [-1, -1, 0, -1], [-1, -1, -1, -1], [-1, -1, -1, 249]]


@pytest.mark.parametrize("n, dtype", [(64, torch.uint8), (3000, torch.int16), (70_000, torch.int32)])
def test_ids_map_one_to_one_onto_block_rows_by_frequency(n, dtype):
    counts = zipf_counts(n)
    method = MixedDimension(blocks=5, alpha=0.5).build(TableSpec("t", n, 16, ("f",)), TableStats(counts=counts))
    assert method.slot.dtype == dtype
    streams = method.transform(torch.arange(n))
    hits = torch.stack([s >= 0 for s in streams])
    assert bool((hits.sum(0) == 1).all())  # each id is in exactly one block
    ranked = np.concatenate([[0], 1 + np.argsort(-counts[1:], kind="stable")])  # the OOV row (0) first
    start = 0
    for i, (stream, rows) in enumerate(zip(streams, method.sizes)):
        members = torch.nonzero(stream >= 0).squeeze(1).numpy()
        assert sorted(members.tolist()) == sorted(ranked[start:start + rows].tolist())  # the i-th frequency block
        assert sorted(stream[members].tolist()) == list(range(rows))  # its rows, each once
        assert stream[members].tolist() == list(range(rows))  # in id order within the block
        start += rows


def test_the_combiner_is_the_sum_of_projected_block_rows():
    spec = TableSpec("item", 64, 8, ("item",))
    emb = CompressedEmbeddings([spec], EmbeddingSettings(default=MixedDimension(blocks=4, alpha=1.0, base_dim=8,
                                                                                dim_multiple=1)),
                               {"item": TableStats(counts=zipf_counts(64))})
    method = emb.methods["item"]
    weights = {match[1]: v for k, v in emb.state_dict().items() if (match := TABLE_KEY.search(k))}
    ids = torch.tensor([3, 40, 41, 7])
    expected = torch.zeros(D)
    for i, (stream, projection) in enumerate(zip(method.transform(ids), method.projections)):
        rows = stream[stream >= 0]
        if len(rows):
            expected += projection(weights[f"item__block{i}"][rows]).sum(0)
    kjt = KeyedJaggedTensor.from_lengths_sync(["item"], ids, torch.tensor([4]))
    torch.testing.assert_close(emb(kjt)["item"][0], expected)
    assert [isinstance(p, torch.nn.Linear) for p in method.projections] == [d != 8 for d in method.dims]


def _bytes(compression, spec, stats=None):
    emb = CompressedEmbeddings([spec], EmbeddingSettings(default=compression), {spec.name: stats} if stats else None)
    return sum(emb.memory().values()), emb.methods[spec.name]


@pytest.mark.parametrize("budget", [1 / 2, 1 / 4, 1 / 16, 1 / 64])
@pytest.mark.parametrize("with_counts, multiple", [(True, 1), (False, 1), (True, 4)])
def test_budgets_are_met_from_below_and_closely(budget, with_counts, multiple):
    spec = TableSpec("item", 20_000, 128, ("item",))
    stats = TableStats(counts=zipf_counts(spec.num_embeddings)) if with_counts else None
    if multiple == 4 and budget == 1 / 64:  # blocks of dim >= 4 of D = 128 need more than 1/32 of the bytes: the
        method = MixedDimension(blocks=4, budget=budget).build(spec, stats)  # layout of multiple 1 (data-parallel)
        assert method.budget_bytes() <= budget * spec.full_bytes and min(method.dims) < 4
        with pytest.raises(ConfigError, match="below the smallest layout, 4 blocks of dim 1"):
            MixedDimension(blocks=4, budget=1 / 512).build(spec, stats)
        return
    used, method = _bytes(MixedDimension(blocks=4, alpha=0.5, budget=budget, dim_multiple=multiple), spec, stats)
    assert used <= budget * spec.full_bytes
    largest, _ = _bytes(MixedDimension(blocks=4, alpha=0.5, base_dim=spec.dim, dim_multiple=multiple), spec, stats)
    if largest <= budget * spec.full_bytes:  # a budget above base_dim = D gets base_dim = D
        assert used == largest
    else:
        assert used >= 0.85 * budget * spec.full_bytes
    ratios = np.asarray(method.dims[1:]) / method.dims[0]  # the budget scales base_dim; the rule (alpha) stays
    expected = power_rule(stats.counts if stats else 1.0 / np.arange(1, spec.num_embeddings + 1), 4, 0.5, 1000, 1)
    assert np.allclose(ratios, np.asarray(expected[1:]) / 1000, atol=(multiple / 2 + 0.5) / method.dims[0] * 2)


def test_the_config_instantiates_and_builds_at_a_quarter_budget(compose_config):
    settings = instantiate(compose_config("train", ("embedding=mixed_dim",)).embedding)
    assert isinstance(settings, EmbeddingSettings) and isinstance(settings.default, MixedDimension)
    spec = TableSpec("item", 10_000, 64, ("item",))
    used, method = _bytes(settings.default, spec, TableStats(counts=zipf_counts(spec.num_embeddings)))
    assert 0.2 * spec.full_bytes <= used <= 0.25 * spec.full_bytes
    assert isinstance(method, MixedDimensionTables) and len(method.dims) == 4


def test_errors_name_the_field_and_value():
    spec = TableSpec("item", 64, 8, ("item",))
    with pytest.raises(ConfigError, match=r"mixed_dim takes base_dim or budget, not both "
                                          r"\(got base_dim=4, budget=0.5\)"):
        MixedDimension(base_dim=4, budget=0.5)
    with pytest.raises(ConfigError, match="mixed_dim.alpha must be a number >= 0, got -0.5"):
        MixedDimension(alpha=-0.5)
    with pytest.raises(ConfigError, match="mixed_dim.blocks must be >= 1, got 0"):
        MixedDimension(blocks=0)
    with pytest.raises(ConfigError, match=r"mixed_dim.blocks must be an integer >= 1 or a list of positive fractions "
                                          r"summing to 1, got \[0.5, 0.4\]"):
        MixedDimension(blocks=[0.5, 0.4])
    with pytest.raises(ConfigError, match="mixed_dim.budget must be a number > 0.*got 0"):
        MixedDimension(budget=0)
    with pytest.raises(ConfigError, match="mixed_dim.base_dim must be an integer >= 1, got 0"):
        MixedDimension(base_dim=0)
    with pytest.raises(ConfigError, match="table 'item': mixed_dim.base_dim=16 exceeds the table's dim=8"):
        MixedDimension(base_dim=16).build(spec)
    with pytest.raises(ConfigError, match=r"table 'item': mixed_dim.blocks \[0.005, 0.995\] leaves an empty block"):
        MixedDimension(blocks=[0.005, 0.995]).build(spec)
    with pytest.raises(ConfigError, match=r"table 'item': mixed_dim.budget=0.0625 \(128 bytes\) is below the smallest "
                                          r"layout, 4 blocks of dim 1 \(416 bytes, budget 0.2031\)"):
        MixedDimension(budget=1 / 16, dim_multiple=1).build(spec)
    with pytest.raises(ConfigError, match="mixed_dim.dim_multiple must be an integer >= 1, got 0"):
        MixedDimension(dim_multiple=0)
    with pytest.raises(DataError, match=r"table 'item': stats.counts has shape \(10,\), expected \(64,\)"):
        MixedDimension().build(spec, TableStats(counts=np.ones(10)))


def test_block_fractions_from_the_command_line(compose_config):
    cfg = compose_config("train", ("embedding=mixed_dim", "embedding.default.blocks=[0.1,0.3,0.6]"))
    method = instantiate(cfg.embedding).default.build(TableSpec("item", 1000, 32, ("item",)))
    assert method.sizes == [100, 300, 600]


def test_small_tables_get_one_block_per_id():
    method = MixedDimension(blocks=4, alpha=0.0).build(TableSpec("t", 3, 8, ("f",)))
    assert method.sizes == [1, 1, 1] and method.dims == [8, 8, 8]


def test_mf_trains_one_epoch_on_mixed_dimension_tables(tiny_interactions, tmp_path):
    task, loss, full = mf_one_epoch(tiny_interactions, tmp_path, MixedDimension(budget=0.25), dim=32)
    memory = task.embeddings.memory()
    assert all(memory[t] <= 0.25 * full[t] for t in full)
    assert math.isfinite(loss) and loss > 0


def test_rank_by_index_keeps_the_vocabulary_order_and_takes_popularities_from_the_counts():
    counts = zipf_counts(3000)
    spec = TableSpec("t", 3000, 64, ("f",))
    method = MixedDimension(blocks=4, alpha=0.5, base_dim=64, dim_multiple=1, rank_by="index").build(
        spec, TableStats(counts=counts))
    assert method.slot is None  # blocks are id ranges: no id map
    blocks = np.array_split(np.arange(3000), 4)
    popularity = [counts[b].mean() for b in blocks]
    assert method.dims == [max(1, round(64 * (p / max(popularity)) ** 0.5)) for p in popularity]
    by_counts = MixedDimension(blocks=4, alpha=0.5, budget=1 / 16, dim_multiple=1)
    by_index = MixedDimension(blocks=4, alpha=0.5, budget=1 / 16, dim_multiple=1, rank_by="index")
    # the id map (int16 per id) is what the index order saves at the same budget
    assert _bytes(by_counts, spec, TableStats(counts=counts))[1].extra_memory_parts()["buffer/slot"] == 2 * 3000
    assert "buffer/slot" not in _bytes(by_index, spec, TableStats(counts=counts))[1].extra_memory_parts()
    with pytest.raises(ConfigError, match="mixed_dim.rank_by must be counts or index, got 'freq'"):
        MixedDimension(rank_by="freq")
