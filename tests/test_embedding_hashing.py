import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from recsys.embeddings.collection import CompressedEmbeddings, EmbeddingSettings
from recsys.embeddings.hashing import (DoubleHashing, FrequencyHashing, HashEmbeddingTables, HashedTables, Hashing,
                                       MultiHash, hash_ids, stream_seed)
from recsys.embeddings.spec import TableSpec, TableStats
from recsys.errors import ConfigError
from tests.conftest import ROOT
from tests.embedding_contract import mf_one_epoch, N, EmbeddingContract, batch, build, tensor_bytes_of


class TestHashing(EmbeddingContract):
    def compression(self, spec):
        return Hashing(rows=16)


class TestDoubleHashing(EmbeddingContract):
    def compression(self, spec):
        return DoubleHashing(rows=16, seed=3)


class TestMultiHash(EmbeddingContract):
    def compression(self, spec):
        return MultiHash(k=3, rows=8)


class TestHashEmbedding(EmbeddingContract):
    def compression(self, spec):
        return MultiHash(k=2, rows=8, importance=True)


class TestFrequencyHashing(EmbeddingContract):
    def compression(self, spec):
        return FrequencyHashing(private=8, rows=8)

    def uncompressed(self, spec):
        return FrequencyHashing(private=spec.num_embeddings)


# ------------------------------------------------------------------ the hash function

M64 = (1 << 64) - 1


def _splitmix64_mix(z: int) -> int:
    """Reference: SplitMix64's finaliser on Python ints (arbitrary precision, masked)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def reference_hash(x: int, seed: int, modulus: int) -> int:
    key = _splitmix64_mix((seed + 0x9E3779B97F4A7C15) & M64)
    return (_splitmix64_mix((x + key) & M64) & ((1 << 63) - 1)) % modulus


PINNED_IDS = [0, 1, 2, 3, 1000, 123456789, 2**40 + 7, 2**63 - 1, -1, -(2**63)]
PINNED = {  # (seed, modulus) -> buckets of PINNED_IDS; a change of platform, torch or code shows here
    (0, 1000): [871, 483, 603, 456, 992, 469, 634, 421, 999, 87],
    (7, 2**61 - 1): [1492287745928248772, 2064051409564207293, 1790589418353373017, 575402345687249317,
                     318669197476433199, 1782054140493213266, 2142909079540078725, 517622031689476819,
                     370462283941081367, 1538694703017631304],
}


@pytest.mark.parametrize("seed, modulus", list(PINNED))
def test_hash_ids_equals_the_pinned_values_and_a_pure_python_reference(seed, modulus):
    assert [reference_hash(x, seed, modulus) for x in PINNED_IDS] == PINNED[(seed, modulus)]
    assert hash_ids(torch.tensor(PINNED_IDS), seed, modulus).tolist() == PINNED[(seed, modulus)]


def test_hash_ids_matches_the_reference_on_random_64_bit_ids_and_any_integer_dtype():
    rng = np.random.default_rng(0)
    ids = rng.integers(-(2**63), 2**63 - 1, size=2000, dtype=np.int64)
    for seed, modulus in [(1, 97), (2**32 + 5, 2**40), (-3, 2**63 - 1)]:
        got = hash_ids(torch.from_numpy(ids), seed, modulus)
        assert got.dtype == torch.int64 and got.min() >= 0 and got.max() < modulus
        assert got.tolist() == [reference_hash(int(x), seed, modulus) for x in ids]
    small = torch.arange(100, dtype=torch.int32)
    assert torch.equal(hash_ids(small, 0, 50), hash_ids(small.long(), 0, 50))


def test_the_cpu_and_the_any_device_arithmetic_hash_alike():
    """CPU tensors hash in numpy's wrapping uint64 arithmetic, other devices in int64 limbs: the same buckets."""
    from recsys.embeddings.hashing import _hash_limbs

    ids = torch.from_numpy(np.random.default_rng(1).integers(-(2**63), 2**63 - 1, size=5000, dtype=np.int64))
    ids = torch.cat([ids, torch.tensor(PINNED_IDS)])
    for seed, modulus in [(0, 1), (0, 1000), (2**32 + 5, 2**40), (-3, 2**63 - 1)]:
        assert torch.equal(hash_ids(ids, seed, modulus), _hash_limbs(ids, seed, modulus))


def test_hash_ids_are_identical_in_a_separate_process():
    ids = torch.arange(-50, 5000, 7)
    code = ("import torch; from recsys.embeddings.hashing import hash_ids; "
            "print(hash_ids(torch.arange(-50, 5000, 7), 11, 1009).tolist())")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert eval(done.stdout) == hash_ids(ids, 11, 1009).tolist()


