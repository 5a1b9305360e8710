"""One memory budget split over several tables: smallest layouts, the water-filling split, errors."""

import re

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from recsys.embeddings.budget import has_layout, smallest_budget, split_budget, with_budget
from recsys.embeddings.collection import CompressedEmbeddings, EmbeddingSettings
from recsys.embeddings.compositional import QuotientRemainder
from recsys.embeddings.full import Full
from recsys.embeddings.hashing import Hashing
from recsys.embeddings.low_rank import LowRank
from recsys.embeddings.mixed_dim import MixedDimension
from recsys.embeddings.spec import TableSpec, TableStats
from recsys.embeddings.tensor_train import TensorTrain
from recsys.errors import ConfigError
from recsys.models.mf import mf_specs
from tests.conftest import ROOT

# Frappe's three large fields at D = 32
SPECS = [TableSpec("user", 885, 32, ("user",)), TableSpec("item", 4083, 32, ("item",)),
         TableSpec("city", 222, 32, ("city",))]
METHODS = [Hashing(budget=1.0), QuotientRemainder(budget=1.0), MixedDimension(budget=1.0, blocks=2, dim_multiple=1),
           LowRank(budget=1.0), TensorTrain(budget=1.0)]


def zipf_stats(spec: TableSpec) -> TableStats:
    counts = (10_000 / np.arange(1, spec.num_embeddings + 1)).astype(np.int64)
    counts[0] = 0  # OOV
    return TableStats(counts=counts)


def measured(compression, spec: TableSpec, stats: TableStats | None, budget: float) -> int:
    emb = CompressedEmbeddings([spec], EmbeddingSettings(default=with_budget(compression, budget)),
                               {spec.name: stats} if stats else None)
    return sum(emb.memory().values())


def test_quotient_remainder_floor_is_its_smallest_two_table_layout():
    # the smallest 2-table layout of 885 ids: m = 30 remainders x ceil(885 / 30) = 30 quotients -> 60 rows
    spec = SPECS[0]
    floor = smallest_budget(QuotientRemainder(budget=1.0), spec)
    assert floor == pytest.approx(60 * 32 * 4 / spec.full_bytes, rel=1e-3)
    assert has_layout(QuotientRemainder(budget=1.0), spec, None, floor)
    assert not has_layout(QuotientRemainder(budget=1.0), spec, None, floor / (1 + 2e-3))


@pytest.mark.parametrize("compression", METHODS, ids=lambda c: type(c).__name__)
def test_floor_is_tight_for_every_method(compression):
    for spec in SPECS:
        stats = zipf_stats(spec)
        floor = smallest_budget(compression, spec, stats)
        assert has_layout(compression, spec, stats, floor)
        assert not has_layout(compression, spec, stats, floor / (1 + 2e-3))


@pytest.mark.parametrize("compression", METHODS, ids=lambda c: type(c).__name__)
@pytest.mark.parametrize("share", [1 / 4, 1 / 16])
def test_split_fills_the_available_bytes_and_the_tensors_stay_within_it(compression, share):
    full = sum(s.full_bytes for s in SPECS)
    stats = {s.name: zipf_stats(s) for s in SPECS}
    floors = {s.name: smallest_budget(compression, s, stats[s.name]) for s in SPECS}
    available = int(share * full)
    if sum(floors[s.name] * s.full_bytes for s in SPECS) > available:
        with pytest.raises(ConfigError, match=r"smallest layouts of tables \['city', 'item', 'user'\] need \d+ bytes"):
            split_budget(compression, SPECS, available, stats)
        return
    budgets = split_budget(compression, SPECS, available, stats)
    # the shared fraction s: every table at max(s, its floor), the planned total = the bytes available
    s = min(budgets.values())
    assert all(b == pytest.approx(max(s, floors[n])) for n, b in budgets.items())
    assert sum(budgets[sp.name] * sp.full_bytes for sp in SPECS) == pytest.approx(available, rel=1e-9)
    bytes_ = {sp.name: measured(compression, sp, stats[sp.name], budgets[sp.name]) for sp in SPECS}
    assert sum(bytes_.values()) <= available
    assert all(bytes_[sp.name] <= budgets[sp.name] * sp.full_bytes for sp in SPECS)


def test_binding_floors_take_bytes_from_the_other_tables():
    # QR at 1/16: the 2-table floors of city (30 rows, 13.5% of its table) and user (60 rows, 6.8%) are above
    # 1/16, so item alone gets less than 1/16
    stats = {s.name: zipf_stats(s) for s in SPECS}
    available = sum(s.full_bytes for s in SPECS) // 16
    budgets = split_budget(QuotientRemainder(budget=1.0), SPECS, available, stats)
    for spec in SPECS[0], SPECS[2]:
        floor = smallest_budget(QuotientRemainder(budget=1.0), spec)
        assert budgets[spec.name] == pytest.approx(floor) and floor > 1 / 16
    assert budgets["item"] == pytest.approx((available - budgets["user"] * SPECS[0].full_bytes
                                             - budgets["city"] * SPECS[2].full_bytes) / SPECS[1].full_bytes)
    assert budgets["item"] < 1 / 16


