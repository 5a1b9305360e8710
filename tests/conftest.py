"""Shared fixtures: the real datasets beside the project, tiny prepared data, composed configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import pipelines  # noqa: F401  (registers the config resolvers, e.g. ${project_root:})
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


TINY_TRAIN = ["data.source.generator.n_users=300", "data.source.generator.n_items=200",
              "data.source.generator.n_interactions=12000", "trainer.batch_size=256", "trainer.progress=false"]
TINY_CTR = ["data=synthetic_ctr", "data.source.generator.n_rows=3000", "data.source.generator.chunk_rows=1000",
            "trainer.batch_size=256", "trainer.progress=false"]


def train_registered(root: Path, name: str, *overrides: str) -> dict:
    """Trains a model with ``pipelines.train`` under ``root`` (its own SQLite MLflow store), registers the run's
    pyfunc as ``name`` and sets the ``champion`` alias; returns train()'s result plus ``name`` and ``version``."""
    from pipelines.train import train
    from recsys.tracking.registry import promote, register

    result = train(f"paths.root={root}", f"paths.shared_data={SHARED_DATA}", *overrides)
    version = register(result["run_id"], name, result["tracking_uri"])
    promote(name, version, metric="test_auc" if "data=synthetic_ctr" in overrides else "test_recall@20",
            tracking_uri=result["tracking_uri"])
    return {**result, "name": name, "version": version, "root": root}


@pytest.fixture(scope="session")
def registered_mf(tmp_path_factory) -> dict:
    """A tiny MF (BPR, dim 16, 2 epochs) trained, registered as ``tiny-mf`` and promoted to ``champion``.

    Keys: metrics, run_id, tracking_uri (sqlite:///<root>/mlflow.db), model_uri, model (the trained task), name,
    version, root."""
    return train_registered(tmp_path_factory.mktemp("registered_mf"), "tiny-mf", "model=mf_bpr", "model.dim=16",
                            "trainer.epochs=2", *TINY_TRAIN)


@pytest.fixture(scope="session")
def registered_ctr(tmp_path_factory) -> dict:
    """A tiny DLRM on planted synthetic CTR rows (4 dense, 6 sparse, a multi-valued ``tags``), registered as
    ``tiny-dlrm`` and promoted to ``champion`` (keys as ``registered_mf``)."""
    return train_registered(tmp_path_factory.mktemp("registered_ctr"), "tiny-dlrm", "model=dlrm", "trainer.epochs=1",
                            *TINY_CTR)


def raw_ctr_rows(data: PreparedData, split: str = "test", n: int = 64):
    """The first ``n`` rows of a prepared CTR split back in raw form (raw ids, dense values before the log1p
    transform of conf/data/synthetic_ctr; OOV ids as None) as a DataFrame, and the prepared rows as an arrow table."""
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    assert data.manifest["ctr"]["dense_transform"] in ("log1p", "none")
    table = pq.read_table(data.path(split)).slice(0, n)
    schema, frame = data.ctr_schema, {}
    for name in schema.dense:
        x = table[name].to_numpy()
        frame[name] = np.expm1(x) if data.manifest["ctr"]["dense_transform"] == "log1p" else x
    for name in schema.sparse:
        ids = data.vocab(name).ids
        frame[name] = [ids[i - 1] if i > 0 else None for i in table[name].to_numpy()]
    for name in schema.multi_valued:
        ids = data.vocab(name).ids
        frame[name] = [[ids[i - 1] if i > 0 else None for i in cell] for cell in table[name].to_pylist()]
    return pd.DataFrame(frame), table
