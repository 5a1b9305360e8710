"""MF's sampled softmax (M shared negatives, logQ) and SimpleX's cosine contrastive loss (issue 16, part 5)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hydra.utils import instantiate

from pipelines.train import build_model
from recsys.data.schemas import ITEM, USER
from recsys.errors import ConfigError
from recsys.evaluation import PopularityScorer
from recsys.inference.export import package_model
from recsys.inference.scorers import load
from recsys.training.distributed import TableOptimizer
from recsys.training.loop import TrainerConfig, evaluate, fit
from recsys.training.losses import cosine_contrastive_loss, sampled_softmax_loss
from recsys.training.mf import MFRetrieval, Negatives
from tests.model_contract import ModelContract


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def _ccl(users, positives, negatives, positive_ids, negative_ids, margin, weight) -> float:
    """SimpleX's CCL row by row: (1 - cos(u, p)) + weight / M * sum_j max(0, cos(u, n_j) - margin), hits skipped."""
    rows = []
    for b in range(len(users)):
        positive = 1 - _cosines(users[b:b + 1], positives[b:b + 1])[0, 0]
        hinge = [max(0.0, c - margin) for j, c in enumerate(_cosines(users[b:b + 1], negatives)[0])
                 if negative_ids[j] != positive_ids[b]]
        rows.append(positive + weight / len(negatives) * sum(hinge))
    return float(np.mean(rows))


def _sampled_softmax(users, positives, negatives, positive_ids, negative_ids, log_q_pos, log_q_neg, t) -> float:
    """-log softmax of the positive over [positive, negatives that are not it], logits / t - log q."""
    rows = []
    for b in range(len(users)):
        target = users[b] @ positives[b] / t - log_q_pos[b]
        logits = [target] + [users[b] @ negatives[j] / t - log_q_neg[j] for j in range(len(negatives))
                             if negative_ids[j] != positive_ids[b]]
        rows.append(np.log(np.sum(np.exp(np.array(logits, dtype=np.float64)))) - target)
    return float(np.mean(rows))


def test_ccl_matches_a_hand_computed_two_by_three_example():
    users = np.array([[3.0, 4.0], [1.0, 0.0]])
    positives = np.array([[4.0, 3.0], [2.0, 0.0]])  # cos 24/25 = 0.96 and 1
    negatives = np.array([[0.0, 2.0], [1.0, 1.0], [-1.0, 0.0]])
    # row 0: cosines 0.8, 7/(5 sqrt 2) = 0.98995, -0.6 -> hinges over margin 0.5: 0.3, 0.48995, 0
    # row 1: cosines 0, 0.70711, -1; negative 1 is its positive (an accidental hit) -> hinges 0, (masked), 0
    expected = ((1 - 0.96) + 4 / 3 * (0.3 + 7 / (5 * 2**0.5) - 0.5) + (1 - 1.0) + 0) / 2
    assert _ccl(users, positives, negatives, [5, 7], [2, 7, 9], 0.5, 4.0) == pytest.approx(expected, rel=1e-12)
    got = cosine_contrastive_loss(torch.tensor(users), torch.tensor(positives), torch.tensor(negatives),
                                  torch.tensor([5, 7]), torch.tensor([2, 7, 9]), margin=0.5, negative_weight=4.0)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_ccl_matches_the_row_loop_on_random_vectors():
    g = np.random.default_rng(0)
    users, positives, negatives = g.normal(size=(6, 5)), g.normal(size=(6, 5)), g.normal(size=(9, 5))
    pos_ids, neg_ids = g.integers(1, 8, 6), g.integers(1, 8, 9)
    got = cosine_contrastive_loss(*map(torch.tensor, (users, positives, negatives, pos_ids, neg_ids)), 0.1, 30.0)
    assert got.item() == pytest.approx(_ccl(users, positives, negatives, pos_ids, neg_ids, 0.1, 30.0), rel=1e-9)


def test_sampled_softmax_with_logq_matches_brute_force():
    g = np.random.default_rng(1)
    users, positives, negatives = g.normal(size=(5, 4)), g.normal(size=(5, 4)), g.normal(size=(7, 4))
    pos_ids, neg_ids = np.array([3, 8, 3, 2, 9]), np.array([8, 1, 3, 5, 5, 2, 6])  # hits in rows 0-3
    log_q_pos, log_q_neg = np.log(g.uniform(0.01, 0.2, 5)), np.log(g.uniform(0.01, 0.2, 7))
    got = sampled_softmax_loss(*map(torch.tensor, (users, positives, negatives, pos_ids, neg_ids)),
                               (torch.tensor(log_q_pos), torch.tensor(log_q_neg)), temperature=0.5)
    expected = _sampled_softmax(users, positives, negatives, pos_ids, neg_ids, log_q_pos, log_q_neg, 0.5)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def _trainer(tmp_path, **kw):
    return TrainerConfig(**{"epochs": 6, "batch_size": 256, "checkpoint_dir": str(tmp_path / "ck"), "progress": False,
                            "eval_ks": [20], **kw})


