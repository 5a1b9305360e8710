#!/usr/bin/env python
"""Serving benchmark: /recommend latency and throughput of ``python -m serving`` beside ``mlflow models serve`` of the
same registered model, and batch-scoring rows/second of ``pipelines.batch_score`` beside a plain loop of pyfunc
``predict`` over pandas chunks.

The model: MF (BPR, D = 64, one epoch) on a synthetic catalog of ``--items`` items (100,000 by default) and
``--users`` users, trained with ``pipelines.train``, registered and promoted to ``champion`` in a store of its own
(``data/bench_serving/mlflow.db``). Each request asks for the top ``--k`` (100) items of one random known user,
excluding the user's training items. The load comes from a separate process on loopback (asyncio + httpx, one
keep-alive connection per concurrent client) that runs ``--duration`` seconds per concurrency level after a
warm-up, and counts every non-200 answer (or one without k items) as an error. Both servers run one worker
process; on this 2-core machine the load generator shares the cores with the server, which bounds requests/s.

    python benchmarks/serving.py                           # about 10 minutes
    python benchmarks/serving.py --items 20000 --duration 5 --concurrency 1 8

Writes ``benchmarks/results/serving.{json,md,png}`` and logs one MLflow run (experiment ``benchmark-serving``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/mf.py

import numpy as np  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "data" / "bench_serving"
NAME = "serving-mf"


# --------------------------------------------------------------------------- load generation (its own process)

async def _client(url: str, bodies: list[bytes], k: int, until: float, latencies: list[float], errors: list[str],
                  count_from: float) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=30.0, limits=httpx.Limits(max_connections=1)) as client:
        while (now := time.perf_counter()) < until:
            body = random.choice(bodies)
            began = time.perf_counter()
            try:
                response = await client.post(url, content=body, headers={"content-type": "application/json"})
                ok = response.status_code == 200 and _count(response.json()) == k
                reason = f"status {response.status_code}" if response.status_code != 200 else "fewer than k items"
            except httpx.HTTPError as error:
                ok, reason = False, type(error).__name__
            if now < count_from:
                continue  # warm-up
            if ok:
                latencies.append(time.perf_counter() - began)
            else:
                errors.append(reason)


def _count(answer: dict) -> int:
    """Items in an answer of /recommend (``items``) or of MLflow's /invocations (``predictions[0].items``)."""
    if "predictions" in answer:
        return len(answer["predictions"][0]["items"])
    return len(answer["items"])


def load(url: str, bodies_file: str, k: int, concurrency: int, duration: float, warmup: float) -> dict:
    bodies = [line.encode() for line in Path(bodies_file).read_text().splitlines()]
    latencies, errors = [], []
    start = time.perf_counter()
    count_from, until = start + warmup, start + warmup + duration

    async def main():
        await asyncio.gather(*(_client(url, bodies, k, until, latencies, errors, count_from) for _ in range(concurrency)))

    asyncio.run(main())
    seconds = time.perf_counter() - count_from
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"concurrency": concurrency, "requests": len(latencies), "errors": len(errors),
            "error_kinds": sorted(set(errors)), "seconds": seconds, "rps": len(latencies) / seconds,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


# --------------------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, what: str, timeout: float = 600) -> None:
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {process.stderr.read()[-3000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} not ready after {timeout} s")


def start(command: list[str], ready: str, what: str, env: dict | None = None) -> subprocess.Popen:
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {})})
    wait_ready(ready, process, what)
    return process


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


def measure(url: str, bodies: Path, k: int, levels: list[int], duration: float, warmup: float) -> list[dict]:
    rows = []
    for concurrency in levels:
        command = [sys.executable, __file__, "load", "--url", url, "--bodies", str(bodies), "--k", str(k),
                   "--concurrency", str(concurrency), "--duration", str(duration), "--warmup", str(warmup)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {url} c={concurrency}: {rows[-1]['rps']:.0f} req/s, p50 {rows[-1]['p50_ms']:.1f} ms, "
              f"p99 {rows[-1]['p99_ms']:.1f} ms, errors {rows[-1]['errors']}", flush=True)
    return rows


# --------------------------------------------------------------------------- the benchmark

