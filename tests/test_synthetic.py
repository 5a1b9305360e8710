"""Tests of the synthetic interactions and CTR generators (recsys.data.synthetic)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from hydra.utils import instantiate
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import OneHotEncoder

from recsys.data import synthetic
from recsys.data.schemas import LABEL, RAW_ITEM, RAW_USER, TIMESTAMP
from recsys.data.synthetic import (
    SyntheticCTR,
    SyntheticInteractions,
    generate_ctr,
    generate_interactions,
    planted_interactions,
)
from recsys.errors import ConfigError

SMALL = dict(n_users=300, n_items=120, n_interactions=6000, chunk_users=64)


def _recall_at_k(scores: np.ndarray, train: np.ndarray, test: np.ndarray, k: int = 20) -> float:
    """Mean over users with test items of |top-k (train items excluded) ∩ test| / |test|."""
    scores = np.where(train, -np.inf, scores)
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    hits = np.take_along_axis(test, top, axis=1).sum(1)
    n_test = test.sum(1)
    return float((hits[n_test > 0] / n_test[n_test > 0]).mean())


def test_interactions_rows_ids_and_row_groups(tmp_path):
    cfg = SyntheticInteractions(**SMALL)
    stats = generate_interactions(cfg, tmp_path / "i.parquet")
    f = pq.ParquetFile(tmp_path / "i.parquet")
    t = f.read()
    assert t.schema == pa.schema([(RAW_USER, pa.int64()), (RAW_ITEM, pa.int64()), (TIMESTAMP, pa.int64())])
    assert stats["rows"] == t.num_rows and abs(t.num_rows - cfg.n_interactions) < 0.05 * cfg.n_interactions
    assert f.metadata.num_row_groups == stats["row_groups"] == 5  # ceil(300 / 64)
    u, i, ts = (t[c].to_numpy() for c in (RAW_USER, RAW_ITEM, TIMESTAMP))
    assert stats["users"] == len(np.unique(u)) == 300 and stats["items"] == len(np.unique(i))
    assert u.min() >= 1000 and u.max() < 1300 and i.min() >= 1000 and i.max() < 1120
    assert len(np.unique(u * 10_000 + i)) == len(u)  # distinct items per user
    p = planted_interactions(cfg)
    counts = np.bincount(p.user_index(u), minlength=cfg.n_users)
    np.testing.assert_array_equal(counts, p.counts)
    assert counts.min() >= 5 and counts.max() <= cfg.n_items // 2
    same_user = u[1:] == u[:-1]  # rows are grouped by user, time-ordered within a user
    assert (np.diff(ts)[same_user] > 0).all() and same_user.sum() == len(u) - cfg.n_users


def test_interactions_deterministic(tmp_path):
    cfg = SyntheticInteractions(**SMALL)
    a = pq.read_table(generate_interactions(cfg, tmp_path / "a.parquet")["path"])
    b = pq.read_table(generate_interactions(cfg, tmp_path / "b.parquet")["path"])
    other = SyntheticInteractions(**{**SMALL, "seed": 1})
    c = pq.read_table(generate_interactions(other, tmp_path / "c.parquet")["path"])
    assert a.equals(b)
    assert not a.equals(c)


def test_interactions_popularity_is_skewed(tmp_path):
    cfg = SyntheticInteractions()
    generate_interactions(cfg, tmp_path / "i.parquet")
    items = pq.read_table(tmp_path / "i.parquet", columns=[RAW_ITEM])[RAW_ITEM].to_numpy()
    counts = np.sort(np.unique(items, return_counts=True)[1])[::-1]
    assert counts[: cfg.n_items // 10].sum() / counts.sum() >= 0.35


def test_oracle_beats_popularity(tmp_path):
    cfg = SyntheticInteractions(n_users=600, n_items=300, n_interactions=20_000, seed=2)
    generate_interactions(cfg, tmp_path / "i.parquet")
    t = pq.read_table(tmp_path / "i.parquet")
    p = planted_interactions(cfg)
    u, i = p.user_index(t[RAW_USER].to_numpy()), p.item_index(t[RAW_ITEM].to_numpy())
    held = np.random.default_rng(0).random(len(u)) < 0.2
    train = np.zeros((cfg.n_users, cfg.n_items), dtype=bool)
    test = np.zeros_like(train)
    train[u[~held], i[~held]] = True
    test[u[held], i[held]] = True
    popularity = np.broadcast_to(train.sum(0).astype(float), train.shape)
    oracle, pop = _recall_at_k(p.scores(), train, test), _recall_at_k(popularity, train, test)
    assert pop > 0.05  # popularity is a meaningful baseline...
    assert oracle >= 1.5 * pop  # ...that the planted taste beats clearly


def test_rejection_sampler_matches_dense_gumbel_top_k(monkeypatch):
    """The fast sampler and dense Gumbel-top-k draw from the same law (same item marginals)."""
    cfg = SyntheticInteractions(n_users=4000, n_items=100, n_interactions=32_000, affinity=3.0, user_noise=0.6)
    p = planted_interactions(cfg)
    sampler = synthetic._ItemSampler(p, cfg.n_users)
    users = np.arange(cfg.n_users)
    monkeypatch.setattr(synthetic, "_DENSE_DRAWS", np.inf)  # keep every user on rejection sampling
    du, fast = sampler.sample(users, np.random.default_rng(1), rounds=200)
    dv, dense = sampler.sample(users, np.random.default_rng(2), rounds=0)
    for d, it in ((du, fast), (dv, dense)):
        np.testing.assert_array_equal(np.bincount(d, minlength=cfg.n_users), p.counts)
        assert len(np.unique(d * cfg.n_items + it)) == len(it)
    assert not sampler.taken.any()  # the scratch mask is reset
    a, b = np.bincount(fast, minlength=cfg.n_items), np.bincount(dense, minlength=cfg.n_items)
    assert np.abs((a - b) / np.sqrt(a + b + 1)).max() < 5
    # personal taste: mean of d_u.v_i over the sampled pairs (d_u = u - its cluster centre), with
    # its standard error over users; ~0 if the per-user acceptance step were skipped
    delta = p.user_factors - p.centres[p.user_clusters]

    def taste(d, it):
        per_user = np.bincount(d, np.einsum("ij,ij->i", delta[d], p.item_factors[it]), cfg.n_users)
        return per_user.sum() / len(d), np.sqrt(cfg.n_users) * per_user.std() / len(d)

    (m1, se1), (m2, se2) = taste(du, fast), taste(dv, dense)
    assert m2 > 20 * se2 and abs(m1 - m2) < 5 * np.hypot(se1, se2)


@pytest.fixture(scope="module")
def ctr(tmp_path_factory):
    cfg = SyntheticCTR(n_rows=40_000, chunk_rows=15_000, seed=3)
    path = tmp_path_factory.mktemp("ctr") / "ctr.parquet"
    return cfg, generate_ctr(cfg, path), pq.ParquetFile(path)


def test_ctr_schema_and_rows(ctr):
    cfg, stats, f = ctr
    t = f.read()
    assert stats["rows"] == t.num_rows == 40_000 and f.metadata.num_row_groups == stats["row_groups"] == 3
    assert stats["schema"] == {"dense": ["d0", "d1", "d2", "d3"], "sparse": [f"s{j}" for j in range(6)],
                               "multi_valued": ["tags"]}
    assert t.schema.field(LABEL).type == pa.int8() and set(t[LABEL].to_numpy()) == {0, 1}
    for j in range(cfg.n_dense):
        d = t[f"d{j}"]
        assert d.type == pa.float32() and d.to_numpy().min() >= 0
    for j, card in enumerate(cfg.cardinalities):
        s = t[f"s{j}"]
        ids = np.unique(s.to_numpy())
        assert s.type == pa.int64() and len(ids) <= card and ids.min() >= 0
        assert not np.array_equal(ids, np.arange(len(ids)))  # raw ids, not indices
    tags = t["tags"].combine_chunks()
    assert tags.type == pa.list_(pa.int64())
    lengths = tags.value_lengths().to_numpy()
    assert lengths.min() == 1 and lengths.max() == cfg.max_tags
    assert len(np.unique(tags.values.to_numpy())) <= cfg.multi_valued_cardinality
    assert len(stats["crosses"]) == cfg.n_crosses


def test_ctr_planted_signal(ctr):
    cfg, stats, f = ctr
    assert 0.65 < stats["planted_auc"] < 0.95
    assert abs(stats["positive_rate"] - cfg.base_rate) < 0.05
    df = f.read().to_pandas()
    x = OneHotEncoder(handle_unknown="ignore").fit_transform(df[list(stats["schema"]["sparse"])])
    x = sp.hstack([x, sp.csr_matrix(np.log1p(df[stats["schema"]["dense"]].to_numpy()))]).tocsr()
    y, n = df[LABEL].to_numpy(), 30_000
    lr = LogisticRegression(max_iter=500).fit(x[:n], y[:n])
    lr_auc = roc_auc_score(y[n:], lr.predict_proba(x[n:])[:, 1])
    assert 0.6 < lr_auc < stats["planted_auc"] - 0.03  # linear ids carry signal, crosses add more


def test_ctr_deterministic(tmp_path):
    cfg = SyntheticCTR(n_rows=5000, chunk_rows=2000, cardinalities=(50, 20), n_crosses=1)
    a = pq.read_table(generate_ctr(cfg, tmp_path / "a.parquet")["path"])
    b = pq.read_table(generate_ctr(cfg, tmp_path / "b.parquet")["path"])
    c = pq.read_table(generate_ctr(SyntheticCTR(**{**cfg.__dict__, "seed": 1}), tmp_path / "c.parquet")["path"])
    assert a.equals(b) and not a.equals(c)
    no_tags = SyntheticCTR(n_rows=100, n_dense=0, multi_valued_cardinality=0, n_crosses=0)
    t = pq.read_table(generate_ctr(no_tags, tmp_path / "d.parquet")["path"])
    assert t.column_names == [LABEL] + [f"s{j}" for j in range(6)]


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (SyntheticInteractions, {"n_items": 0}, "n_items"),
        (SyntheticInteractions, {"n_users": -3}, "n_users"),
        (SyntheticInteractions, {"popularity_exponent": -0.5}, "popularity_exponent"),
        (SyntheticInteractions, {"affinity": float("nan")}, "affinity"),
        (SyntheticInteractions, {"chunk_users": 0}, "chunk_users"),
        (SyntheticInteractions, {"dim": 2.5}, "dim"),
        (SyntheticCTR, {"base_rate": 1.0}, "base_rate"),
        (SyntheticCTR, {"cardinalities": (10, 0)}, "cardinalities"),
        (SyntheticCTR, {"cardinalities": (10, 5), "n_crosses": 2}, "n_crosses"),
        (SyntheticCTR, {"max_tags": 0}, "max_tags"),
        (SyntheticCTR, {"zipf_exponents": (1.0, 1.0)}, "zipf_exponents"),
        (SyntheticCTR, {"dense_missing": (0.1, 0.2, 0.3, 1.0)}, "dense_missing"),
        (SyntheticCTR, {"sparse_missing": (0.1,) * 5 + (-0.1,)}, "sparse_missing"),
        (SyntheticCTR, {"dense_sigma": 0}, "dense_sigma"),
        (SyntheticCTR, {"logit_scale": float("inf")}, "logit_scale"),
        (SyntheticCTR, {"cardinality_rows": 0}, "cardinality_rows"),
    ],
)
def test_invalid_config(cls, kwargs, field):
    with pytest.raises(ConfigError, match=rf"\.{field}="):
        cls(**kwargs)


def test_config_mutated_after_construction_is_rejected(tmp_path):
    cfg = SyntheticInteractions(**SMALL)
    cfg.n_clusters = 0
    with pytest.raises(ConfigError, match="n_clusters=0"):
        generate_interactions(cfg, tmp_path / "i.parquet")


def _zipf_top_share(n: int, exponent: float, k: int) -> float:
    weights = np.arange(1, n + 1, dtype=float) ** -exponent
    return weights[:k].sum() / weights.sum()


def test_ctr_missing_values_heavy_tails_and_per_field_exponents(tmp_path):
    cfg = SyntheticCTR(n_rows=60_000, chunk_rows=25_000, n_dense=3, cardinalities=(5000, 50, 20), n_crosses=2,
                       multi_valued_cardinality=0, zipf_exponents=(1.2, 0.3, 1.0), dense_sigma=2.0,
                       dense_missing=(0.5, 0.0, 0.2), sparse_missing=(0.0, 0.3, 0.0), seed=4)
    stats = generate_ctr(cfg, tmp_path / "c.parquet")
    t = pq.read_table(tmp_path / "c.parquet")
    dense = {name: t[name].to_numpy() for name in ("d0", "d1", "d2")}
    for name, share in zip(dense, cfg.dense_missing):
        assert abs(np.isnan(dense[name]).mean() - share) < 0.01
    present = dense["d1"]
    assert (present >= 0).all() and (present == np.floor(present)).all()  # counts
    assert present.max() > 100 * max(np.median(present), 1)  # heavy tail
    s0, s1 = t["s0"].to_numpy(), t["s1"].to_numpy()
    assert (s0 != -1).all() and abs((s1 == -1).mean() - 0.3) < 0.01
    for ids, n, exponent in ((s0, 5000, 1.2), (s1[s1 != -1], 50, 0.3)):
        top = np.sort(np.unique(ids, return_counts=True)[1])[::-1][:10].sum() / len(ids)
        assert abs(top - _zipf_top_share(n, exponent, 10)) < 0.02
    assert 0.6 < stats["planted_auc"] < 1 and abs(stats["positive_rate"] - cfg.base_rate) < 0.05


def test_ctr_planted_auc_matches_sklearn_on_the_true_probabilities(tmp_path):
    cfg = SyntheticCTR(n_rows=30_000, chunk_rows=7_000, seed=5)
    stats = generate_ctr(cfg, tmp_path / "c.parquet")
    planted, labels, probs = synthetic._PlantedCTR(cfg), [], []
    for c, lo in enumerate(range(0, cfg.n_rows, cfg.chunk_rows)):  # the generator's draws, replayed
        rng = np.random.default_rng([cfg.seed, 1, c])
        p = synthetic._sigmoid(planted.bias + planted.rows(min(cfg.chunk_rows, cfg.n_rows - lo), rng)[1])
        labels.append(rng.random(len(p)) < p)
        probs.append(p)
    np.testing.assert_array_equal(np.concatenate(labels), pq.read_table(tmp_path / "c.parquet")[LABEL].to_numpy())
    assert stats["planted_auc"] == pytest.approx(roc_auc_score(np.concatenate(labels), np.concatenate(probs)), abs=1e-5)


def test_ctr_logit_scale_lowers_the_planted_auc(tmp_path):
    base = dict(n_rows=30_000, cardinalities=(200, 50, 10), n_crosses=1, seed=6)
    sharp = generate_ctr(SyntheticCTR(**base), tmp_path / "a.parquet")["planted_auc"]
    noisy = generate_ctr(SyntheticCTR(**base, logit_scale=0.3), tmp_path / "b.parquet")["planted_auc"]
    assert 0.5 < noisy < sharp - 0.05


def test_ctr_cardinalities_scale_with_rows(tmp_path):
    cards = (50, 100, 1000, 10**6)
    scaled = lambda n: SyntheticCTR(n_rows=n, cardinalities=cards, cardinality_rows=10**7).resolved_cardinalities  # noqa: E731
    assert scaled(10**7) == cards and SyntheticCTR(cardinalities=cards).resolved_cardinalities == cards
    assert scaled(10**6) == (50, 100, 100, 10**5) and scaled(1000) == (50, 100, 100, 100)
    assert scaled(2 * 10**7) == (50, 100, 2000, 2 * 10**6)
    cfg = SyntheticCTR(n_rows=20_000, cardinalities=(30, 500_000), cardinality_rows=10**7, n_crosses=1)
    stats = generate_ctr(cfg, tmp_path / "c.parquet")
    assert stats["cardinalities"] == [30, 1000]
    assert len(np.unique(pq.read_table(tmp_path / "c.parquet")["s1"].to_numpy())) <= 1000


def test_synthetic_criteo_config(compose_config, tmp_path):
    cfg = compose_config("prepare", ("data=synthetic_criteo",))
    gen = instantiate(cfg.data.source.generator)
    assert gen.n_rows == 1_000_000 and gen.n_dense == 13 and len(gen.cardinalities) == 26
    assert max(gen.resolved_cardinalities) == 100_000 and min(gen.resolved_cardinalities) < 10
    assert cfg.data.ctr.dense_transform == "log1p_standard" and gen.multi_valued_cardinality == 0
    big = instantiate(compose_config("prepare", ("data=synthetic_criteo", "data.source.generator.n_rows=10000000"))
                      .data.source.generator)
    assert max(big.resolved_cardinalities) == 1_000_000 and sum(c > 100_000 for c in big.resolved_cardinalities) == 7
    small = SyntheticCTR(**{**gen.__dict__, "n_rows": 20_000, "chunk_rows": 8_000})
    stats = generate_ctr(small, tmp_path / "c.parquet")
    t = pq.read_table(tmp_path / "c.parquet")
    assert t.num_columns == 40 and stats["row_groups"] == 3 and 0.7 < stats["planted_auc"] < 0.9
    assert abs(np.isnan(t["d11"].to_numpy()).mean() - 0.77) < 0.02 and abs((t["s19"].to_numpy() == -1).mean() - 0.44) < 0.02
