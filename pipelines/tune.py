"""Tune a model on the validation split with Optuna: ``python -m pipelines.tune data=... model=... tune.trials=30``.

The search space is ``conf/search/<model>.yaml`` (see ``recsys.tuning``). One MLflow parent run holds the study and
one child run per trial holds the trial's values and per-epoch validation metrics; the test split is never read.
Trials report the validation metric after every epoch and the median rule prunes the poor ones. The study lives
in an Optuna store (SQLite by default), so a stopped study resumes where it stopped. The best trial is saved as
``<tune.output_dir>/tuned/<study>.yaml``;

    python -m pipelines.train --config-dir <tune.output_dir> +tuned=<study>

trains it on the training split and reports the test split. From Python: ``tune("model=ease", "tune.trials=5")``.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import hydra
import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pipelines.config import compose_run
from pipelines.prepare import ensure_prepared
from pipelines.train import build_model
from recsys.errors import ConfigError
from recsys.training.loop import fit
from recsys.tuning import SearchSpace, tuned_config

log = logging.getLogger("pipelines.tune")
GROUPS = ("data", "model", "embedding", "sharding", "trainer")  # config groups the tuned config selects again
NOT_TUNED = ("tune", "search", "paths", "tracking", "hydra", "log_model", "run_name")  # settings of the run, not the model
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def run(cfg: DictConfig) -> dict:
    """Runs ``cfg.tune.trials`` trials in all (counting those a stopped study already finished); returns the best
    trial's number, value and params, the tuned config's path and the study's MLflow run id."""
    space, settings = SearchSpace.from_config(cfg.search), cfg.tune
    data = ensure_prepared(cfg.data)
    if "valid" not in data.splits:
        raise ConfigError(f"tuning needs a validation split; {data.root} has {data.splits} (set data.split."
                          "valid_fraction, data.ctr.valid_fraction or data.source.splits.valid)")
    sampler = (optuna.samplers.TPESampler(seed=settings.seed) if settings.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=settings.seed))
    pruner = (optuna.pruners.MedianPruner(settings.startup_trials, settings.warmup_epochs)
              if settings.pruner == "median" else optuna.pruners.NopPruner())
    study = optuna.create_study(study_name=settings.study, storage=settings.storage, sampler=sampler, pruner=pruner,
                                direction=space.direction, load_if_exists=True)
    tracker = instantiate(cfg.tracking)
    config = OmegaConf.to_container(cfg, resolve=True)
    with tracker.start(f"tune-{settings.study}", config, tags={"study": settings.study, "model": cfg.model.name,
                                                             "data": cfg.data.name}) as parent:
        for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study.tell(stale.number, state=optuna.trial.TrialState.FAIL)  # a killed run's trial (studies run in one
        states = [t.state for t in study.trials]                          # process: none of ours is running now)
        completed = optuna.trial.TrialState.COMPLETE in states
        distributions = space.distributions()
        for _ in range(max(settings.trials - sum(s in FINISHED for s in states), 0)):
            trial = study.ask(distributions)
            try:
                value, state = _trial(cfg, data, tracker, space, trial)
            except BaseException:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)  # not left RUNNING in the store
                raise
            study.tell(trial, value, state)
            completed |= state == optuna.trial.TrialState.COMPLETE
            if completed:
                parent.log_metrics({f"best_valid_{space.metric}": study.best_value}, step=trial.number)
        if not completed:
            raise ConfigError(f"study {settings.study!r}: no trial completed ({len(study.trials)} pruned or failed)")
        best = study.best_trial
        counts = {s.name.lower(): sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState}
        path = Path(settings.output_dir) / "tuned" / f"{settings.study}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tuned_config(_groups(cfg), {**_study_values(cfg), **space.fixed, **best.params}, (
            f"Best of study {settings.study}: trial {best.number} of {len(study.trials)}, valid {space.metric} = "
            f"{best.value:.5f} ({space.direction}).\nTrain it and report test: python -m pipelines.train "
            f"--config-dir {settings.output_dir} +tuned={settings.study}")))
        parent.log_params({f"best.{k}": v for k, v in best.params.items()})
        parent.log_metrics({f"best_valid_{space.metric}": best.value, "best_trial": best.number,
                            **{f"trials_{k}": v for k, v in counts.items()}})
        parent.log_artifact(path)
    log.info("study %s: best valid %s = %.5f (trial %d; %s); tuned config %s", settings.study, space.metric,
             best.value, best.number, counts, path)
    return {"best_trial": best.number, "best_value": best.value, "best_params": best.params, "trials": counts,
            "tuned_config": str(path), "run_id": parent.id, "study": study}