def _train_counts(data) -> np.ndarray:
    items = pq.read_table(data.path("train"), columns=[ITEM])[ITEM].to_numpy()
    return np.bincount(items, minlength=data.n_items)


@pytest.mark.parametrize("distribution, exponent", [("popularity", 0.75), ("uniform", 1.0)])
def test_shared_negatives_follow_the_configured_distribution(tiny_interactions, tmp_path, distribution, exponent):
    task = MFRetrieval(tiny_interactions, _trainer(tmp_path), dim=8, loss="sampled_softmax",
                       negatives=Negatives(distribution, num=64, exponent=exponent))
    counts = _train_counts(tiny_interactions).astype(np.float64)
    weights = counts**exponent if distribution == "popularity" else np.ones_like(counts)
    weights[0] = 0.0  # OOV
    q = weights / weights.sum()
    drawn = torch.cat([task.sampler.sample(task.negatives.num, torch.Generator().manual_seed(s)) for s in range(3000)])
    frequency = np.bincount(drawn.numpy(), minlength=len(q)) / len(drawn)
    assert frequency[q == 0].sum() == 0 and np.abs(frequency - q).max() < 5 * np.sqrt(q.max() / len(drawn))
    drawable = q > 0
    np.testing.assert_allclose(task.sampler.log_probabilities.numpy()[drawable], np.log(q[drawable]), rtol=1e-5)

    # the loss of one batch: the same negatives (same seed) against a numpy softmax with numpy's log q
    rows = pq.read_table(tiny_interactions.path("train")).slice(0, 6)
    users, items = torch.tensor(rows[USER].to_numpy()), torch.tensor(rows[ITEM].to_numpy())
    with torch.no_grad():
        got = task._loss(users, items, torch.Generator().manual_seed(7)).item()
    negatives = task.sampler.sample(task.negatives.num, torch.Generator().manual_seed(7)).numpy()
    u, p, n = (task.embed(f, torch.as_tensor(ids)).double().numpy()
               for f, ids in ((USER, users), (ITEM, items), (ITEM, negatives)))
    expected = _sampled_softmax(u, p, n, items.numpy(), negatives, np.log(q[items.numpy()]), np.log(q[negatives]), 1.0)
    assert got == pytest.approx(expected, rel=1e-4)


def test_simplex_loss_of_a_batch_is_the_ccl_of_its_shared_negatives(tiny_interactions, tmp_path):
    task = MFRetrieval(tiny_interactions, _trainer(tmp_path), dim=8, loss="simplex", negatives=Negatives(num=50),
                       margin=0.2, negative_weight=5.0)
    users, items = torch.tensor([1, 2, 3]), torch.tensor([5, 9, 5])
    with torch.no_grad():
        got = task._loss(users, items, torch.Generator().manual_seed(3)).item()
    negatives = task.sampler.sample(50, torch.Generator().manual_seed(3)).numpy()
    u, p, n = (task.embed(f, torch.as_tensor(ids)).double().numpy()
               for f, ids in ((USER, users), (ITEM, items), (ITEM, negatives)))
    assert got == pytest.approx(_ccl(u, p, n, items.numpy(), negatives, 0.2, 5.0), rel=1e-4)


@pytest.mark.parametrize("loss, extra", [
    ("sampled_softmax", {"negatives": Negatives(num=100)}),
    ("simplex", {"negatives": Negatives(num=100), "margin": 0.3, "negative_weight": 3.0}),  # see TestMFSimplexContract
])
def test_new_losses_beat_popularity_on_planted_data(tiny_interactions, tmp_path, loss, extra):
    task = MFRetrieval(tiny_interactions, _trainer(tmp_path), dim=16, loss=loss,
                       table_optimizer=TableOptimizer(lr=0.1), **extra)
    metrics = fit(task, tiny_interactions, _trainer(tmp_path))
    baseline = evaluate(PopularityScorer(tiny_interactions.matrix("train")), tiny_interactions, "test", [20])
    assert metrics["recall@20"] > 1.3 * baseline["recall@20"], (metrics, baseline)


