"""Prepare a dataset: ``python -m pipelines.prepare data=ml100k``."""

from __future__ import annotations

import json
import logging

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from recsys.data.dataset import PreparedData
from recsys.data.prepare import (RANKING_EXCLUDES, CTRSettings, InteractionFilters, SourceConfig, is_prepared,
                                 prepare_ctr, prepare_interactions)
from recsys.data.splits import SplitConfig
from recsys.errors import ConfigError

log = logging.getLogger(__name__)


def ensure_prepared(data: DictConfig, force: bool = False) -> PreparedData:
    """Prepares ``data`` unless its directory already holds a manifest with the same settings."""
    settings = OmegaConf.to_container(data, resolve=True)
    settings.pop("prepared_dir")
    if force or not is_prepared(data.prepared_dir, settings):
        splits = data.source.get("splits")  # given split files; a ??? one raises MissingMandatoryValue naming it
        splits = OmegaConf.to_container(splits, resolve=True, throw_on_missing=True) if splits is not None else None
        source = SourceConfig(data.source.format, data.source.get("path"), dict(data.source.options or {}),
                              instantiate(data.source.generator) if data.source.get("generator") else None, splits)
        if data.kind == "interactions":
            manifest = prepare_interactions(source, data.prepared_dir, InteractionFilters(**data.filters),
                                            SplitConfig(**data.split), data.max_bad_fraction, settings,
                                            data.get("graph_clusters"),
                                            tuple(data.get("ranking_excludes") or RANKING_EXCLUDES))
        elif data.kind == "ctr":
            manifest = prepare_ctr(source, data.prepared_dir, CTRSettings(**OmegaConf.to_container(data.ctr)),
                                   data.max_bad_fraction, settings)
        else:
            raise ConfigError(f"data.kind must be 'interactions' or 'ctr', got {data.kind!r}")
        log.info("prepared %s: %s", data.prepared_dir, json.dumps(manifest["rows"]))
    return PreparedData.open(data.prepared_dir)


@hydra.main(config_path="../conf", config_name="prepare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    data = ensure_prepared(cfg.data, force=cfg.force)
    print(json.dumps({k: data.manifest[k] for k in ("rows", "vocab_sizes", "quarantine")}, indent=2))


if __name__ == "__main__":
    main()