def test_enough_bytes_gives_every_table_its_full_budget():
    budgets = split_budget(Hashing(budget=1.0), SPECS, 2 * sum(s.full_bytes for s in SPECS))
    assert budgets == {"user": 1.0, "item": 1.0, "city": 1.0}


def test_errors_name_the_method_and_the_bytes():
    with pytest.raises(ConfigError, match=r"QuotientRemainder: the smallest layouts of tables \['city', 'item', "
                                          r"'user'\] need \d+ bytes together, more than the 1000 available"):
        split_budget(QuotientRemainder(budget=1.0), SPECS, 1000)
    with pytest.raises(ConfigError, match="Full takes no budget"):
        split_budget(Full(), SPECS, 10_000)
    with pytest.raises(ConfigError, match="table 'user': MixedDimension has no layout within the full table's bytes"):
        smallest_budget(MixedDimension(budget=1.0, blocks=2000, dim_multiple=4), TableSpec("user", 2000, 4, ("user",)))


# --- EmbeddingSettings.total_budget: the collection sizes its default-method tables ------------------------------

def test_total_budget_sizes_the_default_tables_as_split_budget_does():
    small = TableSpec("country", 76, 32, ("country",), compression=Full())  # kept full: counts at its size
    specs = [*SPECS, small]
    stats = {s.name: zipf_stats(s) for s in specs}
    qr = QuotientRemainder(budget=0.5)  # the method's own budget is replaced
    emb = CompressedEmbeddings(specs, EmbeddingSettings(default=qr, total_budget=1 / 16, full_below_rows=0), stats)
    allowed = sum(s.full_bytes for s in specs) // 16
    assert sum(emb.memory().values()) <= allowed
    budgets = split_budget(qr, SPECS, allowed - small.full_bytes, stats)
    for spec in SPECS:
        expected = with_budget(qr, budgets[spec.name]).build(spec, stats[spec.name])
        assert emb.methods[spec.name].plain_tables() == expected.plain_tables()
    assert emb.memory()["country"] == small.full_bytes