def _cosine(queries: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(queries.unsqueeze(1), items.unsqueeze(0), dim=-1)


def test_simplex_ranks_by_cosine_in_training_and_serving(tiny_interactions, tmp_path):
    task = MFRetrieval(tiny_interactions, _trainer(tmp_path, epochs=1), dim=8, loss="simplex")
    fit(task, tiny_interactions, _trainer(tmp_path, epochs=1))
    users = torch.arange(1, 20)
    u, items = task.embed(USER, users), task.embed(ITEM, torch.arange(tiny_interactions.n_items))
    norms = items[1:].norm(dim=1)
    assert norms.max() > 1.2 * norms.min()  # the item norms differ: cosine and inner product rank differently
    torch.testing.assert_close(task.score_users(users), _cosine(u, items), rtol=1e-5, atol=1e-6)
    assert task.export()[1]["similarity"] == "cosine"
    package = package_model(task, tiny_interactions)
    # an unseen user given items: the cosine with the mean of the items' unit vectors
    histories = [np.array([3, 4, 9]), np.array([7])]
    means = torch.stack([torch.nn.functional.normalize(items[h], dim=1).mean(0) for h in histories])
    torch.testing.assert_close(load(package).score_histories(histories), _cosine(means, items), rtol=1e-5, atol=1e-6)
    # a FAISS index (IVF with one list: exhaustive) holds the unit vectors: its top-k is the cosine top-k
    stored = load(package).recommend(users.numpy()[:3], 5, exclude_seen=False)
    indexed = load(package, index="IVF1,Flat").recommend(users.numpy()[:3], 5, exclude_seen=False)
    for a, b in zip(stored, indexed):
        np.testing.assert_array_equal(a.items, b.items)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)


COMPRESSION = {"full": (), "hashing": ("embedding=hashing",), "quotient_remainder": ("embedding=quotient_remainder",),
               "product_quantization": ("embedding=product_quantization",)}


@pytest.mark.parametrize("embedding", sorted(COMPRESSION))
@pytest.mark.parametrize("model", ["mf_sampled_softmax", "mf_simplex"])
def test_packages_serve_the_trained_scores_and_top_k(compose_config, tiny_interactions, model, embedding):
    """Every compression method: the loss trains through the collection's vectors, and the loaded package scores
    (cosine for SimpleX, from the tables as stored) and ranks exactly as the trained model."""
    cfg = compose_config("train", (f"model={model}", "model.dim=16", "trainer.batch_size=256", "trainer.epochs=1",
                                   "model.negatives.num=64", *COMPRESSION[embedding]))
    trainer = instantiate(cfg.trainer)
    task = build_model(cfg, tiny_interactions, trainer)
    metrics = fit(task, tiny_interactions, trainer)
    assert np.isfinite(metrics["recall@20"])
    recommender = load(package_model(task, tiny_interactions))
    users = torch.arange(1, tiny_interactions.n_users)
    expected = task.score_users(users)
    torch.testing.assert_close(recommender.score_users(users), expected, rtol=1e-5, atol=1e-5)
    found = recommender.recommend(users.numpy(), 10, exclude_seen=False)
    for row, rec in enumerate(found[:40]):
        scores = expected[row].clone()
        scores[0] = -torch.inf
        top = scores.topk(10).values
        served = torch.as_tensor(rec.scores)
        torch.testing.assert_close(served, top, rtol=1e-5, atol=1e-5)  # the same top-10 scores, best first
        torch.testing.assert_close(expected[row][torch.as_tensor(recommender.item_index(rec.items))], served,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"loss": "hinge"}, r"model.loss='hinge' is invalid: expected one of \['bpr', 'softmax', 'sampled_softmax', "
                        r"'simplex'\]"),
    ({"negatives": Negatives(num=0)}, r"model.negatives.num=0 is invalid: expected an integer >= 1"),
    ({"margin": 1.0}, r"model.margin=1.0 is invalid: expected a cosine in \[-1, 1\)"),
    ({"margin": -1.5}, r"model.margin=-1.5 is invalid"),
    ({"negative_weight": 0}, r"model.negative_weight=0 is invalid: expected a number > 0"),
    ({"temperature": 0.0}, r"model.temperature=0.0 is invalid: expected a number > 0"),
])
def test_mf_rejects_bad_loss_settings(tiny_interactions, tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MFRetrieval(tiny_interactions, _trainer(tmp_path), **kwargs)


class TestMFSimplexContract(ModelContract):
    """The tiny planted data (200 items, a fifth of them each user's) wants a lower margin and weight than the
    config's (0.5 and 10, best on ML-100K): many sampled negatives are the user's own items. Margin 0.5 and weight
    10 stay near popularity there (recall@20 0.37-0.39 vs 0.38); margin 0.3 and weight 3 reach 0.75."""

    model = "mf_simplex"
    overrides = ("model.dim=16", "trainer.batch_size=256", "trainer.epochs=4", "model.table_optimizer.lr=0.1",
                 "model.negatives.num=100", "model.margin=0.3", "model.negative_weight=3")
    ml100k_overrides = ("trainer.epochs=10", "model.negatives.num=800", "model.margin=0.5", "model.negative_weight=10")
    ml100k_recall = 0.31  # recall_capped@20 measured 0.329 (recall@20 0.314; MF-BPR 0.346 capped)

    @pytest.mark.slow  # 15 s on 2 cores: ML-100K training at 800 negatives (MF-BPR's floor stays in the default suite)
    def test_ml100k_quality_floor(self, compose_config, ml100k):
        super().test_ml100k_quality_floor(compose_config, ml100k)
