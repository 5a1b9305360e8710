"""Checkpoints: an atomic ``latest.json``, and a resume that falls back past a broken pointer or checkpoint."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from recsys.errors import CheckpointError
from recsys.training import checkpoint
from recsys.training.loop import TrainerConfig, fit
from recsys.training.mf import MFRetrieval


def _run(data, directory, epochs: int, resume: bool = False) -> dict:
    cfg = TrainerConfig(epochs=epochs, batch_size=256, checkpoint_dir=str(directory), progress=False, eval_ks=[20],
                        resume=resume)
    return fit(MFRetrieval(data, cfg, dim=8), data, cfg)


@pytest.fixture(scope="module")
def straight(tiny_interactions, tmp_path_factory) -> dict:
    """Test metrics of an uninterrupted 3-epoch run."""
    return _run(tiny_interactions, tmp_path_factory.mktemp("straight"), 3)


@pytest.mark.parametrize("pointer", [None, "", '{"epoch": 2, "pa'])
def test_resume_falls_back_past_a_broken_pointer_and_a_missing_shard(tiny_interactions, straight, tmp_path, caplog,
                                                                     pointer):
    _run(tiny_interactions, tmp_path, 3)
    if pointer is not None:  # None: the pointer stays intact
        (tmp_path / checkpoint.LATEST).write_text(pointer)
    next((tmp_path / "epoch_0002").glob("*.distcp")).unlink()
    with caplog.at_level(logging.WARNING):
        resumed = _run(tiny_interactions, tmp_path, 3, resume=True)  # from epoch_0001: epoch 2 is trained again
    assert resumed == pytest.approx(straight, rel=1e-6)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("skipping checkpoint" in w and "epoch_0002" in w and ".distcp" in w for w in warnings), warnings
    if pointer is not None:
        assert any(f"{tmp_path / checkpoint.LATEST} is unreadable" in w for w in warnings), warnings
    assert checkpoint.latest(tmp_path)["epoch"] == 2


def test_each_epoch_keeps_its_meta_beside_its_shards(tmp_path):
    checkpoint.save(tmp_path, 0, {"x": torch.ones(2)}, meta={"mlflow_run_id": "abc"})
    checkpoint.save(tmp_path, 1, {"x": torch.ones(2)}, meta={"mlflow_run_id": "abc"})
    (tmp_path / checkpoint.LATEST).unlink()
    assert [(i["epoch"], i["path"].name, i["meta"]) for i in checkpoint.candidates(tmp_path)] == [
        (1, "epoch_0001", {"mlflow_run_id": "abc"}), (0, "epoch_0000", {"mlflow_run_id": "abc"})]


def test_the_pointer_is_replaced_in_one_step(tmp_path, monkeypatch):
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or fsync(fd))
    checkpoint.save(tmp_path, 0, {"x": torch.ones(2)})
    assert synced  # the new pointer reached the disk before it replaced the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0000", checkpoint.LATEST]

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)  # killed between writing the new pointer and renaming it
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(tmp_path, 1, {"x": torch.ones(2)})
    assert json.loads((tmp_path / checkpoint.LATEST).read_text())["epoch"] == 0  # the old pointer, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0000", "epoch_0001", checkpoint.LATEST]


def test_no_complete_checkpoint_names_the_directory(tiny_interactions, tmp_path):
    assert checkpoint.latest(tmp_path) is None  # nothing there: a fresh start
    checkpoint.save(tmp_path, 0, {"x": torch.ones(2)})
    (tmp_path / "epoch_0000" / ".metadata").unlink()  # a save that died inside dcp.save
    (tmp_path / checkpoint.LATEST).write_text("")
    with pytest.raises(CheckpointError, match=f"{tmp_path} holds no complete checkpoint: .*latest.json is unreadable"
                                              f".*epoch_0000/.metadata is missing"):
        checkpoint.latest(tmp_path)

    _run(tiny_interactions, tmp_path / "ck", 2)
    for shard in (tmp_path / "ck").glob("epoch_*/*.distcp"):
        shard.unlink()
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'ck'} holds no checkpoint that loads: .*epoch_0001.*"
                                              f"epoch_0000"):
        _run(tiny_interactions, tmp_path / "ck", 3, resume=True)
