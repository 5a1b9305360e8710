"""Serve a model over HTTP: ``python -m serving model.uri=models:/<name>@champion port=8000``.

Hydra composes ``conf/serving.yaml``; the model loads once the server is up (``GET /readyz`` turns 200). The admin
token comes from the environment only (``RECSYS_ADMIN_TOKEN``), never from the config or the command line.
"""

from __future__ import annotations

import os

import hydra
import uvicorn
from hydra.utils import instantiate
from omegaconf import DictConfig

from serving.app import create_app
from serving.settings import ADMIN_TOKEN_ENV, ServingSettings


def settings_from(cfg: DictConfig) -> ServingSettings:
    """``ServingSettings`` of a composed ``conf/serving.yaml``; the tracking URI is the tracker's
    (``tracking.uri``, else ``sqlite:///<paths.root>/mlflow.db``), the admin token the environment's
    ``RECSYS_ADMIN_TOKEN`` (unset or empty: none)."""
    return ServingSettings(model_uri=cfg.model.uri, tracking_uri=instantiate(cfg.tracking).uri, tables=cfg.model.tables,
                           index=cfg.model.index, host=cfg.host, docs=cfg.docs, coalesce_queries=cfg.coalesce_queries,
                           admin_token=os.environ.get(ADMIN_TOKEN_ENV) or None,
                           min_reload_interval=cfg.admin.min_reload_interval, **cfg.limits)


@hydra.main(config_path="../conf", config_name="serving", version_base="1.3")
def main(cfg: DictConfig) -> None:
    uvicorn.run(create_app(settings_from(cfg)), host=cfg.host, port=cfg.port, workers=1, log_level=cfg.log_level)


if __name__ == "__main__":
    main()
