"""Serve a model over HTTP: ``python -m serving model.uri=models:/<name>@champion port=8000``.

Hydra composes ``conf/serving.yaml``; the model loads once the server is up (``GET /readyz`` turns 200).
"""

from __future__ import annotations

import hydra
import uvicorn
from hydra.utils import instantiate
from omegaconf import DictConfig

from serving.app import create_app
from serving.settings import ServingSettings


def settings_from(cfg: DictConfig) -> ServingSettings:
    """``ServingSettings`` of a composed ``conf/serving.yaml``; the tracking URI is the tracker's
    (``tracking.uri``, else ``sqlite:///<paths.root>/mlflow.db``)."""
    return ServingSettings(model_uri=cfg.model.uri, tracking_uri=instantiate(cfg.tracking).uri, tables=cfg.model.tables,
                           index=cfg.model.index, **cfg.limits)


@hydra.main(config_path="../conf", config_name="serving", version_base="1.3")
def main(cfg: DictConfig) -> None:
    uvicorn.run(create_app(settings_from(cfg)), host=cfg.host, port=cfg.port, workers=1, log_level=cfg.log_level)


if __name__ == "__main__":
    main()
