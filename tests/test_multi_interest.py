"""ComiRec-DR / ComiRec-SA: extractors, the sampled-softmax loss, FAISS retrieval, the controllable
aggregation against brute force, interests on planted multi-cluster users, compressed tables, settings."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from torchrec import KeyedJaggedTensor

from recsys.data.dataset import PreparedData
from recsys.data.prepare import InteractionFilters, SourceConfig, prepare_interactions
from recsys.data.splits import SplitConfig
from recsys.errors import ConfigError
from recsys.models.multi_interest import (CapsuleRouting, DynamicRouting, MultiInterest, SelfAttention,
                                          SelfAttentiveInterests, multi_interest_specs)
from recsys.embeddings.collection import CompressedEmbeddings
from recsys.retrieval import Candidates, ItemIndex, aggregate, diversity, multi_interest_retrieve
from recsys.training.distributed import TableOptimizer
from recsys.training.loop import TrainerConfig
from recsys.training.losses import sampled_softmax_loss
from recsys.training.comirec import ComiRec, SharedNegatives, recent_histories
from tests.conftest import ROOT
from tests.model_contract import ModelContract

EXTRACTORS = {"dr": lambda: CapsuleRouting(8, interests=3, positions=6, iterations=3),
              "dr_shared": lambda: CapsuleRouting(8, interests=3, positions=1),
              "sa": lambda: SelfAttentiveInterests(8, interests=3, max_length=6, hidden=16)}


@pytest.mark.parametrize("name", sorted(EXTRACTORS))
def test_interests_have_shape_bkd_and_ignore_padding(name):
    torch.manual_seed(0)
    extractor = EXTRACTORS[name]()
    history = torch.randn(4, 6, 8)
    mask = torch.arange(6) < torch.tensor([6, 2, 4, 1]).unsqueeze(1)
    interests = extractor(history * mask.unsqueeze(2), mask)
    assert interests.shape == (4, 3, 8)
    alone = extractor(history[1:2, :2], mask[1:2, :2])  # the 2-item history without the batch's padding
    torch.testing.assert_close(interests[1:2], alone, rtol=1e-5, atol=1e-6)
    garbage = history.clone()
    garbage[~mask] = 100.0  # whatever sits in padded slots is ignored
    torch.testing.assert_close(extractor(garbage, mask), interests, rtol=1e-5, atol=1e-6)


def test_model_reads_histories_through_the_item_table():
    torch.manual_seed(0)
    model = MultiInterest(CompressedEmbeddings(multi_interest_specs(20, 8)), EXTRACTORS["sa"]())
    kjt = KeyedJaggedTensor.from_lengths_sync(["history", "item", "neg_item"],
                                              torch.tensor([3, 2, 1, 5, 7, 9, 4, 6, 8]),
                                              torch.tensor([3, 0, 1, 1, 1, 0, 0, 0, 3, 0, 0, 0]))
    interests, vectors = model(kjt)
    assert interests.shape == (4, 3, 8) and vectors["item"].shape == (1, 8) and vectors["neg_item"].shape == (3, 8)
    assert torch.count_nonzero(interests[1]) == 0  # an empty history has zero interests
    items = model.embeddings.plain_weight("item__full")
    expected = model.extractor(items[torch.tensor([[3, 2, 1]])], torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(interests[:1], expected)


def test_recent_histories_match_a_loop():
    indptr, items = np.array([0, 0, 5, 8]), np.array([10, 11, 12, 13, 14, 20, 21, 22])
    users, ends = np.array([1, 1, 2, 0, 2]), np.array([4, 1, 3, 0, 0])
    values, lengths = recent_histories(indptr, items, users, ends, max_length=3)
    expected = [list(items[indptr[u]:indptr[u] + e][::-1][:3]) for u, e in zip(users, ends)]
    assert lengths.tolist() == [len(e) for e in expected]
    assert values.tolist() == [i for e in expected for i in e]


def test_sampled_softmax_matches_a_loop_reference_with_logq_and_accidental_hits():
    torch.manual_seed(0)
    users, positives, negatives = torch.randn(4, 5), torch.randn(4, 5), torch.randn(6, 5)
    positive_ids, negative_ids = torch.tensor([3, 8, 3, 1]), torch.tensor([8, 2, 3, 9, 3, 5])
    log_q = (torch.log(torch.tensor([0.1, 0.2, 0.1, 0.05])), torch.log(torch.tensor([0.2, 0.3, 0.1, 0.1, 0.1, 0.2])))
    total = 0.0
    for b in range(4):
        target = (users[b] @ positives[b]).item() / 0.5 - log_q[0][b].item()
        logits = [target] + [(users[b] @ negatives[m]).item() / 0.5 - log_q[1][m].item() for m in range(6)
                             if negative_ids[m] != positive_ids[b]]
        total += -(target - math.log(sum(math.exp(x) for x in logits)))
    got = sampled_softmax_loss(users, positives, negatives, positive_ids, negative_ids, log_q, temperature=0.5)
    assert got.item() == pytest.approx(total / 4, rel=1e-5)
    plain = sampled_softmax_loss(users, positives, negatives, positive_ids, negative_ids)
    logits = torch.cat([(users * positives).sum(1, keepdim=True), users @ negatives.T], 1)
    logits[:, 1:][positive_ids.unsqueeze(1) == negative_ids] = float("-inf")
    assert plain.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.zeros(4).long()).item())


def _planted_vectors(seed=0, n=300, d=16, users=6, k=4):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(users, k, d)).astype(np.float32)


def test_item_index_equals_brute_force_top_n():
    items, interests = _planted_vectors()
    ids = np.arange(100, 400)
    queries = interests.reshape(-1, 16)
    scores, found = ItemIndex(items, ids).search(queries, 25)
    full = queries @ items.T
    expected = np.argsort(-full, axis=1)[:, :25]
    assert np.array_equal(found, ids[expected])
    np.testing.assert_allclose(scores, np.take_along_axis(full, expected, 1), rtol=1e-5, atol=1e-5)
    assert ItemIndex(items[:10]).search(queries, 25)[1].shape == (len(queries), 10)  # n capped at N
    with pytest.raises(ConfigError, match=r"expected \(Q, 16\)"):
        ItemIndex(items).search(queries[:, :8], 5)
    with pytest.raises(ConfigError, match="not a FAISS index_factory string"):
        ItemIndex(items, factory="NoSuchIndex")


def test_aggregation_at_lambda_zero_is_the_brute_force_top_n_by_max_score():
    items, interests = _planted_vectors(1)
    candidates = multi_interest_retrieve(interests, ItemIndex(items), 40)
    chosen = aggregate(candidates, 40, diversity=0.0)
    best = (interests @ items.T).max(1)
    expected = np.argsort(-best, axis=1)[:, :40]
    assert np.array_equal(chosen.ids, expected)
    np.testing.assert_allclose(chosen.scores, np.take_along_axis(best, expected, 1), rtol=1e-5, atol=1e-5)
    categories = np.arange(300) % 7  # a greedy run with categories but lambda 0 agrees
    assert np.array_equal(aggregate(candidates, 40, 0.0, categories).ids, expected)


def test_greedy_step_matches_brute_force_on_a_tiny_case():
    rng = np.random.default_rng(3)
    ids = np.array([[5, 1, 7, 2, 9, -1], [4, 3, 8, 6, 0, 2]])
    scores = rng.uniform(0, 1, ids.shape).astype(np.float32)
    scores[0, 5] = -np.inf
    categories = np.array([0, 1, 1, 2, 0, 2, 1, 0, 2, 1])
    for lam in (0.0, 0.2, 1.0):
        got = aggregate(Candidates(ids, scores), 5, lam, categories)
        for b in range(2):
            chosen: list[int] = []
            for _ in range(5):
                gains = {c: scores[b, c] + lam * sum(categories[ids[b, c]] != categories[ids[b, j]] for j in chosen)
                         for c in range(ids.shape[1]) if c not in chosen and ids[b, c] >= 0}
                chosen.append(max(gains, key=gains.get))
            assert got.ids[b].tolist() == ids[b, chosen].tolist(), (lam, b)


def test_larger_lambda_raises_diversity():
    items, interests = _planted_vectors(2, users=20)
    categories = np.random.default_rng(0).integers(0, 6, 300)
    candidates = multi_interest_retrieve(interests, ItemIndex(items), 50)
    measured = [diversity(aggregate(candidates, 20, lam, categories).ids, categories).mean()
                for lam in (0.0, 0.05, 0.2, 1.0)]
    assert all(a < b for a, b in zip(measured, measured[1:])), measured
    relevance = [aggregate(candidates, 20, lam, categories).scores.sum() for lam in (0.0, 1.0)]
    assert relevance[0] > relevance[1]  # diversity costs relevance


def test_diversity_is_the_share_of_pairs_in_different_categories():
    categories = np.array([0, 1, 1, 2, 2, 2])
    got = diversity(np.array([[1, 2, 3, 4], [3, 4, 5, -1], [0, -1, -1, -1]]), categories)
    np.testing.assert_allclose(got, [4 / 6, 0.0, 0.0])
    with pytest.raises(ConfigError, match="diversity=-1"):
        aggregate(Candidates(np.zeros((1, 2), int), np.zeros((1, 2), np.float32)), 2, -1, categories)


CLUSTERS, CLUSTER_ITEMS = 4, 25


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> PreparedData:
    """240 users, each reading items of 2 or 3 of 4 clusters, the clusters interleaved in time."""
    rng = np.random.default_rng(0)
    rows = []
    for user in range(240):
        clusters = rng.choice(CLUSTERS, 2 + user % 2, replace=False)
        pool = np.concatenate([c * 100 + np.arange(CLUSTER_ITEMS) for c in clusters])
        for step, item in enumerate(rng.choice(pool, 30, replace=False)):
            rows.append((1000 + user, 5000 + item, step))
    out = tmp_path_factory.mktemp("planted")
    users, items, times = map(np.array, zip(*rows))
    pq.write_table(pa.table({"user_id": users, "item_id": items, "timestamp": times}), out / "raw.parquet")
    prepare_interactions(SourceConfig("parquet", str(out / "raw.parquet")), out / "prepared",
                         InteractionFilters(min_user_interactions=5), SplitConfig(test_fraction=0.2, seed=0))
    return PreparedData.open(out / "prepared")


@pytest.mark.parametrize(("extractor", "temperature", "dense_lr"),
                         [(DynamicRouting(interests=3), 0.2, 1e-3), (SelfAttention(interests=3), 1.0, 1e-2)],
                         ids=["dr", "sa"])
def test_interests_of_multi_cluster_users_stay_apart(planted, tmp_path, extractor, temperature, dense_lr):
    """Untrained, the 3 interests are near copies (cosine 0.99) retrieving mixed clusters; trained, each
    retrieves one of the user's clusters (measured: cosine 0.2 / -0.35, purity 0.98 / 0.95)."""
    trainer = TrainerConfig(epochs=15, batch_size=256, checkpoint_dir=str(tmp_path), progress=False)
    task = ComiRec(planted, trainer, extractor, dim=16, max_length=20, negatives=SharedNegatives(num=50),
                   temperature=temperature, dense_lr=dense_lr, table_optimizer=TableOptimizer(lr=0.1))
    for epoch in range(trainer.epochs):
        task.train_epoch(epoch, None)
    cluster = np.full(planted.n_items, -1)
    cluster[1:] = (planted.vocab("item").raw(np.arange(1, planted.n_items)).astype(int) - 5000) // 100
    indptr, items = planted.sequences("train")
    own = [set(cluster[items[indptr[u]:indptr[u + 1]]]) for u in range(planted.n_users)]
    users = np.array([u for u in range(planted.n_users) if len(own[u]) == 3])
    interests = task.interests(torch.from_numpy(users))
    unit = torch.nn.functional.normalize(interests, dim=-1)
    assert (unit @ unit.transpose(1, 2))[:, ~torch.eye(3, dtype=torch.bool)].mean() < 0.9
    index = ItemIndex(task.item_vectors()[1:].numpy(), ids=np.arange(1, planted.n_items))
    _, top = index.search(interests.reshape(-1, 16).numpy(), 5)
    counts = np.stack([np.bincount(cluster[t], minlength=CLUSTERS) for t in top])
    assert counts.max(1).mean() / 5 > 0.8  # each interest retrieves mostly one cluster
    majority = counts.argmax(1).reshape(len(users), 3)
    assert np.mean([set(m) <= own[u] for m, u in zip(majority, users)]) > 0.9  # ... one of the user's
    assert np.mean([len(set(m)) >= 2 for m in majority]) > 0.9  # ... and not the same for all interests


