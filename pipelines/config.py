"""The config a pipeline's command line would run with, for the pipelines' Python calls (``train(...)``, ...)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

CONF = Path(__file__).resolve().parents[1] / "conf"
PROJECT = CONF.parent


def register_resolvers() -> None:
    """``${project_root:}``: the project directory (beside ``conf/``), whatever ``paths.root`` a run writes under."""
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT))


def compose_run(config_name: str, overrides) -> DictConfig:
    """``conf/<config_name>.yaml`` composed with ``overrides`` as on the command line: ``${hydra:...}`` (the working
    directory, the run directory, override names) resolves as there, and the ``hydra`` node is dropped."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
