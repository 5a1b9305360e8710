"""Promote a model version to ``champion`` when it passes the metric gate: ``python -m pipelines.promote name=recsys``.

The comparison (candidate and champion values, outcome) is recorded as tags of the version and as a run of the
``model-promotions`` experiment; the alias moves only when the candidate wins by ``min_delta``.
"""

from __future__ import annotations

import logging

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from recsys.tracking.registry import promote

log = logging.getLogger("pipelines.promote")


@hydra.main(config_path="../conf", config_name="promote", version_base="1.3")
def main(cfg: DictConfig) -> bool:
    tracker = instantiate(cfg.tracking)
    outcome = promote(cfg.name, None if cfg.version is None else str(cfg.version), cfg.metric, cfg.mode,
                      cfg.min_delta, cfg.alias, tracker.uri)
    log.info("%s v%s %s %s: %s", cfg.name, outcome.version, "is now" if outcome.promoted else "did not become",
             cfg.alias, outcome.reason)
    return outcome.promoted


if __name__ == "__main__":
    main()
