"""Shared fixtures: the real datasets beside the project, tiny prepared data, composed configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from recsys.data.dataset import PreparedData
from recsys.data.prepare import InteractionFilters, SourceConfig, prepare_interactions
from recsys.data.splits import SplitConfig
from recsys.data.synthetic import SyntheticInteractions

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RECSYS_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_file(relative: str) -> Path:
    """A file of ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"real dataset not found at {path} (set RECSYS_SHARED_DATA)")
    return path


TINY = SyntheticInteractions(n_users=300, n_items=200, n_interactions=12_000, n_clusters=5, seed=3)


@pytest.fixture(scope="session")
def tiny_interactions(tmp_path_factory) -> PreparedData:
    """A small synthetic interactions dataset with planted clusters, prepared once per session."""
    out = tmp_path_factory.mktemp("tiny")
    prepare_interactions(SourceConfig("synthetic", str(out / "raw.parquet"), generator=TINY), out / "prepared",
                         InteractionFilters(min_user_interactions=5), SplitConfig(test_fraction=0.2, seed=0))
    return PreparedData.open(out / "prepared")


@pytest.fixture(scope="session")
def ml100k(tmp_path_factory) -> PreparedData:
    """MovieLens 100K prepared with ``conf/data/ml100k.yaml`` (ratings >= 4, per-user 80/20), once per session."""
    shared_file("ml-100k/ml-100k.inter")
    from pipelines.prepare import ensure_prepared

    root = tmp_path_factory.mktemp("ml100k")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="prepare", overrides=["data=ml100k", f"paths.root={root}",
                                                        f"paths.shared_data={SHARED_DATA}"])
    return ensure_prepared(cfg.data)


@pytest.fixture
def compose_config(tmp_path):
    """Composes a real primary config, shrunk to CPU-sized settings under ``tmp_path``."""

    def _compose(config_name: str = "train", overrides: tuple[str, ...] = ()):
        shrink = [f"paths.root={tmp_path}", f"paths.shared_data={SHARED_DATA}"]
        if config_name == "train":
            shrink += [f"trainer.checkpoint_dir={tmp_path}/checkpoints", "trainer.progress=false", "trainer.epochs=2"]
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose(config_name=config_name, overrides=[*shrink, *overrides])

    return _compose