def test_total_budget_counts_the_tables_listed_under_tables_at_their_size():
    stats = {s.name: zipf_stats(s) for s in SPECS}
    settings = EmbeddingSettings(default=Hashing(budget=1.0), tables={"city": Full()}, total_budget=0.25,
                                 full_below_rows=0)
    emb = CompressedEmbeddings(SPECS, settings, stats)
    memory = emb.memory()
    assert memory["city"] == SPECS[2].full_bytes
    assert sum(memory.values()) <= sum(s.full_bytes for s in SPECS) // 4
    # user and item share what city leaves: one fraction for both, well below 1/4
    share = (sum(s.full_bytes for s in SPECS) // 4 - SPECS[2].full_bytes) / (SPECS[0].full_bytes + SPECS[1].full_bytes)
    for spec in SPECS[:2]:
        assert 0.97 * share * spec.full_bytes <= memory[spec.name] <= share * spec.full_bytes


def test_total_budget_errors():
    for bad in (0, 1.5, True, "half"):
        with pytest.raises(ConfigError, match=r"embedding.total_budget must be a fraction in \(0, 1\]"):
            EmbeddingSettings(default=Hashing(budget=1.0), total_budget=bad)
    with pytest.raises(ConfigError, match="Full takes no budget"):
        CompressedEmbeddings(SPECS, EmbeddingSettings(total_budget=0.5))
    with pytest.raises(ConfigError, match=r"QuotientRemainder: the smallest layouts of tables \['city', 'item', 'user'\]"):
        CompressedEmbeddings(SPECS, EmbeddingSettings(default=QuotientRemainder(budget=1.0), total_budget=0.001,
                                                      full_below_rows=0))


# --- EmbeddingSettings.full_below_rows: small default-method tables stay full under a total budget -----------------

TIERS = [TableSpec("country", 50, 16, ("country",)), TableSpec("city", 800, 16, ("city",)),
         TableSpec("item", 100_000, 16, ("item",))]


def test_tables_under_the_threshold_stay_full_and_the_large_ones_share_the_rest():
    full = sum(s.full_bytes for s in TIERS)
    settings = EmbeddingSettings(default=Hashing(budget=1.0), total_budget=0.05, full_below_rows=1000)
    emb = CompressedEmbeddings(TIERS, settings)
    memory, allowed = emb.memory(), int(0.05 * full)
    assert memory["country"] == 50 * 16 * 4 and memory["city"] == 800 * 16 * 4  # full: rows x D x float32
    assert emb.methods["country"].plain_tables()[0].rows == 50 and emb.methods["city"].plain_tables()[0].rows == 800
    rest = allowed - memory["country"] - memory["city"]
    assert 0.99 * rest <= memory["item"] <= rest  # the large table gets the remainder
    assert sum(memory.values()) <= allowed
    layout = emb.layout()
    assert layout["country"] == {"method": "Full", "budget": None, "bytes": 3200, "full_bytes": 3200}
    assert layout["item"]["method"] == "Hashing" and layout["item"]["budget"] == pytest.approx(rest / (100_000 * 64))
    assert layout["item"]["bytes"] == memory["item"] <= layout["item"]["budget"] * layout["item"]["full_bytes"]
    # without a threshold every table shares the budget at one fraction
    shared = CompressedEmbeddings(TIERS, EmbeddingSettings(default=Hashing(budget=1.0), total_budget=0.05,
                                                           full_below_rows=0)).layout()
    assert {t: e["method"] for t, e in shared.items()} == dict.fromkeys(["country", "city", "item"], "Hashing")
    assert shared["item"]["budget"] > layout["item"]["budget"]


def test_tables_listed_under_tables_keep_their_method_below_the_threshold():
    settings = EmbeddingSettings(default=Hashing(budget=1.0), tables={"city": Hashing(rows=100)}, total_budget=0.05)
    layout = CompressedEmbeddings(TIERS, settings).layout()
    assert (layout["country"]["method"], layout["city"]["method"]) == ("Full", "Hashing")
    assert layout["city"]["bytes"] == 100 * 16 * 4
    assert sum(e["bytes"] for e in layout.values()) <= int(0.05 * sum(s.full_bytes for s in TIERS))
    without = CompressedEmbeddings(TIERS, EmbeddingSettings(default=Hashing(budget=0.5), full_below_rows=10**6))
    assert {e["method"] for e in without.layout().values()} == {"Hashing"}  # no total budget: no threshold


def test_small_full_tables_over_the_total_are_named_with_their_bytes():
    settings = EmbeddingSettings(default=Hashing(budget=1.0), total_budget=0.001)  # 6,454 bytes of 6,454,400
    with pytest.raises(ConfigError, match=r"embedding.total_budget=0.001 allows 6454 bytes for all tables, but the "
                                          r"tables under embedding.full_below_rows=1000 rows, kept full, need 54400 "
                                          r"bytes alone: country \(3200 bytes\), city \(51200 bytes\); raise "
                                          r"total_budget or lower full_below_rows \(0: no threshold\)"):
        CompressedEmbeddings(TIERS, settings)
    for bad in (-1, 2.5, True, "1000", None):
        with pytest.raises(ConfigError, match=r"embedding.full_below_rows must be an integer >= 0 \(a number of "
                                              rf"rows; 0 = no threshold\), got {re.escape(repr(bad))}"):
            EmbeddingSettings(full_below_rows=bad)


def test_packages_written_before_the_threshold_load_without_it():
    from recsys.inference.package import from_config, to_config

    config = to_config(EmbeddingSettings(default=Hashing(budget=1.0), total_budget=0.05))
    assert config["full_below_rows"] == 1000 and from_config(config).full_below_rows == 1000
    del config["full_below_rows"]  # an older package: every default table shared the budget
    assert from_config(config).full_below_rows == 0


@pytest.mark.parametrize("method", sorted(p.stem for p in (ROOT / "conf" / "embedding").glob("*.yaml") if p.stem != "full"))
def test_the_one_line_budget_builds_every_method_for_ml1m_sized_mf_tables(compose_config, method):
    """``embedding=<method> embedding.default.budget=0.0625`` (the README's one line) for MF's two tables of ML-1M's
    sizes at D = 64: a layout within the budget (``budget_bytes``: what differentiable VQ serves, its export)."""
    budget = 1 / 16
    settings = instantiate(compose_config("train", (f"embedding={method}", f"embedding.default.budget={budget}"))
                           .embedding, _convert_="object")
    specs = mf_specs(6040, 3629, 64)
    stats = {s.name: TableStats(counts=zipf_stats(s).counts, clusters=np.arange(s.num_embeddings) % 64)
             for s in specs}
    collection = CompressedEmbeddings(specs, settings, stats, device=torch.device("meta"))
    for spec in specs:
        used = collection.methods[spec.name].budget_bytes()
        assert used <= budget * spec.full_bytes, (spec.name, used)
