"""Per-epoch checkpoints with torch.distributed.checkpoint (sharded, rank-count independent).

A checkpoint directory holds ``epoch_<n>/`` (four digits) folders written by ``dcp.save`` plus a
``latest.json`` pointer. Each folder gets its own ``recsys_meta.json`` after DCP's ``.metadata``, and
the pointer is replaced atomically last, so an interrupted save is never picked up. :func:`candidates` lists
the complete checkpoints newest first, also when the pointer is unreadable; a resume tries them in that order
until one loads (``recsys.training.loop``).

Every rank calls ``save`` and ``load`` (each writes and reads its own shards). A checkpoint
written by W ranks loads on any number of ranks and under any sharding plan: DCP reshards by
the global offsets of the shards. ``load_module`` reads the model part into a plain,
unsharded module in one process (e.g. for export or serving).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Iterator

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from recsys.errors import CheckpointError
from recsys.files import publish

LATEST = "latest.json"
META = "recsys_meta.json"  # inside each epoch folder: {"epoch", "meta"}
_EPOCH = re.compile(r"epoch_(\d+)")
logger = logging.getLogger(__name__)


def save(directory: str | Path, epoch: int, state: dict, meta: dict | None = None, keep: int = 2) -> Path:
    """Saves ``state`` (tensors, sharded tensors, nested dicts) as the checkpoint after ``epoch``."""
    directory = Path(directory)
    target = directory / f"epoch_{epoch:04d}"
    main = not dist.is_initialized() or dist.get_rank() == 0
    if main and target.exists():  # left by a save that died, or the broken epoch a resume fell back past
        shutil.rmtree(target)
    if dist.is_initialized():
        dist.barrier()
    dcp.save(state, checkpoint_id=str(target))
    if main:
        record = {"epoch": epoch, "meta": meta or {}}
        publish(target / META, lambda t: t.write_text(json.dumps(record)))
        publish(directory / LATEST, lambda t: t.write_text(json.dumps({**record, "path": target.name})))
        for old in sorted(_epoch_dirs(directory))[:-keep]:
            shutil.rmtree(old[1], ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return target


def clear(directory: str | Path) -> None:
    """Removes the checkpoints in ``directory`` (a fresh run must not resume from a stale one)."""
    directory = Path(directory)
    if not dist.is_initialized() or dist.get_rank() == 0:
        (directory / LATEST).unlink(missing_ok=True)
        for leftover in directory.glob(f".{LATEST}.*.tmp"):  # of a save killed while writing the pointer
            leftover.unlink(missing_ok=True)
        for old in directory.glob("epoch_*"):
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def candidates(directory: str | Path, warn: bool = True) -> Iterator[dict]:
    """{"epoch", "path", "meta"} of each complete checkpoint in ``directory``, newest first.

    The pointer's checkpoint comes first, then older epoch folders holding DCP's ``.metadata`` and
    ``recsys_meta.json``; with an unreadable pointer, every such folder. Whatever is skipped is logged
    as a warning (unless ``warn=False``).

    Raises:
        CheckpointError: ``directory`` holds a pointer or epoch folders but no complete checkpoint.
    """
    directory = Path(directory)
    say = logger.warning if warn else lambda *args: None
    pointer, pointed, skipped = directory / LATEST, None, []
    if pointer.is_file():
        try:
            info = _read(pointer, {"epoch": int, "path": str, "meta": dict})
            info["path"] = directory / info["path"]
            if not (info["path"] / ".metadata").is_file():
                raise CheckpointError(f"{pointer} points to {info['path']}, which is missing or incomplete")
        except CheckpointError as error:
            skipped.append(str(error))
            say("%s; falling back to the newest complete epoch folder in %s", error, directory)
        else:
            pointed = info["epoch"]
            yield info
    found = pointed is not None
    for epoch, path in sorted(_epoch_dirs(directory), reverse=True):
        if pointed is not None and epoch >= pointed:
            continue  # the pointer's, or a newer one whose save was interrupted before the pointer moved
        try:
            for name in (".metadata", META):
                if not (path / name).is_file():
                    raise CheckpointError(f"{path / name} is missing")
            info = _read(path / META, {"epoch": int, "meta": dict})
        except CheckpointError as error:
            skipped.append(str(error))
            say("skipping checkpoint %s: %s", path, error)
            continue
        found = True
        yield {"epoch": info["epoch"], "path": path, "meta": info["meta"]}
    if not found and skipped:
        raise CheckpointError(f"{directory} holds no complete checkpoint: {'; '.join(skipped)}")


def latest(directory: str | Path, warn: bool = True) -> dict | None:
    """{"epoch", "path", "meta"} of the newest complete checkpoint, or None when ``directory`` holds none.

    Raises:
        CheckpointError: there are checkpoint files, but none complete.
    """
    return next(candidates(directory, warn), None)


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


def _epoch_dirs(directory: Path) -> list[tuple[int, Path]]:
    return [(int(m.group(1)), p) for p in directory.glob("epoch_*") if (m := _EPOCH.fullmatch(p.name)) and p.is_dir()]


def _read(path: Path, fields: dict[str, type]) -> dict:
    """The JSON object in ``path``, checked to have ``fields`` of their types."""
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is unreadable ({type(error).__name__}: {error})") from error
    if not isinstance(info, dict) or any(not isinstance(info.get(k), t) for k, t in fields.items()):
        expected = ", ".join(f"{k}: {t.__name__}" for k, t in fields.items())
        raise CheckpointError(f"{path} is not a checkpoint record: expected {{{expected}}}, found {info!r:.200}")
    return info
