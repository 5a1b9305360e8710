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
from multiprocessing import connection
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
        processes, deadline = context.processes, time.monotonic() + timeout
        try:
            while _wait(processes, deadline, until="any_failed"):
                pass
            if any(p.exitcode not in (None, 0) for p in processes):
                # the others usually fail in its wake (a peer left a collective): wait for them (no fixed grace, so a
                # loaded machine reports the same), then report the first failure
                _wait(processes, deadline, until="all_exited")
                raise RankError(_first_failure(Path(out), processes))
            if any(p.is_alive() for p in processes):
                raise TimeoutError(f"{world_size} ranks running {fn.__qualname__} did not finish in {timeout:.0f} s")
        finally:
            for process in processes:
                if process.is_alive():
                    process.kill()
            for process in processes:
                process.join(5)
        return [torch.load(Path(out) / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]


def _wait(processes: list, deadline: float, until: str) -> bool:
    """Waits up to 1 s for a process to exit; False once ``until`` holds (``any_failed``: a rank exited non-zero, or
    all exited; ``all_exited``) or the deadline passed, True to keep waiting."""
    alive = [p for p in processes if p.is_alive()]
    if not alive or time.monotonic() > deadline:
        return False
    if until == "any_failed" and any(p.exitcode not in (None, 0) for p in processes):
        return False
    connection.wait([p.sentinel for p in alive], timeout=min(1.0, max(deadline - time.monotonic(), 0)))
    return True


def _first_failure(out: Path, processes: list) -> str:
    """The traceback of the rank that failed first (the others often fail because of it: a peer
    that left a collective), with the last line of the others' errors or their exit codes."""
    failed = sorted(out.glob("rank*.error"), key=lambda p: p.stat().st_mtime_ns)
    wrote = {int(p.stem.removeprefix("rank")) for p in failed}
    silent = [f"rank {rank} exited with code {p.exitcode} (killed or crashed)" for rank, p in enumerate(processes)
              if rank not in wrote and p.exitcode not in (None, 0)]
    if not failed:
        return "; ".join(silent) or "a rank failed without writing its traceback"
    first, *others = failed
    also = "".join(f"\n(then {p.stem}: {p.read_text().strip().splitlines()[-1]})" for p in others)
    also += "".join(f"\n(then {line})" for line in silent)
    return f"{first.stem.replace('rank', 'rank ')} failed first:\n{first.read_text()}{also}"