def test_scores_are_the_max_over_interests_and_match_retrieval(tiny_interactions, tmp_path):
    trainer = TrainerConfig(epochs=1, batch_size=256, checkpoint_dir=str(tmp_path), progress=False)
    task = ComiRec(tiny_interactions, trainer, SelfAttention(interests=2), dim=8, max_length=10)
    task.train_epoch(0, None)
    users = torch.arange(1, 9)
    interests, items = task.interests(users), task.item_vectors()
    scores = task.score_users(users)
    torch.testing.assert_close(scores, torch.einsum("bkd,nd->bkn", interests, items).amax(1))
    index = ItemIndex(items[1:].numpy(), ids=np.arange(1, tiny_interactions.n_items))
    chosen = aggregate(multi_interest_retrieve(interests.numpy(), index, 20), 20)
    assert np.array_equal(chosen.ids, scores[:, 1:].topk(20).indices.numpy() + 1)


@pytest.mark.parametrize("embedding", sorted(p.stem for p in (ROOT / "conf" / "embedding").glob("*.yaml")
                                              if p.stem != "full"))
def test_a_compressed_item_table_trains_and_scores(compose_config, tiny_interactions, embedding):
    from hydra.utils import instantiate
    from pipelines.train import build_model

    cfg = compose_config("train", ("model=comirec_dr", f"embedding={embedding}", "model.dim=32",
                                   "model.max_length=10", "trainer.batch_size=256"))
    task = build_model(cfg, tiny_interactions, instantiate(cfg.trainer))
    loss = task.train_epoch(0, None)["loss"]
    scores = task.score_users(torch.arange(1, 6))
    assert math.isfinite(loss) and scores.shape == (5, tiny_interactions.n_items) and torch.isfinite(scores).all()
    assert not torch.equal(scores[0], scores[1])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dim": 6}, "model.dim=6 is invalid: expected a multiple of 4"),
    ({"max_length": 0}, "model.max_length=0 is invalid"),
    ({"temperature": 0.0}, "model.temperature=0.0 is invalid"),
    ({"dense_lr": -1.0}, "model.dense_lr=-1.0 is invalid"),
    ({"extractor": "capsules"}, "model.extractor='capsules' is invalid"),
])
def test_bad_task_settings_name_the_field(tiny_interactions, tmp_path, kwargs, message):
    settings = {"extractor": SelfAttention(), "max_length": 5, **kwargs}
    trainer = TrainerConfig(checkpoint_dir=str(tmp_path), progress=False)
    with pytest.raises(ConfigError, match=message):
        ComiRec(tiny_interactions, trainer, **settings)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: DynamicRouting(interests=0), "model.extractor.interests=0 is invalid"),
    (lambda: DynamicRouting(iterations=0), "model.extractor.iterations=0 is invalid"),
    (lambda: DynamicRouting(per_position="yes"), "model.extractor.per_position='yes' is invalid"),
    (lambda: DynamicRouting(noise=-1.0), "model.extractor.noise=-1.0 is invalid"),
    (lambda: SelfAttention(hidden=0), "model.extractor.hidden=0 is invalid"),
    (lambda: SharedNegatives(num=0), "model.negatives.num=0 is invalid"),
    (lambda: SharedNegatives(distribution="zipf"), "model.negatives.distribution='zipf' is invalid"),
])
def test_bad_extractor_and_negative_settings_name_the_field(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_bad_settings_from_the_config_name_the_field(compose_config, tiny_interactions):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from pipelines.train import build_model

    cfg = compose_config("train", ("model=comirec_sa", "model.extractor.interests=0"))
    with pytest.raises((ConfigError, InstantiationException), match="model.extractor.interests=0 is invalid"):
        build_model(cfg, tiny_interactions, instantiate(cfg.trainer))


TINY = ("model.dim=16", "model.max_length=20", "trainer.batch_size=256", "trainer.epochs=4")
ML100K = ("model.dim=64", "model.max_length=50", "trainer.batch_size=1024")  # the yaml's settings back


class TestComiRecDRContract(ModelContract):
    model = "comirec_dr"
    overrides = TINY
    ml100k_overrides = (*ML100K, "trainer.epochs=3")
    ml100k_recall = 0.27  # measured 0.290 (0.299 after the yaml's 6 epochs; popularity 0.191, MF-BPR 0.346)

    @pytest.mark.slow  # 35 s on 2 cores: ML-100K training of ComiRec (MF's floor stays in the default suite)
    def test_ml100k_quality_floor(self, compose_config, ml100k):
        super().test_ml100k_quality_floor(compose_config, ml100k)


class TestComiRecSAContract(ModelContract):
    model = "comirec_sa"
    overrides = TINY
    ml100k_overrides = (*ML100K, "trainer.epochs=3")
    ml100k_recall = 0.27  # measured 0.295 (0.301 after the yaml's 5 epochs)

    @pytest.mark.slow  # 35 s on 2 cores: ML-100K training of ComiRec (MF's floor stays in the default suite)
    def test_ml100k_quality_floor(self, compose_config, ml100k):
        super().test_ml100k_quality_floor(compose_config, ml100k)
