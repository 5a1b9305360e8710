"""Quotient-remainder and k-partition compositional embeddings: the contract for every combiner,
complementary partitions (distinct ids never share every row), budgets, errors, one MF epoch."""

import math

import pytest
import torch
from hydra.utils import instantiate
from torchrec import KeyedJaggedTensor

from recsys.embeddings.collection import CompressedEmbeddings, EmbeddingSettings
from recsys.embeddings.compositional import (Compositional, CompositionalTables, QuotientRemainder, budget_moduli,
                                             smallest_bytes)
from recsys.embeddings.memory import TABLE_KEY
from recsys.embeddings.spec import TableSpec
from recsys.errors import ConfigError
from tests.embedding_contract import mf_one_epoch, EmbeddingContract


class TestQuotientRemainderMult(EmbeddingContract):
    def compression(self, spec):
        return QuotientRemainder(collisions=8, combiner="mult")


class TestQuotientRemainderAdd(EmbeddingContract):
    def compression(self, spec):
        return QuotientRemainder(collisions=5, combiner="add")


class TestQuotientRemainderConcat(EmbeddingContract):
    def compression(self, spec):
        return QuotientRemainder(collisions=8, combiner="concat")


class TestQuotientRemainderBudget(EmbeddingContract):
    def compression(self, spec):
        return QuotientRemainder(budget=0.5)


class TestCompositionalMult(EmbeddingContract):
    def compression(self, spec):
        return Compositional(partitions=[4, 4, 4], combiner="mult")

    def uncompressed(self, spec):  # the trivial partition (k = 1, m = N) is the full table
        return Compositional(partitions=[spec.num_embeddings], combiner="mult")


class TestCompositionalAdd(EmbeddingContract):
    def compression(self, spec):
        return Compositional(partitions=[3, 5, 5], combiner="add")

    def uncompressed(self, spec):
        return Compositional(partitions=[spec.num_embeddings], combiner="add")


class TestCompositionalConcat(EmbeddingContract):
    def compression(self, spec):
        return Compositional(budget=0.25, parts=3, combiner="concat")

    def uncompressed(self, spec):
        return Compositional(partitions=[spec.num_embeddings], combiner="concat")



def _pairs_are_distinct(method: CompositionalTables, n: int) -> None:
    """Every digit is within its table and the digit tuples of ids 0..n-1 are all distinct."""
    streams = method.transform(torch.arange(n))
    key = torch.zeros(n, dtype=torch.int64)
    for stream, rows in zip(streams, method.rows):
        assert stream.dtype == torch.int64 and int(stream.min()) >= 0 and int(stream.max()) < rows
        key = key * rows + stream
    assert len(torch.unique(key)) == n


