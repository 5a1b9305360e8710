"""The training loop: early stopping on a validation metric restores the best epoch, also across a resume; progress
bars only where they redraw in place."""

from __future__ import annotations

import io
import logging
import re
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys.data.dataset import PreparedData
from recsys.data.prepare import InteractionFilters, SourceConfig, prepare_interactions
from recsys.data.splits import SplitConfig
from recsys.errors import ConfigError
from recsys.training.loop import TrainerConfig, evaluate, fit
from tests.conftest import TINY

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

# quality of the scores after each epoch: 1 = the true test/valid items on top, 0 = random, -1 = at the bottom
SCHEDULE = [0.0, 1.0, 0.5, -1.0, -1.0, -1.0, 1.0, 1.0]


class Scheduled:
    """A Trainable whose score quality after epoch e is SCHEDULE[e]: a known best epoch for early stopping."""

    def __init__(self, data: PreparedData):
        self.data = data
        self.quality = torch.zeros(())
        truth = data.matrix("valid") + data.matrix("test")
        self.truth = torch.from_numpy(truth.toarray()).float()
        self.noise = torch.rand(self.truth.shape, generator=torch.Generator().manual_seed(0))
        self.epochs_trained = 0

    def train_epoch(self, epoch, progress):
        self.quality.fill_(SCHEDULE[epoch])
        self.epochs_trained += 1
        return {}

    def score_users(self, users):
        return self.quality * self.truth[users] + 0.1 * self.noise[users]

    def state(self):
        return {"quality": self.quality}

    def load_state(self, state):
        self.quality.copy_(state["quality"])

    def memory(self):
        return {"quality": 4}


@pytest.fixture(scope="module")
def with_valid(tmp_path_factory) -> PreparedData:
    out = tmp_path_factory.mktemp("valid")
    prepare_interactions(SourceConfig("synthetic", str(out / "raw.parquet"), generator=TINY), out / "prepared",
                         InteractionFilters(min_user_interactions=5), SplitConfig(valid_fraction=0.2, seed=0))
    return PreparedData.open(out / "prepared")


def _trainer(tmp_path, **kw):
    return TrainerConfig(**{"epochs": len(SCHEDULE), "eval_every": 1, "eval_ks": [10], "progress": False,
                            "checkpoint_dir": str(tmp_path / "ck"), "early_stopping": "recall@10", "patience": 2,
                            **kw})


def test_early_stopping_restores_the_best_epoch(with_valid, tmp_path):
    model, logged = Scheduled(with_valid), []
    metrics = fit(model, with_valid, _trainer(tmp_path), log=lambda m, step: logged.append((step, m)))
    assert model.epochs_trained == 4  # best at epoch 1, two evaluations without improvement: stop after epoch 3
    assert model.quality.item() == 1.0  # the best epoch's state, not the last one's (0.5)
    best = Scheduled(with_valid)
    best.quality.fill_(1.0)
    assert metrics == evaluate(best, with_valid, "test", [10])
    assert logged[-1] == (1, {"best_valid_recall@10": pytest.approx(logged[1][1]["valid_recall@10"]), "best_epoch": 1})


def test_early_stopping_survives_a_resume(with_valid, tmp_path):
    fit(Scheduled(with_valid), with_valid, _trainer(tmp_path, epochs=3))  # best at 1, one stale evaluation
    resumed = Scheduled(with_valid)
    metrics = fit(resumed, with_valid, _trainer(tmp_path, resume=True))
    assert resumed.epochs_trained == 1 and resumed.quality.item() == 1.0  # epoch 3 is the second stale one
    assert metrics["recall_capped@10"] > 0.9  # the true items on top (hits / min(10, |test|))


def test_minimised_metrics_and_bad_settings(with_valid, tmp_path):
    assert TrainerConfig(early_stopping="logloss", eval_every=1).improved(0.3, 0.4)
    assert not TrainerConfig(early_stopping="auc", eval_every=1).improved(0.3, 0.4)
    with pytest.raises(ConfigError, match="needs trainer.eval_every >= 1"):
        TrainerConfig(early_stopping="auc")
    with pytest.raises(ConfigError, match="'ndcg@99' is not a validation metric"):
        fit(Scheduled(with_valid), with_valid, _trainer(tmp_path, early_stopping="ndcg@99"))


def test_early_stopping_needs_a_validation_split(tiny_interactions, tmp_path):
    with pytest.raises(ConfigError, match="needs a validation split"):
        fit(Scheduled.__new__(Scheduled), tiny_interactions, _trainer(tmp_path))


class Chatty(Scheduled):
    """Scheduled, updating its progress bar as the CTR models do: a step and a loss per batch."""

    def train_epoch(self, epoch, progress):
        progress.reset(total=50)
        for step in range(50):
            progress.update()
            progress.set_postfix(loss=f"{1 / (step + 1):.4f}")  # redraws the bar, however fast the loop
        return super().train_epoch(epoch, progress) | {"loss": 0.5}


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [False, True])
def test_a_log_file_gets_one_progress_line_per_epoch(with_valid, tmp_path, monkeypatch, caplog, terminal):
    stderr = Terminal() if terminal else io.StringIO()  # a CI or nohup log is not a terminal
    monkeypatch.setattr(sys, "stderr", stderr)
    caplog.set_level(logging.INFO, logger="recsys.training.loop")
    fit(Chatty(with_valid), with_valid, _trainer(tmp_path, epochs=3, early_stopping=None, progress=True))
    drawn = [line for line in re.split(r"[\r\n]", stderr.getvalue()) if "epoch" in line]
    assert len(drawn) > 3 * 50 if terminal else not drawn, drawn[:5]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert re.match(r"epoch 1/3: loss 0.5, epoch_seconds [0-9.e-]+, valid_recall@10 [0-9.e-]+, ", lines[0]), lines[0]


@pytest.mark.parametrize("terminal", [False, True])
def test_batch_scoring_in_a_log_file_logs_one_line_per_file(tiny_interactions, tmp_path, monkeypatch, caplog, terminal):
    from recsys.inference.batch import BatchSettings, score_parquet
    from recsys.inference.export import package_model
    from recsys.training.mf import MFRetrieval

    cfg = TrainerConfig(epochs=1, batch_size=256, checkpoint_dir=str(tmp_path / "ck"), progress=False, eval_ks=[10])
    model = MFRetrieval(tiny_interactions, cfg, dim=8)
    fit(model, tiny_interactions, cfg)
    package = package_model(model, tiny_interactions).save(tmp_path / "package")
    users = pa.table({"user_id": tiny_interactions.vocab("user").ids})
    (tmp_path / "in").mkdir()
    for f in range(3):
        pq.write_table(users.take(list(range(f, users.num_rows, 3))), tmp_path / "in" / f"users-{f}.parquet")
    stderr = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    caplog.set_level(logging.INFO, logger="recsys.inference.batch")
    score_parquet(package, tmp_path / "in", tmp_path / "out", BatchSettings(batch_size=10, progress=True))
    drawn = [line for line in re.split(r"[\r\n]", stderr.getvalue()) if "batch score" in line]
    # on a terminal the bar is drawn at its start and its close; redraws between depend on speed (tqdm's mininterval)
    assert len(drawn) >= 2 if terminal else not drawn, drawn[:5]
    lines = [r.getMessage() for r in caplog.records if "files done" in r.getMessage()]
    assert [line.split(" (")[0] for line in lines] == ([] if terminal else [f"batch score: {n}/3 files done"
                                                                              for n in (1, 2, 3)])
