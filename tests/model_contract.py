"""The behaviour every recommender trained by ``pipelines.train`` must have.

A model's test file subclasses :class:`ModelContract` and sets a few attributes, e.g.::

    class TestEASE(ModelContract):
        model = "ease"
        overrides = ("model.regularization=50",)
        ml100k_recall = 0.37
"""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient

from recsys.embeddings.memory import tensor_bytes
from recsys.evaluation import PopularityScorer
from recsys.training.loop import evaluate, fit

SMALL_SYNTHETIC = ("data.source.generator.n_users=300", "data.source.generator.n_items=200",
                   "data.source.generator.n_interactions=12000", "trainer.batch_size=256")


class ModelContract:
    """Shared tests; a subclass names the model and its settings for tiny planted data and ML-100K."""

    model: str  # the conf/model/<name>.yaml option
    overrides: tuple[str, ...] = ()  # settings for the tiny planted data (300 users, 200 items)
    popularity_factor: float = 1.3  # Recall@20 on tiny planted data must exceed popularity's by this factor
    ml100k_overrides: tuple[str, ...] = ()  # settings of the ML-100K quality floor
    ml100k_recall: float | None = None  # Recall@20 floor on ML-100K (ratings >= 4, per-user 80/20)

    def build(self, compose_config, data, *extra: str):
        """(model, trainer, cfg) composed from the real config with the subclass's settings."""
        from pipelines.train import build_model

        cfg = compose_config("train", (f"model={self.model}", *self.overrides, *extra))
        trainer = instantiate(cfg.trainer)
        return build_model(cfg, data, trainer), trainer, cfg

    def test_config_names_the_model(self, compose_config):
        cfg = compose_config("train", (f"model={self.model}", *self.overrides))
        assert cfg.model.name == self.model

    def test_scores_every_item_after_training(self, compose_config, tiny_interactions):
        model, trainer, _ = self.build(compose_config, tiny_interactions)
        fit(model, tiny_interactions, trainer)
        users = torch.tensor([1, 2, 3, tiny_interactions.n_users - 1])
        scores = model.score_users(users)
        assert scores.shape == (4, tiny_interactions.n_items) and scores.dtype == torch.float32
        assert torch.isfinite(scores).all()
        assert not torch.equal(scores[0], scores[1])  # personalised

    def test_beats_popularity_on_planted_data(self, compose_config, tiny_interactions):
        model, trainer, _ = self.build(compose_config, tiny_interactions)
        metrics = fit(model, tiny_interactions, trainer)
        baseline = evaluate(PopularityScorer(tiny_interactions.matrix("train")), tiny_interactions, "test", [20])
        assert metrics["recall@20"] > self.popularity_factor * baseline["recall@20"], (metrics, baseline)

    def test_state_round_trip_gives_the_same_scores(self, compose_config, tiny_interactions):
        trained, trainer, _ = self.build(compose_config, tiny_interactions)
        fit(trained, tiny_interactions, trainer)
        fresh, _, _ = self.build(compose_config, tiny_interactions, "trainer.seed=7")
        state = fresh.state()
        _copy_into(state, trained.state())
        fresh.load_state(state)
        users = torch.arange(1, 40)
        torch.testing.assert_close(fresh.score_users(users), trained.score_users(users))

    def test_resume_ends_with_the_same_metrics(self, compose_config, tiny_interactions, tmp_path):
        def run(directory, epochs, resume=False):
            model, trainer, _ = self.build(compose_config, tiny_interactions, f"trainer.checkpoint_dir={directory}",
                                           f"trainer.epochs={epochs}", f"trainer.resume={str(resume).lower()}")
            return fit(model, tiny_interactions, trainer)

        straight = run(tmp_path / "a", 3)
        run(tmp_path / "b", 1)
        assert run(tmp_path / "b", 3, resume=True) == pytest.approx(straight, rel=1e-5)

    def test_memory_is_counted_in_bytes_of_real_tensors(self, compose_config, tiny_interactions):
        model, _, _ = self.build(compose_config, tiny_interactions)
        memory = model.memory()
        assert memory and all(isinstance(v, int) and v > 0 for v in memory.values()), memory
        if hasattr(model, "memory_parts"):
            assert sum(model.memory_parts().values()) == sum(memory.values())
        assert sum(memory.values()) <= sum(tensor_bytes(t) for t in _tensors(model.state()))

    @pytest.mark.integration
    def test_pipeline_logs_an_mlflow_run(self, compose_config, tmp_path):
        from pipelines.train import run

        cfg = compose_config("train", (f"model={self.model}", *SMALL_SYNTHETIC, *self.overrides))
        result = run(cfg)
        logged = MlflowClient(result["tracking_uri"]).get_run(result["run_id"])
        assert logged.data.tags["model"] == self.model and logged.info.status == "FINISHED"
        assert logged.data.metrics["test_recall_at_20"] == pytest.approx(result["metrics"]["recall@20"])
        assert logged.data.metrics["table_bytes_total"] == sum(result["memory"].values()) > 0
        assert result["metrics"]["recall@20"] > result["baseline"]["recall@20"]

    def test_ml100k_quality_floor(self, compose_config, ml100k):
        if self.ml100k_recall is None:
            pytest.skip("no ML-100K floor set for this model")
        model, trainer, _ = self.build(compose_config, ml100k, *self.ml100k_overrides)
        metrics = fit(model, ml100k, trainer)
        assert metrics["recall_capped@20"] >= self.ml100k_recall, metrics  # floors measured as hits / min(20, |test|)


def _tensors(state):
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from _tensors(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _tensors(value)


def _copy_into(target, source):
    """Copies ``source``'s tensors into ``target``'s matching tensors (a checkpoint load without files)."""
    if isinstance(target, torch.Tensor):
        target.copy_(source)
    elif isinstance(target, dict):
        for key in target:
            _copy_into(target[key], source[key])
    elif isinstance(target, (list, tuple)):
        for t, s in zip(target, source):
            _copy_into(t, s)
    else:
        assert target == source or (isinstance(target, float) and math.isclose(target, source))
