"""Register a run's model: ``python -m pipelines.register name=recsys [run_id=<id>]``.

``run_id=latest`` takes the newest finished run of ``tracking.experiment`` that logged a model.
"""

from __future__ import annotations

import logging

import hydra
from mlflow.tracking import MlflowClient
from hydra.utils import instantiate
from omegaconf import DictConfig

from recsys.errors import ConfigError
from recsys.tracking.registry import register

log = logging.getLogger("pipelines.register")


def latest_run(tracker) -> str:
    """The newest finished run of ``tracker.experiment`` with a logged model."""
    client = MlflowClient(tracker.uri)
    experiment = client.get_experiment_by_name(tracker.experiment)
    if experiment is None:
        raise ConfigError(f"no experiment '{tracker.experiment}' in {tracker.uri}; train a model first")
    models = client.search_logged_models(experiment_ids=[experiment.experiment_id],
                                         order_by=[{"field_name": "creation_time", "ascending": False}])
    for model in models:
        if model.source_run_id and client.get_run(model.source_run_id).info.status == "FINISHED":
            return model.source_run_id
    raise ConfigError(f"experiment '{tracker.experiment}' in {tracker.uri} has no finished run with a logged model")


@hydra.main(config_path="../conf", config_name="register", version_base="1.3")
def main(cfg: DictConfig) -> str:
    tracker = instantiate(cfg.tracking)
    run_id = latest_run(tracker) if cfg.run_id == "latest" else str(cfg.run_id)
    version = register(run_id, cfg.name, tracker.uri)
    log.info("registered run %s as %s version %s (%s)", run_id, cfg.name, version, tracker.uri)
    return version


if __name__ == "__main__":
    main()
