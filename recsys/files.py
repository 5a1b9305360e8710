"""Atomic file writes: readers see the old file or the whole new one, never a part."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def publish(path: Path, write: Callable[[Path], object], exclusive: bool = False, tag: str = "") -> bool:
    """Writes ``path`` atomically: ``write(temporary)`` fills a hidden sibling ``.<name>.<tag><hex>.tmp``, which is
    synced to disk and renamed into place; the folder is synced too, so the rename survives a power loss.

    Args:
        path: the file to publish.
        write: fills the temporary file it is given.
        exclusive: link instead of rename, only if ``path`` does not exist yet (exactly one creator wins).
        tag: put in the temporary's name (e.g. ``rank1.``, so a cleanup can tell whose leftovers are whose).

    Returns:
        Whether this call published ``path`` (False: ``exclusive`` and it existed).

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "latest.json"
        >>> publish(target, lambda t: t.write_text("{}")), target.read_text()
        (True, '{}')
    """
    temporary = path.with_name(f".{path.name}.{tag}{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        if not exclusive:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)  # fails when the file exists
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links
                if path.exists():
                    return False
                os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _sync_folder(path.parent)
    return True


def _sync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # not supported on this file system
    finally:
        os.close(descriptor)
