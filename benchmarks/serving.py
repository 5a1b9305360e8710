#!/usr/bin/env python
"""Serving benchmark: compressed tables served as stored. For full tables and each compression method at one budget,
MF (BPR, D = 64) over a synthetic catalog of ``--users`` users x ``--items`` items is trained for one epoch and
packaged, then served by ``python -m serving`` from the package directory. Recorded per method:

- the server's resident memory (``VmRSS`` of the process) once ready and after the load, minus that of a server
  holding a tiny model (2,000 users x 1,000 items): the memory the model adds;
- the model bytes the server reports (``/metrics`` ``recsys_serving_model_bytes``: tables, codes, id maps, the
  users' histories);
- requests/s, p50 and p99 of ``/recommend`` (one random known user, k = ``--k``, seen items excluded) at each
  ``--concurrency``, from a separate process on loopback (asyncio + httpx, one keep-alive connection per client);
- top-K agreement with the decoded model: the server's answers for ``--agreement-users`` users against brute force
  over every decoded user and item vector (float32, seen items excluded).

Beside them, in the same run: ``mlflow models serve`` of the full-table model (the same package logged as an MLflow
pyfunc, ``--env-manager local``, one worker) under the same load, and batch scoring of ``--batch-users`` users with
``pipelines.batch_score`` against a plain loop of pyfunc ``predict`` over pandas chunks (both from the logged model,
each timed from loading it).

Both servers run one worker process; on this 2-core machine the load generator shares the cores with the server.

    python benchmarks/serving.py                                    # 200k x 500k, about 40 minutes
    python benchmarks/serving.py --users 20000 --items 50000 --interactions 200000 --duration 5

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
# This process (the batch-scoring comparison) runs with PASSIVE OpenMP threads (see benchmarks/mf.py); the servers
# run with the environment a user's server has: the default wait policy unless the caller set one.
SERVER_ENV = dict(os.environ)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "data" / "bench_serving"
TINY = ["data.source.generator.n_users=2000", "data.source.generator.n_items=1000",
        "data.source.generator.n_interactions=100000"]


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
                               env={**SERVER_ENV, **(env or {})})
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

def methods(budget: float) -> dict[str, list[str]]:
    """Overrides of each served configuration."""
    b = f"embedding.default.budget={budget}"
    return {"full": ["embedding=full"], "vq_e2e": ["embedding=vq_e2e", b],
            "product_quantization": ["embedding=product_quantization", b],
            "quotient_remainder": ["embedding=quotient_remainder", b], "hashing": ["embedding=hashing", b]}


def catalog(args) -> list[str]:
    return [f"data.source.generator.n_users={args.users}", f"data.source.generator.n_items={args.items}",
            f"data.source.generator.n_interactions={args.interactions}",
            f"data.source.generator.popularity_exponent={args.popularity_exponent}",
            f"data.source.generator.affinity={args.affinity}"]


def build_package(name: str, data_name: str, overrides: list[str]) -> dict:
    """Trains MF for one epoch and saves its package to ``WORK/packages/<name>`` (no test evaluation: brute force over
    every user and item is what the agreement check does on a sample)."""
    from omegaconf import OmegaConf
    from hydra.utils import instantiate

    from pipelines.config import compose_run
    from pipelines.prepare import ensure_prepared
    from pipelines.train import build_model
    from recsys.inference.export import package_model

    cfg = compose_run("train", [f"paths.root={WORK}", "data=synthetic", f"data.name={data_name}", "model=mf_bpr",
                                "model.dim=64", "trainer.batch_size=8192", "trainer.progress=false", *overrides])
    data = ensure_prepared(cfg.data)
    model = build_model(cfg, data, instantiate(cfg.trainer))
    began = time.perf_counter()
    loss = model.train_epoch(0, None)["loss"]
    seconds = time.perf_counter() - began
    package = package_model(model, data, OmegaConf.to_container(cfg, resolve=True))
    directory = package.save(WORK / "packages" / name)
    return {"directory": str(directory), "train_seconds": seconds, "loss": loss, "package_bytes": package.bytes(),
            "training_table_bytes": sum(model.memory().values()), "users": data.n_users - 1, "items": data.n_items - 1}


def rss(pid: int) -> dict[str, int]:
    """Resident and peak resident bytes of a process (``/proc/<pid>/status``)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return {"rss": fields["VmRSS"], "peak_rss": fields["VmHWM"]}