def _occupancy_moments(n: int, m: int) -> tuple[float, float]:
    """Mean and standard deviation of the occupied buckets when n ids hash uniformly into m."""
    empty1, empty2 = (1 - 1 / m) ** n, (1 - 2 / m) ** n
    mean = m * (1 - empty1)
    var = m * empty1 + m * (m - 1) * empty2 - (m * empty1) ** 2
    return mean, var ** 0.5


@pytest.mark.parametrize("n, m", [(20_000, 5_000), (4_096, 1_024), (10_000, 10_000), (3_000, 65_536)])
def test_occupied_buckets_match_uniform_hashing(n, m):
    mean, sd = _occupancy_moments(n, m)
    for seed in (0, 1, 2):
        occupied = len(torch.unique(hash_ids(torch.arange(n), seed, m)))
        assert abs(occupied - mean) < 4 * sd, (seed, occupied, mean, sd)


def test_the_streams_of_double_hashing_are_independent():
    m, n = 101, 20_000
    ids = torch.arange(n)
    h0, h1 = hash_ids(ids, stream_seed(0, 0), m), hash_ids(ids, stream_seed(0, 1), m)
    same = (h0 == h1).sum().item()
    assert abs(same - n / m) < 4 * (n / m) ** 0.5  # h0 == h1 about 1/M of the time
    pairs = len(torch.unique(h0 * m + h1))
    mean, sd = _occupancy_moments(n, m * m)
    assert abs(pairs - mean) < 4 * sd  # (h0, h1) spread over all M^2 pairs


# ------------------------------------------------------------------ lookups equal a reference

def test_hashing_and_double_hashing_look_up_the_hashed_rows():
    kjt = batch(5)
    ids, lengths = kjt["item"].values(), kjt["item"].lengths()
    bag = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    for compression, k in [(Hashing(rows=16, seed=2), 1), (DoubleHashing(rows=16, seed=2), 2)]:
        emb = build(compression)
        weight = emb.bags.embedding_bags["item__hashed"].weight
        per_id = sum(weight[hash_ids(ids, stream_seed(2, j), 16)] for j in range(k))
        expected = torch.zeros(len(lengths), weight.shape[1]).index_add_(0, bag, per_id)
        torch.testing.assert_close(emb(kjt)["item"], expected)


