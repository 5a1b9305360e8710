"""Train, evaluate and track: ``python -m pipelines.train data=... model=... trainer.epochs=...``.

On several ranks: ``torchrun --nproc_per_node=2 -m pipelines.train trainer.distributed=true ...``
(rank 0 prepares the data and logs the MLflow run; every rank trains its share and evaluates).
From Python: ``train("data=ml100k", "model=ease")`` does the same as the command line.
With ``trainer.resume=true`` the MLflow run stored with the checkpoint is continued (metrics keep their epoch steps).
"""

from __future__ import annotations

import logging

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pipelines.config import compose_run
from pipelines.prepare import ensure_prepared
from recsys.evaluation import ClickRate, PopularityScorer
from recsys.errors import CheckpointError
from recsys.inference.export import package_model
from recsys.tracking.registry import log_package
from recsys.training import checkpoint
from recsys.training.distributed import init_process_group, is_main, launched, main_first
from recsys.training.loop import evaluate, fit

log = logging.getLogger("pipelines.train")  # not __name__: that is "__main__" under `python -m`


def build_model(cfg: DictConfig, data, trainer):
    """Instantiates ``cfg.model`` (a Trainable) on prepared ``data`` with the loop settings."""
    return instantiate({k: v for k, v in cfg.model.items() if k != "name"}, data=data, trainer=trainer,
                       _convert_="object")


def run(cfg: DictConfig) -> dict:
    """Prepares data, trains ``cfg.model``, logs to MLflow (the run, and the model as a pyfunc unless
    ``log_model=false``); returns test metrics, the baseline's (popularity, or the click rate for CTR data), table
    bytes, the run id, the logged model's URI and the trained model."""
    trainer = instantiate(cfg.trainer)
    if trainer.distributed or launched():
        init_process_group(trainer.distributed)  # a clear error when the launch does not match the setting
    with main_first():
        data = ensure_prepared(cfg.data)
    tracker = instantiate(cfg.tracking)
    config = OmegaConf.to_container(cfg, resolve=True)
    with tracker.start(cfg.run_name, config, tags={"model": cfg.model.name, "data": cfg.data.name},
                       run_id=resumed_run_id(trainer)) as mlrun:
        mlrun.log_dict(data.manifest, "data_manifest.json")
        reference = ClickRate.of_split(data.path("train")) if data.kind == "ctr" else PopularityScorer(data.matrix("train"))
        baseline = evaluate(reference, data, "test", trainer.eval_ks, trainer.eval_batch_size, trainer.eval_tie_break,
                            trainer.eval_seed)
        mlrun.log_metrics(baseline, prefix="popularity_" if data.kind != "ctr" else "click_rate_")
        model = build_model(cfg, data, trainer)
        metrics = fit(model, data, trainer, log=mlrun.log_metrics, meta={"mlflow_run_id": mlrun.id} if mlrun.id else None)
        memory = model.memory()
        mlrun.log_metrics(metrics, prefix="test_")
        mlrun.log_metrics({**memory, "total": sum(memory.values())}, prefix="table_bytes_")
        if hasattr(model, "memory_parts"):  # tables, codebooks, codes, id maps, projections
            mlrun.log_dict(model.memory_parts(), "table_memory.json")
        if hasattr(model, "layout"):  # per table: the method it got, its budget, its bytes
            layout = model.layout()
            mlrun.log_dict(layout, "table_layout.json")
            if is_main():
                for table, entry in layout.items():
                    log.info("table %s: %s, budget %s, %d of %d full bytes", table, entry["method"], entry["budget"],
                             entry["bytes"], entry["full_bytes"])
        model_uri = None
        if cfg.log_model:
            package = package_model(model, data, config, metrics)  # every rank: sharded tables are gathered
            if mlrun.active:
                model_uri = log_package(package)["model_uri"]
    return {"metrics": metrics, "baseline": baseline, "memory": memory, "run_id": mlrun.id,
            "tracking_uri": tracker.uri, "model_uri": model_uri, "model": model}


def resumed_run_id(trainer) -> str | None:
    """The MLflow run id stored with the newest checkpoint when ``trainer.resume`` is set, else None."""
    if not trainer.resume:
        return None
    try:
        info = checkpoint.latest(trainer.checkpoint_dir, warn=False)
    except CheckpointError:
        return None  # fit() reports it
    return info["meta"].get("mlflow_run_id") if info else None


def train(*overrides: str) -> dict:
    """``python -m pipelines.train <overrides>`` as a Python call: composes ``conf/train.yaml`` with the
    overrides (paths anchored at the current directory unless ``paths.root=...``), trains, logs the
    MLflow run and returns :func:`run`'s result.

    Example:
        >>> result = train("data=ml100k", "model=ease", "trainer.epochs=1")  # doctest: +SKIP
        >>> result["metrics"]["recall@20"], result["run_id"]  # doctest: +SKIP
    """
    cfg = compose_run("train", overrides)
    return run(cfg)


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    result = run(cfg)
    if cfg.data.kind == "ctr":
        if is_main():
            log.info("test auc = %.4f, logloss = %.4f (click rate: %.4f), run %s", result["metrics"]["auc"],
                     result["metrics"]["logloss"], result["baseline"]["logloss"], result["run_id"])
        return result["metrics"]["auc"]
    k = cfg.trainer.eval_ks[0]
    if is_main():
        log.info("test recall@%d = %.4f (popularity %.4f), run %s", k, result["metrics"][f"recall@{k}"],
                 result["baseline"][f"recall@{k}"], result["run_id"])
    return result["metrics"][f"recall@{k}"]


if __name__ == "__main__":
    main()
