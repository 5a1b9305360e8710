"""Per-epoch checkpoints with torch.distributed.checkpoint (sharded, rank-count independent).

A checkpoint directory holds ``epoch_<n>/`` (four digits) folders written by ``dcp.save`` plus a
``latest.json`` pointer, written last, so an interrupted save is never picked up.

Every rank calls ``save`` and ``load`` (each writes and reads its own shards). A checkpoint
written by W ranks loads on any number of ranks and under any sharding plan: DCP reshards by
the global offsets of the shards. ``load_module`` reads the model part into a plain,
unsharded module in one process (e.g. for export or serving).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

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
    except (Exception, dcp.CheckpointException) as error:  # DCP's errors derive from BaseException, name no path
        raise CheckpointError(f"{path}: cannot load checkpoint into this model: {_reason(error)}") from error


def _reason(error: BaseException) -> str:
    """Each failing rank's exception (DCP wraps them with their tracebacks)."""
    if isinstance(error, dcp.CheckpointException):
        return "; ".join(f"rank {rank}: {type(exc).__name__}: {exc}" for rank, (exc, _) in error.failures.items())
    return str(error)


def load_module(path: str | Path, module: nn.Module, key: str = "model") -> None:
    """Loads entry ``key`` of a checkpoint (written by any number of ranks) into ``module`` in place.

    ``module`` may be a plain unsharded copy of the model (its state-dict keys are those of the
    sharded model, which DMP strips of its wrappers), so one process can read a checkpoint of
    a sharded run.

    Example:
        >>> plain = MatrixFactorization(CompressedEmbeddings(mf_specs(n_users, n_items, 64)))  # doctest: +SKIP
        >>> load_module(latest("checkpoints/run")["path"], plain)                               # doctest: +SKIP
    """
    state = {key: module.state_dict()}
    load(path, state)
    module.load_state_dict(state[key])
