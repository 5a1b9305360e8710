"""Runs a function on N gloo ranks on CPU (one process per rank) and returns what each rank returned.

    def body(rank, world_size, scale):          # module level, so the rank processes can import it
        return {"out": torch.ones(2) * rank * scale}

    results = run_ranks(body, 3.0)              # [{"out": ...rank 0}, {"out": ...rank 1}]

Ranks are forked from a fork server that has imported torch, TorchRec and the library once
(``PRELOAD``), so a call costs a fraction of a second after the first instead of a fresh
interpreter per rank; the server holds no process group or threads, so the children start clean.
Each rank joins the default process group (gloo, a free localhost port) before ``fn`` runs and
leaves it afterwards; the environment looks like ``torchrun``'s (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so library code that reads it behaves as it would
under a real launch. Results travel through ``torch.save`` files read back with
``weights_only=True``: return tensors, numbers, strings and lists/tuples/dicts of them. A rank
that raises fails the call with that rank's traceback; a run that outlives ``timeout`` is
killed and fails with ``TimeoutError``.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


PRELOAD = ["torch", "torchrec", "torchrec.distributed", "recsys.training.distributed", "tests.embedding_contract"]


class RankError(RuntimeError):
    """A rank raised; the message holds its rank and traceback."""


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, fn: Callable, args: tuple, world_size: int, port: int, out: str, threads: int,
           collective_timeout: float) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout))
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    except BaseException:
        (Path(out) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout: float = 240.0,
              threads: int = 1, start_method: str = "forkserver") -> list[Any]:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; returns the results by rank.

    Args:
        fn: a module-level function (the rank processes import it by name).
        args: further arguments of ``fn`` (picklable).
        world_size: number of ranks.
        timeout: seconds before every rank is killed and ``TimeoutError`` raised.
        threads: torch intra-op threads per rank.
        start_method: ``forkserver`` (fast after the first call) or ``spawn`` (a fresh interpreter per rank).

    Raises:
        RankError: a rank raised (the first to fail; the message carries its traceback).
        TimeoutError: the ranks did not finish within ``timeout``.
    """
    if start_method == "forkserver":
        mp.set_forkserver_preload(PRELOAD)  # no effect once the server runs
    with tempfile.TemporaryDirectory(prefix="ranks-") as out:
        context = mp.start_processes(_entry, args=(fn, args, world_size, free_port(), out, threads, timeout),
                                     nprocs=world_size, join=False, start_method=start_method)
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=0.5):
                if any(Path(out).glob("rank*.error")):  # the others may wait for it in a collective: stop them
                    raise RankError(_first_failure(Path(out)))
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} ranks running {fn.__qualname__} did not finish in "
                                       f"{timeout:.0f} s")
        except mp.ProcessRaisedException:
            raise RankError(_first_failure(Path(out))) from None
        except mp.ProcessExitedException as error:
            raise RankError(f"rank {error.error_index} exited with code {error.exit_code} (killed or crashed)") \
                from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            for process in context.processes:
                process.join(5)
        return [torch.load(Path(out) / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]


def _first_failure(out: Path, grace: float = 1.0) -> str:
    """The traceback of the rank that failed first (the others often fail because of it: a peer
    that left a collective), with the last line of the others' errors."""
    time.sleep(grace)  # let the ranks that fail in its wake write their errors too
    failed = sorted(out.glob("rank*.error"), key=lambda p: p.stat().st_mtime_ns)
    if not failed:
        return "a rank failed without writing its traceback"
    first, *others = failed
    also = "".join(f"\n(then {p.stem}: {p.read_text().strip().splitlines()[-1]})" for p in others)
    return f"{first.stem.replace('rank', 'rank ')} failed first:\n{first.read_text()}{also}"