def _trial(cfg: DictConfig, data, tracker, space: SearchSpace, trial: optuna.Trial):
    """Trains one trial's config on the training split; returns (validation value, state)."""
    cfg = copy.deepcopy(cfg)
    for key, value in {**space.fixed, **trial.params}.items():
        if OmegaConf.select(cfg, key, default="<missing>") == "<missing>":
            raise ConfigError(f"search.params: {key!r} is not a key of the training config")
        OmegaConf.update(cfg, key, value, merge=False)
    cfg.trainer.checkpoint_dir = str(Path(cfg.tune.output_dir) / "checkpoints" / cfg.tune.study / f"trial_{trial.number}")
    cfg.trainer.resume = False
    trainer = instantiate(cfg.trainer)
    tags = {"study": cfg.tune.study, "trial": str(trial.number)}
    try:
        with tracker.start(f"trial-{trial.number}", trial.params, tags=tags, nested=True,
                           stopped=(optuna.TrialPruned,)) as child:
            def report(metrics: dict, epoch: int) -> None:
                child.log_metrics(metrics, step=epoch)
                value = metrics.get(f"valid_{space.metric}")
                if value is not None:
                    trial.report(value, epoch)
                    if trial.should_prune():
                        child.set_tags({"optuna_state": "PRUNED"})
                        raise optuna.TrialPruned(f"epoch {epoch + 1}: valid {space.metric} = {value:.5f}")

            metrics = fit(build_model(cfg, data, trainer), data, trainer, log=report, final_split="valid")
            if space.metric not in metrics:
                raise ConfigError(f"search.metric={space.metric!r} is not a validation metric of this model; "
                                  f"choose one of {sorted(metrics)}")
            child.log_metrics(metrics, prefix="valid_")
    except optuna.TrialPruned as pruned:
        log.info("trial %d pruned at %s", trial.number, pruned)
        return None, optuna.trial.TrialState.PRUNED
    finally:
        shutil.rmtree(cfg.trainer.checkpoint_dir, ignore_errors=True)  # the tuned config is trained again
    log.info("trial %d: valid %s = %.5f with %s", trial.number, space.metric, metrics[space.metric], trial.params)
    return metrics[space.metric], optuna.trial.TrialState.COMPLETE


def _groups(cfg: DictConfig) -> dict[str, str]:
    """The config group choices the study ran with (``model: mf_bpr``, ...), so the tuned config selects them."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    return {group: choices[group] for group in GROUPS if choices.get(group)}


def _study_values(cfg: DictConfig) -> dict:
    """The values every trial trained with besides the searched ones: what the study's command line set (e.g.
    ``embedding.default.budget``, ``data.split.valid_fraction``) and the early stopping on valid, as resolved."""
    task = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    keys = [o.key_or_group for o in OverridesParser.create().parse_overrides(task) if not o.is_delete()]
    keys = [k for k in keys if k not in choices and k.split(".")[0] not in NOT_TUNED]
    values = {}
    for key in [*keys, "trainer.eval_every", "trainer.early_stopping", "trainer.patience"]:
        value = OmegaConf.select(cfg, key)
        values[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return values


def tune(*overrides: str) -> dict:
    """``python -m pipelines.tune <overrides>`` as a Python call (see :func:`run`).

    Example:
        >>> result = tune("data=ml1m_lightgcn", "model=ease", "tune.trials=8")  # doctest: +SKIP
        >>> result["best_params"], result["tuned_config"]  # doctest: +SKIP
    """
    return run(compose_run("tune", overrides))


@hydra.main(config_path="../conf", config_name="tune", version_base="1.3")
def main(cfg: DictConfig) -> float:
    return run(cfg)["best_value"]


if __name__ == "__main__":
    main()
