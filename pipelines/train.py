"""Train, evaluate and track: ``python -m pipelines.train data=... model=... trainer.epochs=...``."""

from __future__ import annotations

import logging

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pipelines.prepare import ensure_prepared
from recsys.evaluation import PopularityScorer
from recsys.training.loop import evaluate, fit

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Prepares data, trains ``cfg.model``, logs to MLflow; returns metrics, baseline and run id."""
    data = ensure_prepared(cfg.data)
    trainer = instantiate(cfg.trainer)
    tracker = instantiate(cfg.tracking)
    config = OmegaConf.to_container(cfg, resolve=True)
    with tracker.start(cfg.run_name, config, tags={"model": cfg.model.name, "data": cfg.data.name}) as mlrun:
        mlrun.log_dict(data.manifest, "data_manifest.json")
        baseline = evaluate(PopularityScorer(data.matrix("train")), data, "test", trainer.eval_ks, trainer.eval_batch_size)
        mlrun.log_metrics(baseline, prefix="popularity_")
        model_args = {k: v for k, v in cfg.model.items() if k != "name"}
        model = instantiate(model_args, data=data, trainer=trainer, _convert_="object")
        metrics = fit(model, data, trainer, log=mlrun.log_metrics)
        memory = model.memory()
        mlrun.log_metrics(metrics, prefix="test_")
        mlrun.log_metrics({**{f"{name}": b for name, b in memory.items()}, "total": sum(memory.values())},
                          prefix="table_bytes_")
    return {"metrics": metrics, "popularity": baseline, "memory": memory, "run_id": mlrun.id,
            "tracking_uri": tracker.uri}


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    result = run(cfg)
    k = cfg.trainer.eval_ks[0]
    log.info("test recall@%d = %.4f (popularity %.4f), run %s", k, result["metrics"][f"recall@{k}"],
             result["popularity"][f"recall@{k}"], result["run_id"])
    return result["metrics"][f"recall@{k}"]


if __name__ == "__main__":
    main()
