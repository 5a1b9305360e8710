import math

import numpy as np
import pytest
import torch

from recsys.data.schemas import ITEM, USER
from recsys.embeddings.collection import EmbeddingSettings
from recsys.embeddings.hashing import Hashing
from recsys.evaluation import PopularityScorer
from recsys.errors import ConfigError
from recsys.training.distributed import TableOptimizer
from recsys.training.loop import TrainerConfig, evaluate, fit
from tests.model_contract import ModelContract
from recsys.training.losses import bpr_loss, in_batch_softmax_loss
from recsys.training.mf import MFRetrieval, Negatives
from recsys.training.sampling import NegativeSampler


def test_bpr_loss_matches_its_formula():
    pos, neg = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 1.0, 0.5])
    expected = np.mean([-math.log(1 / (1 + math.exp(-(p - n)))) for p, n in zip(pos.tolist(), neg.tolist())])
    assert bpr_loss(pos, neg).item() == pytest.approx(expected, rel=1e-6)


def test_in_batch_softmax_matches_a_loop_reference_with_logq_and_accidental_hits():
    torch.manual_seed(0)
    users, items = torch.randn(5, 4), torch.randn(5, 4)
    ids = torch.tensor([3, 8, 3, 2, 9])  # rows 0 and 2 share an item: masked for each other
    log_q = torch.log(torch.tensor([0.3, 0.1, 0.3, 0.2, 0.1]))
    total = 0.0
    for b in range(5):
        logits = [(users[b] @ items[j]).item() / 0.5 - log_q[j].item() for j in range(5)
                  if j == b or ids[j] != ids[b]]
        target = (users[b] @ items[b]).item() / 0.5 - log_q[b].item()
        total += -(target - math.log(sum(math.exp(x) for x in logits)))
    got = in_batch_softmax_loss(users, items, ids, log_q, temperature=0.5).item()
    assert got == pytest.approx(total / 5, rel=1e-5)


def test_negative_sampler_never_draws_oov_and_follows_popularity():
    counts = np.array([100, 1, 2, 7])  # index 0 is OOV: never drawn even with the largest count
    draws = NegativeSampler(counts, "popularity").sample(100_000, torch.Generator().manual_seed(0))
    freq = np.bincount(draws.numpy(), minlength=4) / 100_000
    assert freq[0] == 0 and freq[1:] == pytest.approx([0.1, 0.2, 0.7], abs=0.01)
    uniform = NegativeSampler(counts, "uniform").sample(30_000, torch.Generator().manual_seed(0))
    assert uniform.min() == 1 and np.bincount(uniform.numpy(), minlength=4)[1:] / 30_000 == pytest.approx([1 / 3] * 3, abs=0.02)
    with pytest.raises(ConfigError, match="distribution must be 'uniform' or 'popularity'"):
        NegativeSampler(counts, "zipf")


def _trainer(tmp_path, **kw):
    return TrainerConfig(**{"epochs": 6, "batch_size": 256, "checkpoint_dir": str(tmp_path / "ck"), "progress": False,
                            "eval_ks": [20], **kw})


@pytest.mark.parametrize("loss", ["bpr", "softmax"])
def test_mf_beats_popularity_on_planted_data(tiny_interactions, tmp_path, loss):
    extra = {"temperature": 0.2} if loss == "softmax" else {"negatives": Negatives(num=4)}
    task = MFRetrieval(tiny_interactions, _trainer(tmp_path), dim=16, loss=loss,
                       table_optimizer=TableOptimizer(lr=0.1), **extra)
    metrics = fit(task, tiny_interactions, _trainer(tmp_path))
    baseline = evaluate(PopularityScorer(tiny_interactions.matrix("train")), tiny_interactions, "test", [20])
    assert metrics["recall@20"] > 1.5 * baseline["recall@20"], (metrics, baseline)


def test_resume_ends_with_the_same_metrics(tiny_interactions, tmp_path):
    def run(directory, epochs, resume=False):
        cfg = _trainer(directory, epochs=epochs, resume=resume)
        return fit(MFRetrieval(tiny_interactions, cfg, dim=8), tiny_interactions, cfg)

    straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4, resume=True)
    assert resumed == straight


def test_table_memory_is_measured_from_the_sharded_tensors(tiny_interactions, tmp_path):
    task = MFRetrieval(tiny_interactions, _trainer(tmp_path), dim=8)
    n_users, n_items = tiny_interactions.n_users, tiny_interactions.n_items
    assert task.memory() == {"user": n_users * 8 * 4, "item": n_items * 8 * 4}


def test_item_bias_carries_popularity_when_every_item_shares_one_row(tiny_interactions, tmp_path):
    """All users and all items hashed into one row each: the vectors cannot tell items apart, so without a bias the
    ranking is a random tie-break, and with one it is the popularity ranking the bias learns."""
    shared = EmbeddingSettings(default=Hashing(rows=1))
    popularity = evaluate(PopularityScorer(tiny_interactions.matrix("train")), tiny_interactions, "test", [20])

    def recall(item_bias: bool) -> float:
        cfg = _trainer(tmp_path / str(item_bias))
        task = MFRetrieval(tiny_interactions, cfg, dim=8, embedding=shared, item_bias=item_bias,
                           table_optimizer=TableOptimizer(lr=0.1))
        return fit(task, tiny_interactions, cfg)["recall@20"]

    assert recall(True) >= 0.95 * popularity["recall@20"] > 2 * recall(False), popularity


@pytest.mark.parametrize("loss", ["bpr", "softmax", "sampled_softmax"])
def test_scores_are_inner_products_plus_the_item_bias(tiny_interactions, tmp_path, loss):
    cfg = _trainer(tmp_path, epochs=1)
    task = MFRetrieval(tiny_interactions, cfg, dim=8, loss=loss, item_bias=True, negatives=Negatives(num=16))
    fit(task, tiny_interactions, cfg)
    bias = task.item_bias.detach()[:, 0]
    assert bias.abs().max() > 0  # trained by every loss
    users, items = torch.arange(1, 6), torch.arange(tiny_interactions.n_items)
    expected = task.embed(USER, users) @ task.embed(ITEM, items).T + bias
    torch.testing.assert_close(task.score_users(users), expected)
    n_users, n_items = tiny_interactions.n_users, tiny_interactions.n_items
    assert task.memory() == {"user": n_users * 8 * 4, "item": n_items * 8 * 4 + n_items * 4}


def test_mf_rejects_bad_settings(tiny_interactions, tmp_path):
    with pytest.raises(ConfigError, match=r"model.loss='hinge' is invalid: expected one of \['bpr', 'softmax', "):
        MFRetrieval(tiny_interactions, _trainer(tmp_path), loss="hinge")
    with pytest.raises(ConfigError, match="table_optimizer.name must be one of"):
        MFRetrieval(tiny_interactions, _trainer(tmp_path), table_optimizer=TableOptimizer(name="lbfgs"))
    with pytest.raises(ConfigError, match=r"item_bias does not apply to loss=simplex"):
        MFRetrieval(tiny_interactions, _trainer(tmp_path), loss="simplex", item_bias=True)
    with pytest.raises(ConfigError, match=r"model.item_bias='yes' is invalid: expected true or false"):
        MFRetrieval(tiny_interactions, _trainer(tmp_path), item_bias="yes")


class TestMFContract(ModelContract):
    model = "mf_bpr"
    overrides = ("model.dim=16", "trainer.batch_size=256", "trainer.epochs=4", "model.table_optimizer.lr=0.1")
    ml100k_overrides = ("trainer.epochs=10",)
    ml100k_recall = 0.32  # measured 0.346