def served_bytes(url: str) -> dict[str, int]:
    import requests

    out = {}
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("recsys_serving_model_bytes{"):
            part = line.split('part="')[1].split('"')[0]
            out[part] = int(float(line.rsplit(" ", 1)[1]))
    return out


def serve_package(directory: str, port: int) -> subprocess.Popen:
    return start([sys.executable, "-m", "serving", f"model.uri={directory}", f"port={port}", "log_level=warning",
                  f"paths.root={WORK}", "limits.max_k=1000"], f"http://127.0.0.1:{port}/readyz", "python -m serving")


def answers(url: str, users: list, k: int) -> list[list]:
    import requests

    with requests.Session() as session:
        return [session.post(f"{url}/recommend", json={"user_id": u, "k": k}, timeout=60).json()["items"] for u in users]


def agreement(directory: str, users: list, served: list[list], k: int) -> dict:
    """Top-k of the server against brute force over the decoded float32 vectors (seen items excluded): mean overlap,
    the share of identical lists, and the share identical once items tied at the k-th score are allowed to swap."""
    import torch

    from recsys.data.batching import jagged
    from recsys.data.schemas import ITEM, USER
    from recsys.inference.scorers import load

    scorer = load(directory)
    with torch.no_grad():
        items = torch.cat([scorer.model(jagged([ITEM], [torch.arange(s, min(s + 65536, scorer.n_items))]))[ITEM]
                           for s in range(0, scorer.n_items, 65536)])
        index = scorer.user_index(users)
        queries = scorer.model(jagged([USER], [torch.from_numpy(index)]))[USER]
    overlap, identical, tie_equal = [], 0, 0
    for row, user in enumerate(index):
        scores = queries[row] @ items.T
        scores[0] = -torch.inf
        scores[torch.from_numpy(scorer.excluded(int(user)))] = -torch.inf
        values, best = scores.topk(k)
        expected = scorer.items.raw(best.numpy()).tolist()
        got = served[row]
        overlap.append(len(set(got) & set(expected)) / k)
        identical += got == expected
        tied = set(scorer.items.raw(torch.nonzero(torch.isclose(scores, values[-1], rtol=1e-6, atol=1e-7))[:, 0]
                                    .numpy()).tolist())
        tie_equal += set(got) - tied == set(expected) - tied
    n = len(index)
    return {"users": n, "mean_overlap": float(np.mean(overlap)), "identical_lists": identical / n,
            "identical_ties_aside": tie_equal / n}


def serving_run(name: str, port: int, process: subprocess.Popen, bodies: Path, args, sample: list,
                directory: str | None) -> dict:
    url = f"http://127.0.0.1:{port}"
    time.sleep(2.0)  # the load's transient memory settles
    row = {"name": name, "ready": rss(process.pid)}
    if directory is not None:
        row["served_bytes"] = served_bytes(url)
    path = "/recommend" if directory is not None else "/invocations"
    row["latency"] = measure(f"{url}{path}", bodies, args.k, args.concurrency, args.duration, args.warmup)
    row["after_load"] = rss(process.pid)
    if directory is not None and sample:
        row["agreement_answers"] = answers(url, sample, args.k)
    return row


