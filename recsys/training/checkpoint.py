"""Per-epoch checkpoints with torch.distributed.checkpoint (sharded, rank-count independent).

A checkpoint directory holds ``epoch_XXXX/`` folders written by ``dcp.save`` plus a
``latest.json`` pointer, written last, so an interrupted save is never picked up.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from recsys.errors import CheckpointError

LATEST = "latest.json"


def save(directory: str | Path, epoch: int, state: dict, meta: dict | None = None, keep: int = 2) -> Path:
    """Saves ``state`` (tensors, sharded tensors, nested dicts) as the checkpoint after ``epoch``."""
    directory = Path(directory)
    target = directory / f"epoch_{epoch:04d}"
    dcp.save(state, checkpoint_id=str(target))
    if not dist.is_initialized() or dist.get_rank() == 0:
        (directory / LATEST).write_text(json.dumps({"epoch": epoch, "path": target.name, "meta": meta or {}}))
        for old in sorted(directory.glob("epoch_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return target


def clear(directory: str | Path) -> None:
    """Removes the checkpoints in ``directory`` (a fresh run must not resume from a stale one)."""
    directory = Path(directory)
    if not dist.is_initialized() or dist.get_rank() == 0:
        (directory / LATEST).unlink(missing_ok=True)
        for old in directory.glob("epoch_*"):
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def latest(directory: str | Path) -> dict | None:
    """{"epoch", "path", "meta"} of the last complete checkpoint, or None."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    info = json.loads(pointer.read_text())
    info["path"] = Path(directory) / info["path"]
    if not info["path"].is_dir():
        raise CheckpointError(f"{pointer} points to {info['path']}, which does not exist")
    return info


def load(path: str | Path, state: dict) -> None:
    """Loads a checkpoint into ``state`` in place (``state`` gives the target shapes and shardings)."""
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as error:  # re-raised with the path; DCP's own errors do not name it
        raise CheckpointError(f"{path}: cannot load checkpoint into this model: {error}") from error