def test_hash_embeddings_weight_the_components_by_their_importance():
    emb = build(MultiHash(k=2, rows=8, importance=True, seed=1), pooling="none")
    with torch.no_grad():
        emb.plain_weight("item__importance").normal_()
    kjt = batch(6)
    ids = kjt["item"].values()
    bucket = hash_ids(ids, stream_seed(1, 2), 8)  # 8 buckets of 2 weights, 4 per row of 8 columns
    packed = emb.plain_weight("item__importance")
    assert packed.shape == (2, 8)
    weights = 1 + torch.stack([packed[b // 4, (b % 4) * 2:(b % 4) * 2 + 2] for b in bucket.tolist()])
    expected = sum(weights[:, j:j + 1] * emb.plain_weight(f"item__hash{j}")[hash_ids(ids, stream_seed(1, j), 8)]
                   for j in range(2))
    torch.testing.assert_close(emb(kjt)["item"].values(), expected)
    assert not emb.methods["item"].additive and emb.bags is None


def test_frequency_hashing_keeps_the_top_ids_collision_free():
    spec = TableSpec("item", 500, 4, ("item",))
    counts = np.random.default_rng(0).permutation(500) * 3  # distinct counts in a random order
    method = FrequencyHashing(private=40, rows=16, seed=4).build(spec, TableStats(counts=counts))
    ids = torch.arange(500)
    private, shared = method.transform(ids)
    top = set(np.argsort(-counts)[:40].tolist())
    is_top = torch.tensor([i in top for i in range(500)])
    assert sorted(private[is_top].tolist()) == list(range(40))  # one row each, no collision
    assert (private[~is_top] == -1).all() and (shared[is_top] == -1).all()
    assert torch.equal(shared[~is_top], hash_ids(ids[~is_top], 4, 16))
    assert method.map.dtype == torch.uint8 and [t.rows for t in method.plain_tables()] == [40, 16]


def test_frequency_hashing_breaks_count_ties_by_smaller_id_and_private_zero_is_plain_hashing():
    spec = TableSpec("item", 10, 4, ("item",))
    counts = np.array([0, 5, 9, 5, 5, 1, 1, 1, 1, 1])
    private = FrequencyHashing(private=3, rows=2).build(spec, TableStats(counts=counts)).transform(torch.arange(10))[0]
    assert private.tolist() == [-1, 0, 1, 2, -1, -1, -1, -1, -1, -1]  # ids 2, 1, 3 (3 beats 4 on the tie)
    plain = FrequencyHashing(private=0, rows=4, seed=9).build(spec, TableStats(counts=counts))
    assert [t.suffix for t in plain.plain_tables()] == ["shared"] and plain.map is None
    assert torch.equal(plain.transform(torch.arange(10))[0], hash_ids(torch.arange(10), 9, 4))


# ------------------------------------------------------------------ budgets

BUDGET_METHODS = {
    "hashing": (Hashing, 1),
    "double": (DoubleHashing, 1),
    "multi3": (lambda budget: MultiHash(k=3, budget=budget), 3),
    "hash_embedding": (lambda budget: MultiHash(k=2, budget=budget, importance=True), 3),
    "frequency": (FrequencyHashing, 2),
}


@pytest.mark.parametrize("name", list(BUDGET_METHODS))
@pytest.mark.parametrize("budget", [1 / 2, 1 / 4, 1 / 16, 1 / 64])
def test_budget_is_respected_and_filled_to_within_a_row(name, budget):
    make, slack_rows = BUDGET_METHODS[name]
    n, d = 1000, 32
    counts = (1000 / np.arange(1, n + 1)).astype(np.int64)
    spec = TableSpec("item", n, d, ("item",))
    emb = CompressedEmbeddings([spec], EmbeddingSettings(default=make(budget=budget)),
                               {"item": TableStats(counts=counts)})
    memory = emb.memory()["item"]
    allowed = Fraction(budget) * spec.full_bytes
    assert memory <= allowed
    assert allowed - memory < slack_rows * d * 4  # less than the smallest step of the method's sizes
    assert memory == tensor_bytes_of(emb)
    if name == "frequency":
        method = emb.methods["item"]
        assert method.private > 0 and abs(method.private - method.rows) <= 1  # half private, half shared


def test_frequency_hashing_falls_back_to_plain_hashing_when_the_id_map_eats_the_budget():
    spec = TableSpec("item", 1000, 16, ("item",))  # a uint8 map of 1000 ids is 1/64 of the full table
    method = FrequencyHashing(budget=1 / 64).build(spec, TableStats(counts=np.arange(1000)))
    assert (method.private, method.rows, method.map) == (0, 15, None)


def test_frequency_hashing_budget_with_a_fixed_private_or_shared_size():
    spec = TableSpec("item", 1000, 16, ("item",))
    counts = np.arange(1000)
    fixed_private = FrequencyHashing(private=100, budget=0.25).build(spec, TableStats(counts=counts))
    fixed_rows = FrequencyHashing(rows=100, budget=0.25).build(spec, TableStats(counts=counts))
    # 16000 bytes - 1000 bytes of uint8 map = 15000 bytes = 234 rows of 64 bytes
    assert (fixed_private.private, fixed_private.rows, fixed_private.map.dtype) == (100, 134, torch.uint8)
    assert (fixed_rows.private, fixed_rows.rows, fixed_rows.map.dtype) == (134, 100, torch.uint8)
    # 18560 bytes: a uint8 map leaves room for 264 private rows but holds only 0..255 (F <= 255);
    # an int16 map leaves room for 248: the uint8 map with 255 keeps more
    capped = FrequencyHashing(rows=10, budget=0.29).build(spec, TableStats(counts=counts))
    assert (capped.private, capped.rows, capped.map.dtype) == (255, 10, torch.uint8)
    wide = FrequencyHashing(rows=10, budget=0.5).build(spec, TableStats(counts=counts))  # (32000-2000-640)/64
    assert (wide.private, wide.rows, wide.map.dtype) == (458, 10, torch.int16)


def test_memory_is_the_plain_tables_plus_the_id_map():
    emb = build(FrequencyHashing(private=8, rows=8))
    assert emb.memory() == {"item": 16 * 8 * 4 + N * 1}  # uint8 map of N ids
    assert build(FrequencyHashing(private=N)).memory() == {"item": N * 8 * 4}
    assert build(MultiHash(k=2, rows=8, importance=True)).memory() == {"item": 2 * 8 * 8 * 4 + 8 * 2 * 4}
    assert build(DoubleHashing(rows=10)).memory() == {"item": 10 * 8 * 4}


# ------------------------------------------------------------------ errors

def test_config_errors_name_the_field_and_value():
    spec = TableSpec("item", 100, 8, ("item",))
    with pytest.raises(ConfigError, match="Hashing needs rows or budget"):
        Hashing()
    with pytest.raises(ConfigError, match="takes rows or budget, not both; got rows=4, budget=0.5"):
        DoubleHashing(rows=4, budget=0.5)
    with pytest.raises(ConfigError, match=r"Hashing.rows must be an int >= 1, got 0"):
        Hashing(rows=0)
    with pytest.raises(ConfigError, match=r"MultiHash.budget must be a fraction .* in \(0, 1\], got 25"):
        MultiHash(budget=25)
    with pytest.raises(ConfigError, match=r"MultiHash.k must be an int >= 1, got 0"):
        MultiHash(k=0, rows=4)
    with pytest.raises(ConfigError, match=r"Hashing.seed must be an int, got 'a'"):
        Hashing(rows=4, seed="a")
    with pytest.raises(ConfigError, match=r"Hashing.budget=0.005 is too small for table 'item' \(100 x 8"):
        Hashing(budget=0.005).build(spec)
    with pytest.raises(ConfigError, match="FrequencyHashing of table 'item' needs vocabulary counts from prepare"):
        FrequencyHashing(budget=0.5).build(spec)
    with pytest.raises(ConfigError, match="needs vocabulary counts"):
        FrequencyHashing(budget=0.5).build(spec, TableStats(counts=None))
    with pytest.raises(ConfigError, match=r"counts must have shape \(100,\), got \(5,\)"):
        FrequencyHashing(budget=0.5).build(spec, TableStats(counts=np.ones(5)))
    with pytest.raises(ConfigError, match="FrequencyHashing needs private"):
        FrequencyHashing(rows=4)
    with pytest.raises(ConfigError, match="private=10 < N=100 leaves ids to hash, so rows"):
        FrequencyHashing(private=10).build(spec, TableStats(counts=np.ones(100)))
    with pytest.raises(ConfigError, match="set at most one, got private=3, rows=4, budget=0.5"):
        FrequencyHashing(private=3, rows=4, budget=0.5)
    with pytest.raises(ConfigError, match=r"FrequencyHashing.private must be an int >= 0, got -1"):
        FrequencyHashing(private=-1, budget=0.5)
    with pytest.raises(ConfigError, match="FrequencyHashing.budget=0.005 is too small for table 'item'"):
        FrequencyHashing(budget=0.005).build(spec, TableStats(counts=np.ones(100)))
    with pytest.raises(ConfigError, match="so k must be <= dim; got k=9, dim=8 for table 'item'"):
        MultiHash(k=9, rows=4, importance=True).build(spec)
    with pytest.raises(ConfigError, match="hash_ids: modulus must be an int >= 1, got 0"):
        hash_ids(torch.arange(3), 0, 0)


# ------------------------------------------------------------------ configs and MF end to end

YAMLS = [("hashing", HashedTables, 1), ("double_hashing", HashedTables, 2), ("multi_hash", HashedTables, 2),
         ("hash_embedding", HashEmbeddingTables, 3), ("frequency_hashing", None, 2)]


@pytest.mark.parametrize("name, cls, streams", YAMLS)
def test_every_yaml_instantiates_at_a_quarter_budget(name, cls, streams):
    settings = instantiate(OmegaConf.load(ROOT / "conf" / "embedding" / f"{name}.yaml"))
    assert isinstance(settings, EmbeddingSettings) and settings.default.budget == 0.25
    method = settings.default.build(TableSpec("item", 400, 8, ("item",)), TableStats(counts=np.arange(400)))
    assert cls is None or type(method) is cls
    assert len(method.stream_tables()) == streams
    assert sum(t.rows * t.dim * 4 for t in method.plain_tables()) + method.extra_memory() <= 400 * 8 * 4 / 4


@pytest.mark.parametrize("compression", [Hashing(budget=0.25), FrequencyHashing(budget=0.25)],
                         ids=["hashing", "frequency"])
def test_mf_trains_one_epoch_within_the_budget(tiny_interactions, tmp_path, compression):
    task, loss, full = mf_one_epoch(tiny_interactions, tmp_path, compression, dim=8, batch_size=512)
    assert np.isfinite(loss) and 0 < loss < 0.7  # below BPR's log 2 at the start
    memory = task.memory()
    assert all(0 < memory[t] <= full[t] / 4 for t in full), (memory, full)
    scores = task.score_users(torch.arange(1, 4))
    assert scores.shape == (3, tiny_interactions.n_items) and torch.isfinite(scores).all()