@pytest.mark.parametrize("n", [1, 2, 97, 100_000])
@pytest.mark.parametrize("m", [1, 2, 316, 1000, 100_000])
def test_quotient_remainder_maps_distinct_ids_to_distinct_pairs(n, m):
    method = QuotientRemainder(collisions=m).build(TableSpec("t", n, 4, ("f",)))
    assert method.rows == [-(-n // m), min(m, n)]
    q, r = method.transform(torch.arange(n))
    torch.testing.assert_close(q * m + r, torch.arange(n))  # (q, r) is the id's own decomposition
    _pairs_are_distinct(method, n)


@pytest.mark.parametrize("n, partitions", [(1000, [7, 11, 13]), (100_000, [2] * 17), (100_000, [10] * 5),
                                           (100_000, [46, 47, 48]), (5, [100, 3]), (100_000, [100_000])])
def test_k_partitions_map_distinct_ids_to_distinct_digit_tuples(n, partitions):
    method = Compositional(partitions=partitions).build(TableSpec("t", n, 4, ("f",)))
    digits = method.transform(torch.arange(n))
    place, value = 1, torch.zeros(n, dtype=torch.int64)
    for digit, m in zip(digits, partitions):
        value, place = value + digit * place, place * m
    torch.testing.assert_close(value, torch.arange(n))  # the mixed-radix digits recompose the id
    _pairs_are_distinct(method, n)


@pytest.mark.parametrize("combiner", ["mult", "add", "concat"])
def test_combiners_are_product_sum_and_concat_of_the_rows(combiner):
    """mult is quotient * (1 + remainder): the product parametrised around the first table."""
    spec = TableSpec("item", 30, 9, ("item",), pooling="none")
    ids = torch.tensor([0, 7, 29, 13])
    kjt = KeyedJaggedTensor.from_lengths_sync(["item"], ids, torch.tensor([3, 1]))
    emb = CompressedEmbeddings([spec], EmbeddingSettings(default=QuotientRemainder(collisions=4, combiner=combiner)))
    weights = {match[1]: v for k, v in emb.state_dict().items() if (match := TABLE_KEY.search(k))}
    q, r = weights["item__quotient"][ids // 4], weights["item__remainder"][ids % 4]
    expected = {"mult": lambda a, b: a * (1 + b), "add": torch.add, "concat": lambda a, b: torch.cat([a, b], 1)}[combiner](q, r)
    if combiner == "concat":  # odd D: the quotient table is ceil(9/2) wide, the remainder floor(9/2)
        assert (q.shape[1], r.shape[1]) == (5, 4)
    torch.testing.assert_close(emb(kjt)["item"].values(), expected)


def test_concat_splits_an_odd_dim_over_k_tables():
    method = Compositional(partitions=[4, 4, 4], combiner="concat").build(TableSpec("t", 64, 8, ("f",)))
    assert method.dims == [3, 3, 2]
    assert QuotientRemainder(collisions=4, combiner="add").build(TableSpec("t", 64, 7, ("f",))).dims == [7, 7]


def _bytes(compression, spec):
    return sum(CompressedEmbeddings([spec], EmbeddingSettings(default=compression)).memory().values())


CASES = {"qr-mult": lambda b: QuotientRemainder(budget=b, combiner="mult"),
         "qr-add": lambda b: QuotientRemainder(budget=b, combiner="add"),
         "qr-concat": lambda b: QuotientRemainder(budget=b, combiner="concat"),
         "k2-add": lambda b: Compositional(budget=b, parts=2, combiner="add"),
         "k3-mult": lambda b: Compositional(budget=b, parts=3, combiner="mult"),
         "k3-concat": lambda b: Compositional(budget=b, parts=3, combiner="concat"),
         "k4-add": lambda b: Compositional(budget=b, parts=4, combiner="add")}


@pytest.mark.parametrize("budget", [1 / 2, 1 / 4, 1 / 16, 1 / 64])
@pytest.mark.parametrize("case", list(CASES))
def test_budgets_are_met_from_below_and_closely(budget, case):
    spec = TableSpec("item", 100_003, 8, ("item",))
    if (case, budget) in {("k3-concat", 1 / 2), ("k3-concat", 1 / 4), ("k4-add", 1 / 2)}:
        pytest.skip("above the largest layout of these partitions (see the next test)")
    used = _bytes(CASES[case](budget), spec)
    assert 0.995 * budget * spec.full_bytes <= used <= budget * spec.full_bytes


@pytest.mark.parametrize("compression, largest", [
    (Compositional(budget=1.0, parts=4, combiner="add"), 1 / 4),  # [m, 2, 2, ceil(N / 4m)]: about N/4 rows
    (Compositional(budget=0.5, parts=3, combiner="concat"), 3 / 9 / 2),  # the first table, 3 of 9 wide, N/2 rows
    (QuotientRemainder(budget=0.75, combiner="concat"), 4 / 9),  # the remainder table, 4 of 9 wide, N-1 rows
])
def test_a_budget_above_the_largest_layout_gets_the_largest_layout(compression, largest):
    spec = TableSpec("item", 100_003, 9, ("item",))
    assert 0.999 * largest * spec.full_bytes <= _bytes(compression, spec) <= 1.001 * largest * spec.full_bytes


def test_budget_search_finds_the_balanced_minimum():
    # 3 partitions of 10^6 ids: 100 + 100 + 100 rows is the cheapest complementary layout
    assert smallest_bytes(1_000_000, [4, 4, 4]) == 300 * 4
    assert budget_moduli(1_000_000, [4, 4, 4], 300 * 4) == ([100, 100, 100], 1200)
    assert budget_moduli(1_000_000, [4, 4, 4], 299 * 4) is None
    # two partitions: the most rows within the target, over every m
    n, target = 1009, 300
    costs = {m: m + -(-n // m) for m in range(2, n)}
    best = max(c for c in costs.values() if c <= target)
    m = min(m for m, c in costs.items() if c == best)
    assert budget_moduli(n, [1, 1], target) == ([m, -(-n // m)], best)


def test_errors_name_the_field_and_value():
    spec = TableSpec("item", 64, 8, ("item",))
    with pytest.raises(ConfigError, match="quotient_remainder needs collisions or budget; both are None"):
        QuotientRemainder()
    with pytest.raises(ConfigError, match=r"takes collisions or budget, not both \(got collisions=4, budget=0.5\)"):
        QuotientRemainder(collisions=4, budget=0.5)
    with pytest.raises(ConfigError, match="quotient_remainder.collisions must be an integer >= 1, got 0"):
        QuotientRemainder(collisions=0)
    with pytest.raises(ConfigError, match=r"quotient_remainder.combiner must be one of \['mult', 'add', 'concat'\], "
                                          "got 'max'"):
        QuotientRemainder(collisions=4, combiner="max")
    with pytest.raises(ConfigError, match="quotient_remainder.budget must be a number > 0.*got -0.5"):
        QuotientRemainder(budget=-0.5)
    with pytest.raises(ConfigError, match=r"table 'item': quotient_remainder.budget=0.1 \(205 bytes\) is below the "
                                          r"smallest 2-table layout \(512 bytes, budget 0.25\)"):
        QuotientRemainder(budget=0.1).build(spec)
    with pytest.raises(ConfigError, match="compositional needs partitions or budget; both are None"):
        Compositional()
    with pytest.raises(ConfigError, match=r"compositional.partitions \[4, 4\] multiply to 16 < num_embeddings=64"):
        Compositional(partitions=[4, 4]).build(spec)
    with pytest.raises(ConfigError, match=r"compositional.partitions must be a non-empty list of integers >= 1, "
                                          r"got \[4, 0\]"):
        Compositional(partitions=[4, 0])
    with pytest.raises(ConfigError, match=r"compositional.parts=2 disagrees with the 3 partitions \[4, 4, 4\]"):
        Compositional(partitions=[4, 4, 4], parts=2)
    with pytest.raises(ConfigError, match="compositional.parts must be an integer >= 2, got 1"):
        Compositional(budget=0.5, parts=1)
    with pytest.raises(ConfigError, match="table 't': compositional.combiner=concat splits dim=2 over 3 tables"):
        Compositional(partitions=[4, 4, 4], combiner="concat").build(TableSpec("t", 64, 2, ("f",)))


@pytest.mark.parametrize("name, kind", [("quotient_remainder", QuotientRemainder), ("compositional", Compositional)])
def test_the_config_instantiates_and_builds_at_a_quarter_budget(compose_config, name, kind):
    settings = instantiate(compose_config("train", (f"embedding={name}",)).embedding)
    assert isinstance(settings, EmbeddingSettings) and isinstance(settings.default, kind)
    spec = TableSpec("item", 10_000, 16, ("item",))
    assert 0.24 * spec.full_bytes <= _bytes(settings.default, spec) <= 0.25 * spec.full_bytes


def test_mf_trains_one_epoch_on_quotient_remainder_tables(tiny_interactions, tmp_path):
    task, loss, full = mf_one_epoch(tiny_interactions, tmp_path, QuotientRemainder(budget=0.25), dim=16)
    memory = task.embeddings.memory()
    assert all(memory[t] <= 0.25 * full[t] for t in full)
    assert math.isfinite(loss) and loss > 0


def test_explicit_partitions_from_the_command_line(compose_config):
    cfg = compose_config("train", ("embedding=compositional", "embedding.default.budget=null",
                                   "embedding.default.partitions=[8,8,8]", "embedding.default.combiner=add"))
    method = instantiate(cfg.embedding).default.build(TableSpec("item", 500, 8, ("item",)))
    assert method.rows == [8, 8, 8] and method.additive