def train_model(args) -> dict:
    from pipelines.train import train
    from recsys.tracking.registry import promote, register

    result = train(f"paths.root={WORK}", "data=synthetic", "data.name=serving_catalog", "model=mf_bpr", "model.dim=64",
                   f"data.source.generator.n_items={args.items}", f"data.source.generator.n_users={args.users}",
                   f"data.source.generator.n_interactions={args.interactions}", "trainer.epochs=1",
                   "trainer.batch_size=8192", "trainer.progress=false", "tracking.experiment=serving-benchmark-model")
    version = register(result["run_id"], NAME, result["tracking_uri"])
    promote(NAME, version, "test_recall@20", min_delta=-1.0, tracking_uri=result["tracking_uri"])  # always promote
    return {**result, "version": version}


def batch_scoring(model: dict, users: list, k: int, chunk: int) -> dict:
    """users/s of pipelines.batch_score and of a plain loop of pyfunc predict over pandas chunks (the same users), each
    timed from loading the registered model to the last chunk (MLflow's store opened before both)."""
    import mlflow
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.batch_score import batch_score

    inputs, out = WORK / "batch_users", WORK / "batch_out"
    shutil.rmtree(inputs, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    inputs.mkdir(parents=True)
    for part, start_row in enumerate(range(0, len(users), len(users) // 4 + 1)):  # 4 input files
        pq.write_table(pa.table({"user_id": users[start_row:start_row + len(users) // 4 + 1]}),
                       inputs / f"users-{part}.parquet")
    uri = f"models:/{NAME}@champion"
    mlflow.MlflowClient(model["tracking_uri"]).search_registered_models()  # import + open the store outside the timings
    began = time.perf_counter()
    summary = batch_score(f"model.uri={uri}", f"input={inputs}", f"output={out}", f"k={k}", f"batch_size={chunk}",
                          f"tracking.uri={model['tracking_uri']}", f"paths.root={WORK}", "progress=false")
    ours = time.perf_counter() - began
    mlflow.set_tracking_uri(model["tracking_uri"])
    began = time.perf_counter()
    pyfunc = mlflow.pyfunc.load_model(uri)
    frame = pd.read_parquet(inputs)
    rows = 0
    for start_row in range(0, len(frame), chunk):
        predicted = pyfunc.predict(frame.iloc[start_row:start_row + chunk], params={"k": k})
        rows += int(predicted["items"].map(len).sum())
    plain = time.perf_counter() - began
    return {"users": len(users), "k": k, "chunk_rows": chunk, "batch_score_seconds": ours,
            "batch_score_users_per_second": len(users) / ours, "batch_score_rows_out": summary.get("rows_out"),
            "pyfunc_loop_seconds": plain, "pyfunc_loop_users_per_second": len(users) / plain, "pyfunc_loop_rows_out": rows,
            "batch_score_summary": {k2: v for k2, v in summary.items() if isinstance(v, (int, float, str))}}


def markdown(report: dict) -> str:
    a = report["args"]
    lines = [f"# Serving benchmark ({report['date']})", "",
             f"MF (D = 64) over a synthetic catalog of {a['items']:,} items, {a['users']:,} users; /recommend of one "
             f"known user, k = {a['k']}, seen items excluded; {a['duration']} s per level after {a['warmup']} s warm-up; "
             "load from a separate process on loopback (asyncio + httpx, one connection per client).", "",
             "| Server | Concurrency | Requests/s | p50 ms | p95 ms | p99 ms | Errors |", "|---|---:|---:|---:|---:|---:|---:|"]
    for server, rows in report["latency"].items():
        for r in rows:
            lines.append(f"| {server} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                         f"{r['p99_ms']:.1f} | {r['errors']} |")
    b = report["batch"]
    lines += ["", f"Batch scoring of {b['users']:,} users (k = {b['k']}, chunks of {b['chunk_rows']:,} rows, model load "
              "included):", "", "| Method | Seconds | Users/s |", "|---|---:|---:|",
              f"| `pipelines.batch_score` (partitioned parquet, atomic parts) | {b['batch_score_seconds']:.1f} | "
              f"{b['batch_score_users_per_second']:,.0f} |",
              f"| plain loop of pyfunc `predict` over pandas chunks (no output written) | {b['pyfunc_loop_seconds']:.1f} | "
              f"{b['pyfunc_loop_users_per_second']:,.0f} |", "",
              f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores (server, load generator and "
              "batch jobs share them), one server worker process. Command: "
              f"`python benchmarks/serving.py {' '.join(report['argv'])}`."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for server, rows in report["latency"].items():
        c = [r["concurrency"] for r in rows]
        left.plot(c, [r["rps"] for r in rows], marker="o", label=server)
        right.plot(c, [r["p99_ms"] for r in rows], marker="o", label=f"{server} p99")
        right.plot(c, [r["p50_ms"] for r in rows], marker=".", linestyle="--", label=f"{server} p50")
    for axis, label in ((left, "requests / s"), (right, "latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
    fig.suptitle(f"/recommend, MF over {report['args']['items']:,} items, k = {report['args']['k']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def benchmark(args) -> dict:
    from benchmarks.mf import cpu_model
    from recsys.tracking.mlflow_run import Tracker

    model = train_model(args)
    from recsys.inference.scorers import load  # noqa: F401  (import cost outside the timings)
    import pandas as pd

    users = pd.read_parquet(WORK / "data" / "prepared" / "serving_catalog" / "vocab" / "user.parquet")["raw_id"].tolist()
    rng = random.Random(0)
    sample = rng.sample(users, min(5000, len(users)))
    ours_bodies, mlflow_bodies = WORK / "bodies_ours.jsonl", WORK / "bodies_mlflow.jsonl"
    ours_bodies.write_text("\n".join(json.dumps({"user_id": u, "k": args.k}) for u in sample))
    mlflow_bodies.write_text("\n".join(json.dumps({"dataframe_split": {"columns": ["user_id"], "data": [[u]]},
                                                    "params": {"k": args.k}}) for u in sample))
    latency = {}
    port = free_port()
    ours = start([sys.executable, "-m", "serving", f"model.uri=models:/{NAME}@champion",
                  f"tracking.uri={model['tracking_uri']}", f"port={port}", "log_level=warning", f"paths.root={WORK}",
                  f"limits.max_k={max(1000, args.k)}"], f"http://127.0.0.1:{port}/readyz", "python -m serving")
    try:
        latency["python -m serving"] = measure(f"http://127.0.0.1:{port}/recommend", ours_bodies, args.k,
                                               args.concurrency, args.duration, args.warmup)
    finally:
        stop(ours)
    port = free_port()
    theirs = start([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager",
                    "local", "--host", "127.0.0.1", "-p", str(port), "-w", "1"], f"http://127.0.0.1:{port}/ping",
                   "mlflow models serve", env={"MLFLOW_TRACKING_URI": model["tracking_uri"],  # it execs `uvicorn`:
                                                   "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    try:
        latency["mlflow models serve"] = measure(f"http://127.0.0.1:{port}/invocations", mlflow_bodies, args.k,
                                                 args.concurrency, args.duration, args.warmup)
    finally:
        stop(theirs)
    batch = batch_scoring(model, users[:args.batch_users], args.k, args.batch_chunk)
    report = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "argv": sys.argv[1:],
              "args": vars(args), "model": {"run_id": model["run_id"], "version": model["version"],
                                                            "metrics": model["metrics"], "table_bytes": model["memory"]},
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": sys.version.split()[0]},
              "latency": latency, "batch": batch}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps(report, indent=1, default=str))
    (RESULTS / "serving.md").write_text(markdown(report))
    plot(report, RESULTS / "serving.png")
    with Tracker(experiment="benchmark-serving", root=str(ROOT)).start("serving", {"args": vars(args)}) as run:
        for server, rows in latency.items():
            tag = "ours" if "serving" in server and "mlflow" not in server else "mlflow"
            for r in rows:
                run.log_metrics({f"{tag}_{m}": r[m] for m in ("rps", "p50_ms", "p95_ms", "p99_ms", "errors")},
                                step=r["concurrency"])
        run.log_metrics({k2: v for k2, v in batch.items() if isinstance(v, (int, float))})
        for suffix in ("json", "md", "png"):
            run.log_artifact(RESULTS / f"serving.{suffix}")
    print(markdown(report))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="?", default="run", choices=["run", "load"])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--interactions", type=int, default=400_000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--batch-users", type=int, default=20_000)
    parser.add_argument("--batch-chunk", type=int, default=1024)
    parser.add_argument("--url")
    parser.add_argument("--bodies")
    args = parser.parse_args()
    if args.part == "load":
        print(json.dumps(load(args.url, args.bodies, args.k, args.concurrency[0], args.duration, args.warmup)))
        return
    benchmark(args)


if __name__ == "__main__":
    main()