def benchmark(args) -> dict:
    import pandas as pd

    from benchmarks.mf import cpu_model
    from recsys.tracking.mlflow_run import Tracker

    began_all, load_at_start = time.perf_counter(), list(os.getloadavg())
    configs = methods(args.budget)
    chosen = ["full", *[m for m in args.methods if m != "full"]]
    if args.reuse_packages:  # the packages of the last run (same arguments), as its report describes them
        packages = json.loads((RESULTS / "serving.json").read_text())["packages"]
        missing = [n for n in ["tiny", *chosen] if n not in packages or not Path(packages[n]["directory"]).is_dir()]
        if missing:
            raise SystemExit(f"--reuse-packages: no package of {missing} from the last run; run without it")
    else:
        shutil.rmtree(WORK / "packages", ignore_errors=True)
        packages = {"tiny": build_package("tiny", "serving_tiny", TINY)}
        for name in chosen:
            packages[name] = build_package(name, "serving_catalog", [*catalog(args), *configs[name]])
            print(f"  built {name}: {packages[name]['train_seconds']:.0f} s, {packages[name]['package_bytes']:,} bytes",
                  flush=True)
    users = pd.read_parquet(WORK / "data" / "prepared" / "serving_catalog" / "vocab" / "user.parquet")["raw_id"].tolist()
    rng = random.Random(0)
    sample = rng.sample(users, min(5000, len(users)))
    agreement_users = sample[:args.agreement_users]
    ours_bodies, mlflow_bodies = WORK / "bodies_ours.jsonl", WORK / "bodies_mlflow.jsonl"
    ours_bodies.write_text("\n".join(json.dumps({"user_id": u, "k": args.k}) for u in sample))
    mlflow_bodies.write_text("\n".join(json.dumps({"dataframe_split": {"columns": ["user_id"], "data": [[u]]},
                                                    "params": {"k": args.k}}) for u in sample))
    tiny_users = pd.read_parquet(WORK / "data" / "prepared" / "serving_tiny" / "vocab" / "user.parquet")["raw_id"]
    tiny_bodies = WORK / "bodies_tiny.jsonl"
    tiny_bodies.write_text("\n".join(json.dumps({"user_id": u, "k": args.k}) for u in tiny_users.tolist()[:1000]))

    servers = {}
    for name in ["tiny", *chosen]:
        port = free_port()
        process = serve_package(packages[name]["directory"], port)
        try:
            servers[name] = serving_run(name, port, process, tiny_bodies if name == "tiny" else ours_bodies, args,
                                        [] if name == "tiny" else agreement_users, packages[name]["directory"])
        finally:
            stop(process)
        if name != "tiny":
            servers[name]["agreement"] = agreement(packages[name]["directory"], agreement_users,
                                                   servers[name].pop("agreement_answers"), args.k)
    logged = log_full_model(packages["full"]["directory"])
    port = free_port()
    theirs = start([sys.executable, "-m", "mlflow", "models", "serve", "-m", logged["model_uri"], "--env-manager",
                    "local", "--host", "127.0.0.1", "-p", str(port), "-w", "1"], f"http://127.0.0.1:{port}/ping",
                   "mlflow models serve", env={"MLFLOW_TRACKING_URI": logged["tracking_uri"],  # it execs `uvicorn`:
                                               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    try:
        mlflow_row = serving_run("mlflow models serve", port, theirs, mlflow_bodies, args, [], None)
    finally:
        stop(theirs)
    batch = batch_scoring(packages["full"]["directory"], logged, users[:args.batch_users], args.k, args.batch_chunk)
    report = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "argv": sys.argv[1:],
              "args": vars(args), "packages": packages, "servers": servers, "mlflow": mlflow_row, "batch": batch,
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": sys.version.split()[0],
                          "load_average_at_start": load_at_start, "load_average_at_end": list(os.getloadavg()),
                          "server_omp_wait_policy": SERVER_ENV.get("OMP_WAIT_POLICY", "default"),
                          "batch_omp_wait_policy": os.environ["OMP_WAIT_POLICY"]},
              "total_seconds": time.perf_counter() - began_all}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps(report, indent=1, default=str))
    (RESULTS / "serving.md").write_text(markdown(report))
    plot(report, RESULTS / "serving.png")
    with Tracker(experiment="benchmark-serving", root=str(ROOT)).start("serving", {"args": vars(args)}) as run:
        base = servers["tiny"]["ready"]["rss"]
        for name, row in servers.items():
            run.log_metrics({f"{name}_rss_above_tiny": row["ready"]["rss"] - base,
                             f"{name}_served_bytes": sum(row.get("served_bytes", {}).values())})
            for r in row["latency"]:
                run.log_metrics({f"{name}_{m}": r[m] for m in ("rps", "p50_ms", "p99_ms", "errors")},
                                step=r["concurrency"])
        for r in mlflow_row["latency"]:
            run.log_metrics({f"mlflow_{m}": r[m] for m in ("rps", "p50_ms", "p99_ms", "errors")}, step=r["concurrency"])
        run.log_metrics({k2: v for k2, v in batch.items() if isinstance(v, (int, float))})
        for suffix in ("json", "md", "png"):
            run.log_artifact(RESULTS / f"serving.{suffix}")
    print(markdown(report))
    return report


