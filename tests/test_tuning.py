"""Tuning: search spaces, a real Optuna study over real training runs, its MLflow runs and the tuned config."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf

from pipelines.config import CONF, compose_run
from pipelines.tune import run
from recsys.errors import ConfigError
from recsys.tuning import SearchSpace, tuned_config
from tests.conftest import TINY_TRAIN

MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


@pytest.mark.parametrize("config, message", [
    ({"params": {"model.dim": {"type": "categorical", "choices": [8]}}}, "search.metric is missing"),
    ({"metric": "recall@20", "params": {}}, "search.params is empty"),
    ({"metric": "recall@20", "direction": "up", "params": {"a": {"type": "int", "low": 1, "high": 2}}},
     "search.direction must be maximize or minimize, got 'up'"),
    ({"metric": "recall@20", "params": {"model.lr": {"type": "float", "low": 0.1}}},
     r"search.params.model.lr: a float needs 'low' and 'high'"),
    ({"metric": "recall@20", "params": {"model.lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}},
     r"search.params.model.lr: .*low"),
    ({"metric": "recall@20", "params": {"model.lr": {"type": "float", "low": 0.1, "high": 1, "log": True,
                                                     "step": 0.1}}}, "'log' and 'step' exclude each other"),
    ({"metric": "recall@20", "params": {"model.dim": {"type": "categorical"}}},
     "search.params.model.dim: a categorical needs a non-empty 'choices' list"),
    ({"metric": "recall@20", "params": {"model.dim": {"type": "normal", "low": 1, "high": 2}}},
     "type must be float, int or categorical, got 'normal'"),
    ({"metric": "recall@20", "params": {"model.dim": {"type": "int", "low": 1, "high": 2, "mean": 1}}},
     "search.params.model.dim: .*mean"),
    ({"metric": "recall@20", "params": {"data.split.seed": {"type": "int", "low": 1, "high": 2}}},
     "data.split.seed: a study tunes a model on one dataset"),
    ({"metric": "recall@20", "grid": {}, "params": {"a": {"type": "int", "low": 1, "high": 2}}},
     r"search: unknown key\(s\) \['grid'\]"),
])
def test_bad_search_spaces_name_the_key_and_the_problem(config, message):
    with pytest.raises(ConfigError, match=message):
        SearchSpace.from_config(config)


def test_distributions_are_optunas():
    space = SearchSpace.from_config({"metric": "auc", "params": {
        "model.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        "trainer.epochs": {"type": "int", "low": 10, "high": 60, "step": 10},
        "model.dim": {"type": "categorical", "choices": [16, 32]}}, "fixed": {"trainer.batch_size": 256}})
    assert space.distributions() == {
        "model.lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
        "trainer.epochs": optuna.distributions.IntDistribution(10, 60, step=10),
        "model.dim": optuna.distributions.CategoricalDistribution([16, 32])}
    assert space.fixed == {"trainer.batch_size": 256}


@pytest.mark.parametrize("model", MODELS)
def test_every_model_has_a_search_space_over_keys_of_its_config(model):
    cfg = compose_run("tune", [f"model={model}"])
    space = SearchSpace.from_config(OmegaConf.to_container(cfg.search))
    missing = [key for key in [*space.params, *space.fixed] if OmegaConf.select(cfg, key, default="<none>") == "<none>"]
    assert not missing, f"conf/search/{model}.yaml names keys the config does not have: {missing}"


def test_tuned_config_nests_keys_and_selects_the_groups():
    text = tuned_config({"model": "als", "data": "ml100k"}, {"model.alpha": 5.0, "trainer.epochs": 15}, "note")
    assert text.startswith("# @package _global_\n# note\n")
    assert OmegaConf.create(text.split("\n", 2)[2]) == OmegaConf.create(
        {"defaults": [{"override /model": "als"}, {"override /data": "ml100k"}],
         "model": {"alpha": 5.0}, "trainer": {"epochs": 15}})


def test_a_three_trial_study_logs_its_runs_writes_a_config_train_accepts_and_resumes(tmp_path: Path):
    overrides = [f"paths.root={tmp_path}", *TINY_TRAIN, "data.split.valid_fraction=0.1", "model=mf_bpr",
                 "model.dim=16", "trainer.eval_ks=[20]", "tune.trials=3", "tune.startup_trials=1",
                 "tune.warmup_epochs=0"]
    cfg = compose_run("tune", overrides)
    cfg.search = OmegaConf.create({"metric": "ndcg@20", "params": {
        "model.table_optimizer.lr": {"type": "float", "low": 0.001, "high": 0.3, "log": True}},
        "fixed": {"trainer.epochs": 3}})
    result = run(cfg)

    study = result["study"]
    assert len(study.trials) == 3 and result["trials"]["complete"] + result["trials"]["pruned"] == 3
    best = max((t for t in study.trials if t.value is not None), key=lambda t: t.value)
    assert (result["best_trial"], result["best_value"]) == (best.number, best.value)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("recsys").experiment_id])
    parent = next(r for r in runs if r.info.run_id == result["run_id"])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result["run_id"]]
    assert len(children) == 3 and parent.data.metrics["best_valid_ndcg_at_20"] == pytest.approx(best.value)
    for child in children:
        pruned = study.trials[int(child.data.tags["trial"])].state == optuna.trial.TrialState.PRUNED
        assert child.info.status == ("KILLED" if pruned else "FINISHED")
        assert float(child.data.params["model.table_optimizer.lr"]) == pytest.approx(
            study.trials[int(child.data.tags["trial"])].params["model.table_optimizer.lr"])
    assert not [k for r in runs for k in r.data.metrics if k.startswith("test_")], "a study must not read test"

    tuned = compose_run("train", [f"hydra.searchpath=[file://{tmp_path / 'tuning'}]", "+tuned=mf_bpr-synthetic"])
    assert tuned.model.table_optimizer.lr == pytest.approx(best.params["model.table_optimizer.lr"])
    assert (tuned.trainer.epochs, tuned.model.dim, tuned.data.split.valid_fraction) == (3, 16, 0.1)
    assert tuned.data.source.generator.n_users == 300 and tuned.trainer.early_stopping == "ndcg@20"

    study.ask()  # a run killed during a trial leaves it RUNNING in the store
    cfg.tune.trials = 4  # the stored study resumes: the killed trial failed, then one more trial, not four
    states = [t.state for t in run(cfg)["study"].trials]
    assert len(states) == 5 and states[3] == optuna.trial.TrialState.FAIL
    assert optuna.trial.TrialState.RUNNING not in states


def test_a_study_needs_a_validation_split(tmp_path: Path):
    cfg = compose_run("tune", [f"paths.root={tmp_path}", *TINY_TRAIN, "model=ease", "tune.trials=1"])
    with pytest.raises(ConfigError, match="tuning needs a validation split"):
        run(cfg)


def test_a_failing_trial_names_the_bad_key_and_is_stored_as_failed(tmp_path: Path):
    cfg = compose_run("tune", [f"paths.root={tmp_path}", *TINY_TRAIN, "data.split.valid_fraction=0.1", "model=ease",
                               "tune.trials=1"])
    cfg.search = OmegaConf.create({"metric": "recall@20", "params": {
        "model.no_such_knob": {"type": "float", "low": 0.1, "high": 1.0}}})
    with pytest.raises(ConfigError, match="'model.no_such_knob' is not a key of the training config"):
        run(cfg)
    study = optuna.load_study(study_name="ease-synthetic", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL]