def log_full_model(directory: str) -> dict:
    """The full-table package logged as an MLflow pyfunc in a store of its own (``WORK/mlflow.db``)."""
    import mlflow

    from recsys.inference.package import Package
    from recsys.tracking.registry import log_package

    uri = f"sqlite:///{WORK / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("serving-benchmark-model")
    with mlflow.start_run(run_name="full"):
        logged = log_package(Package.load(directory))
    return {"model_uri": logged["model_uri"], "tracking_uri": uri}


def batch_scoring(directory: str, logged: dict, users: list, k: int, chunk: int) -> dict:
    """users/s of ``pipelines.batch_score`` and of a plain loop of pyfunc ``predict`` over pandas chunks (the same
    users, the same logged model), each timed from loading the model to the last chunk."""
    import mlflow
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.batch_score import batch_score

    inputs, out = WORK / "batch_users", WORK / "batch_out"
    shutil.rmtree(inputs, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    inputs.mkdir(parents=True)
    step = len(users) // 4 + 1
    for part, start_row in enumerate(range(0, len(users), step)):  # 4 input files
        pq.write_table(pa.table({"user_id": users[start_row:start_row + step]}), inputs / f"users-{part}.parquet")
    mlflow.set_tracking_uri(logged["tracking_uri"])
    mlflow.MlflowClient(logged["tracking_uri"]).search_experiments()  # import + open the store outside the timings
    began = time.perf_counter()
    summary = batch_score(f"model.uri={logged['model_uri']}", f"input={inputs}", f"output={out}", f"k={k}",
                          f"batch_size={chunk}", f"tracking.uri={logged['tracking_uri']}", f"paths.root={WORK}",
                          "progress=false")
    ours = time.perf_counter() - began
    began = time.perf_counter()
    pyfunc = mlflow.pyfunc.load_model(logged["model_uri"])
    frame = pd.read_parquet(inputs)
    rows = 0
    for start_row in range(0, len(frame), chunk):
        predicted = pyfunc.predict(frame.iloc[start_row:start_row + chunk], params={"k": k})
        rows += int(predicted["items"].map(len).sum())
    plain = time.perf_counter() - began
    return {"users": len(users), "k": k, "chunk_rows": chunk, "batch_score_seconds": ours,
            "batch_score_users_per_second": len(users) / ours, "batch_score_rows_out": summary.get("rows_out"),
            "pyfunc_loop_seconds": plain, "pyfunc_loop_users_per_second": len(users) / plain, "pyfunc_loop_rows_out": rows}


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def markdown(report: dict) -> str:
    a, servers, packages = report["args"], report["servers"], report["packages"]
    base = servers["tiny"]["ready"]["rss"]
    full = servers["full"]["ready"]["rss"] - base
    m = report["machine"]
    lines = [f"# Serving benchmark ({report['date']})", "",
             f"MF (BPR, D = 64, one epoch) over a synthetic catalog of {packages['full']['users']:,} users x "
             f"{packages['full']['items']:,} items ({a['interactions']:,} interactions); compressed methods at budget "
             f"{a['budget']} of the full tables' bytes. Each server is `python -m serving` on the saved package, one "
             "worker process. /recommend: one random known user, k = "
             f"{a['k']}, seen items excluded; {a['duration']} s per concurrency level after {a['warmup']} s warm-up, "
             "load from a separate process on loopback (asyncio + httpx, one connection per client).", "",
             "## Memory and agreement", "",
             "RSS: the server process's resident memory once ready (and after the load); *above tiny*: minus the "
             "RSS of the same server holding a 2,000 x 1,000 model. *Model bytes*: what the server reports in "
             "/metrics (tables, codes, id maps; *context*: the users' histories, popularity and vocabularies). "
             f"Agreement: the top-{a['k']} of {a['agreement_users']} users against brute force over the decoded "
             "float32 vectors.", "",
             "| Served | Trained table bytes | Model bytes (tables) | Context bytes | RSS ready MiB | Above tiny MiB | "
             "x full | RSS after load MiB | Mean overlap | Identical lists | Identical, ties aside |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in servers.items():
        if name == "tiny":
            lines.append(f"| tiny model | | | | {_mib(row['ready']['rss'])} | 0 | | {_mib(row['after_load']['rss'])} "
                         "| | | |")
            continue
        sb = row["served_bytes"]
        above = row["ready"]["rss"] - base
        g = row["agreement"]
        lines.append(f"| {name} | {packages[name]['training_table_bytes']:,} | {sb.get('model', 0):,} | "
                     f"{sum(v for k, v in sb.items() if k != 'model'):,} | {_mib(row['ready']['rss'])} | {_mib(above)} | "
                     f"{above / full:.2f} | {_mib(row['after_load']['rss'])} | {g['mean_overlap']:.4f} | "
                     f"{g['identical_lists']:.3f} | {g['identical_ties_aside']:.3f} |")
    lines += ["", "## /recommend", "", "| Server | Concurrency | Requests/s | p50 ms | p99 ms | Errors | x mlflow |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    theirs = {r["concurrency"]: r["rps"] for r in report["mlflow"]["latency"]}
    for name, row in [*servers.items(), ("mlflow models serve (full)", report["mlflow"])]:
        for r in row["latency"]:
            ratio = r["rps"] / theirs[r["concurrency"]] if name != "mlflow models serve (full)" and name != "tiny" else None
            lines.append(f"| {name} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                         f"{r['errors']} | {'' if ratio is None else f'{ratio:.2f}x'} |")
    b = report["batch"]
    lines += ["", f"## Batch scoring of {b['users']:,} users (full tables, k = {b['k']}, chunks of {b['chunk_rows']:,} "
              "rows, model load included)", "", "| Method | Seconds | Users/s |", "|---|---:|---:|",
              f"| `pipelines.batch_score` (partitioned parquet, atomic parts) | {b['batch_score_seconds']:.1f} | "
              f"{b['batch_score_users_per_second']:,.0f} |",
              f"| plain loop of pyfunc `predict` over pandas chunks (no output written) | {b['pyfunc_loop_seconds']:.1f} | "
              f"{b['pyfunc_loop_users_per_second']:,.0f} |", "",
              f"Machine: {m['cpu']}, {m['cores']} cores (server, load generator and batch jobs share them); OpenMP "
              f"wait policy: servers {m['server_omp_wait_policy']}, batch scoring {m['batch_omp_wait_policy']}; load "
              f"average {m['load_average_at_start'][0]:.2f} at start, {m['load_average_at_end'][0]:.2f} at end; "
              f"{report['total_seconds'] / 60:.0f} minutes in all. Command: "
              f"`python benchmarks/serving.py {' '.join(report['argv'])}`."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = {k: v for k, v in report["servers"].items() if k != "tiny"}
    base = report["servers"]["tiny"]["ready"]["rss"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(servers)
    left.bar(names, [(row["ready"]["rss"] - base) / 2**20 for row in servers.values()])
    left.set_ylabel("server RSS above a tiny model (MiB)")
    left.tick_params(axis="x", rotation=30)
    for name, row in [*servers.items(), ("mlflow models serve (full)", report["mlflow"])]:
        c = [r["concurrency"] for r in row["latency"]]
        right.plot(c, [r["rps"] for r in row["latency"]], marker="o", label=name)
    right.set_xscale("log", base=2)
    right.set_xlabel("concurrent clients")
    right.set_ylabel("/recommend requests / s")
    right.legend(fontsize=7)
    fig.suptitle(f"MF over {report['packages']['full']['items']:,} items, k = {report['args']['k']}, "
                 f"budget {report['args']['budget']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="?", default="run", choices=["run", "load"])
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=500_000)
    parser.add_argument("--interactions", type=int, default=3_000_000)
    parser.add_argument("--popularity-exponent", type=float, default=0.5,
                        help="Zipf exponent of item popularity: low enough that nearly every item has an interaction")
    parser.add_argument("--affinity", type=float, default=1.0, help="weight of taste against popularity")
    parser.add_argument("--budget", type=float, default=0.0625)
    parser.add_argument("--methods", nargs="+", default=["vq_e2e", "product_quantization", "quotient_remainder",
                                                         "hashing"])
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--agreement-users", type=int, default=200)
    parser.add_argument("--batch-users", type=int, default=20_000)
    parser.add_argument("--batch-chunk", type=int, default=1024)
    parser.add_argument("--reuse-packages", action="store_true",
                        help="serve the packages the last run built (its report lists them) instead of training again")
    parser.add_argument("--url")
    parser.add_argument("--bodies")
    args = parser.parse_args()
    if args.part == "load":
        print(json.dumps(load(args.url, args.bodies, args.k, args.concurrency[0], args.duration, args.warmup)))
        return
    benchmark(args)


if __name__ == "__main__":
    main()
