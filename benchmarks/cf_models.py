#!/usr/bin/env python
"""Collaborative-filtering model family on ml100k: popularity, MF-BPR, ALS, EASE, NBMF, ComiRec-DR/SA.

Every model is composed through the real Hydra config (``conf/train.yaml`` + ``data=ml100k model=...``,
exactly as ``python -m pipelines.train`` does), trained with ``recsys.training.loop.fit`` and scored
by the same evaluator (full ranking over all items, training items excluded) on the same test split.
EASE runs at several regularizations, and in its pruned (sparse, top-k per column) form; beside it,
in the same run, a plain NumPy/SciPy EASE as common libraries write it (Gram matrix with SciPy,
``numpy.linalg.inv``, then ``B = -P / diag(P)``), so the fit times compare like for like.

Records Recall/NDCG/HitRate at 20 and 50, fit seconds (training only: ``fit``'s summed
``epoch_seconds``; for the NumPy reference, Gram + inverse), total seconds (training, checkpoints,
evaluation) and model memory in bytes measured from the model's tensors (``model.memory()``).
Writes benchmarks/results/cf_models.{json,md,png}; one MLflow run per method in experiment
``benchmark-cf`` plus a ``summary`` run holding the three files.

    python benchmarks/cf_models.py                        # everything (about 10 minutes on 2 cores)
    python benchmarks/cf_models.py --methods ease_500 ease_numpy nbmf_k32
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/mf.py: spinning OpenMP threads on 2 shared cores

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from benchmarks.mf import CHECKPOINTS, compose_cfg, data_info, fmt_bytes, machine, run_ours  # noqa: E402
from pipelines.prepare import ensure_prepared  # noqa: E402
from recsys.evaluation import METRIC_DEFINITIONS, PopularityScorer  # noqa: E402
from recsys.tracking.mlflow_run import Tracker  # noqa: E402
from recsys.training.loop import evaluate  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DATASET = "ml100k"
KS = (20, 50)
SEED = 0


@dataclass(frozen=True)
class Method:
    """One row of the benchmark: a conf/model option with its epochs and overrides."""

    label: str
    model: str | None = None  # None: not a conf/model option (popularity, the NumPy reference)
    epochs: int = 1
    overrides: tuple[str, ...] = field(default_factory=tuple)
    family: str = ""
    early_stopping: bool = False  # train on 90% of train, stop on the other 10% (same test split)


EASE_LAMBDAS = (100, 250, 500, 1000, 2000)
EASE_TOP_K = (256, 64, 16)  # pruned B: entries kept per column, at lambda 500
NBMF_K = (16, 32, 64)
METHODS: dict[str, Method] = {
    "popularity": Method("Popularity", family="baseline"),
    "mf_bpr": Method("MF-BPR", "mf_bpr", 20, family="MF"),
    "als": Method("ALS (CG)", "als", 15, family="MF"),
    **{f"ease_{lam}": Method(f"EASE lambda={lam}", "ease", 1, (f"model.regularization={lam}",), "EASE")
       for lam in EASE_LAMBDAS},
    **{f"ease_500_top{k}": Method(f"EASE lambda=500, top-{k} per column", "ease", 1,
                                  ("model.regularization=500", f"model.prune_top_k={k}"), "EASE pruned")
       for k in EASE_TOP_K},
    "ease_numpy": Method("EASE lambda=500, NumPy/SciPy reference (numpy.linalg.inv)", family="EASE"),
    **{f"nbmf_k{k}": Method(f"NBMF k={k}", "nbmf", 15, (f"model.factors={k}",), "NBMF") for k in NBMF_K},
    # Next-item training overfits on a random split: stop on validation Recall@20 (patience 3, best epoch restored).
    "comirec_dr": Method("ComiRec-DR (early stopping)", "comirec_dr", 20, family="ComiRec", early_stopping=True),
    "comirec_sa": Method("ComiRec-SA (early stopping)", "comirec_sa", 20, family="ComiRec", early_stopping=True),
}


# --------------------------------------------------------------------------- the non-config methods

def run_popularity(data) -> dict:
    began = time.perf_counter()
    scorer = PopularityScorer(data.matrix("train"))
    fit_seconds = time.perf_counter() - began
    metrics = evaluate(scorer, data, "test", list(KS))
    return {"epochs": 0, "fit_seconds": fit_seconds, "total_seconds": time.perf_counter() - began,
            "metrics": metrics, "model_bytes": int(scorer.counts.numel() * scorer.counts.element_size())}


def numpy_ease(train: sp.csr_matrix, regularization: float) -> np.ndarray:
    """EASE as common libraries write it: dense Gram matrix, ``numpy.linalg.inv``, ``B = -P / diag(P)``."""
    gram = (train.T @ train).toarray().astype(np.float64)
    gram[np.diag_indices_from(gram)] += regularization
    p = np.linalg.inv(gram)
    b = p / -np.diag(p)
    b[np.diag_indices_from(b)] = 0.0
    return b


def run_numpy_ease(data, regularization: float = 500.0) -> dict:
    train = data.matrix("train").astype(np.float64)
    began = time.perf_counter()
    b = numpy_ease(train, regularization)
    fit_seconds = time.perf_counter() - began
    weights = torch.from_numpy(b.astype(np.float32))

    def score(users: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(train[users.numpy()].toarray().astype(np.float32)) @ weights

    metrics = evaluate(score, data, "test", list(KS))
    return {"epochs": 1, "fit_seconds": fit_seconds, "total_seconds": time.perf_counter() - began,
            "metrics": metrics, "model_bytes": int(weights.numel() * weights.element_size())}


def run_method(name: str, method: Method, data, run) -> tuple[dict, dict | None]:
    if name == "popularity":
        return run_popularity(data), None
    if name == "ease_numpy":
        return run_numpy_ease(data), None
    stopping = ["trainer.eval_every=1", "trainer.early_stopping=recall@20", "trainer.patience=3"]
    cfg = compose_cfg(DATASET, method.model, method.epochs,
                      [f"trainer.eval_ks=[{','.join(map(str, KS))}]", *method.overrides,
                       *(stopping if method.early_stopping else [])], valid=method.early_stopping)
    if method.early_stopping:
        data = ensure_prepared(cfg.data)
    record = run_ours(cfg, data, run)
    result = {"epochs": record["epochs"], "fit_seconds": record["train_seconds"], "total_seconds": record["fit_seconds"],
              "seconds_per_epoch": record["seconds_per_epoch"], "metrics": record["metrics"],
              "model_bytes": record["table_bytes"], "early_stopping": record["early_stopping"]}
    return result, OmegaConf.to_container(cfg.model, resolve=True)


# --------------------------------------------------------------------------- outputs

def markdown(report: dict) -> str:
    head = " | ".join(f"Recall@{k} | NDCG@{k}" for k in KS)
    lines = [f"| Method | Epochs | Fit s | Total s | {head} | HitRate@20 | Model bytes |",
             "|---|---:|---:|---:|" + "---:|" * (2 * len(KS) + 1) + "---:|"]
    for name, r in report["methods"].items():
        if "error" in r:
            lines.append(f"| {METHODS[name].label} | error: {r['error']} |")
            continue
        m = r["metrics"]
        cells = " | ".join(f"{m[f'recall@{k}']:.4f} | {m[f'ndcg@{k}']:.4f}" for k in KS)
        epochs = r["epochs"] or "-"
        if best := r.get("early_stopping"):
            epochs = f"{epochs} (best {int(best['best_epoch']) + 1})"
        lines.append(f"| {METHODS[name].label} | {epochs} | {r['fit_seconds']:.2f} | "
                     f"{r['total_seconds']:.1f} | {cells} | {m['hitrate@20']:.4f} | "
                     f"{r['model_bytes']:,} ({fmt_bytes(r['model_bytes'])}) |")
    d, m = report["data"], report["machine"]
    lines += ["", f"Data: ml100k (ratings >= 4, users >= 5 positives, per-user random 80/20, seed 0): "
              f"{d['n_users']} users x {d['n_items']} items, {d['train']:,} train / {d['test']:,} test interactions. "
              "Rows marked early stopping train on a random 90% of each user's training items and stop on Recall@20 "
              "of the other 10% (patience 3, the best epoch restored; 'best' = that epoch); the test split is the same.",
              f"Metric definitions: {report['metric_definitions']}.",
              f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; torch {m['torch']} ({m['torch_threads']} "
              f"threads), OMP_WAIT_POLICY={m['OMP_WAIT_POLICY']}; load average {m['load_average_at_start'][0]:.2f} "
              f"at start, {report['load_average_at_end'][0]:.2f} at end. Date {report['date']}, commit "
              f"{report['commit']}.", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(n, r) for n, r in report["methods"].items() if "error" not in r]
    fig, (bars, scatter) = plt.subplots(1, 2, figsize=(15, 5.5))
    x = np.arange(len(rows))
    for offset, k in ((-0.2, 20), (0.2, 50)):
        bars.bar(x + offset, [r["metrics"][f"recall@{k}"] for _, r in rows], 0.4, label=f"Recall@{k}")
    bars.set_xticks(x, [METHODS[n].label.replace(", ", "\n").replace(" (", "\n(") for n, _ in rows],
                    rotation=90, fontsize=7)
    bars.set_ylabel("test recall")
    bars.legend()
    bars.set_title("ml100k, full-catalog ranking")
    families = sorted({METHODS[n].family for n, _ in rows})
    for family in families:
        pts = [(r["model_bytes"], r["metrics"]["recall@20"], n) for n, r in rows if METHODS[n].family == family]
        scatter.scatter([p[0] for p in pts], [p[1] for p in pts], label=family)
        for b, rec, n in pts:
            scatter.annotate(n, (b, rec), fontsize=6, xytext=(3, 3), textcoords="offset points")
    scatter.set_xscale("log")
    scatter.set_xlabel("model bytes (measured from the tensors)")
    scatter.set_ylabel("Recall@20")
    scatter.set_title("memory vs quality")
    scatter.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def benchmark(names: list[str]) -> dict:
    data = ensure_prepared(compose_cfg(DATASET, "mf_bpr", 1).data)
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": _commit(),
              "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]), "machine": machine(),
              "data": data_info(data), "metric_definitions": METRIC_DEFINITIONS, "methods": {}}
    tracker = Tracker(experiment="benchmark-cf", root=ROOT)
    for name in names:
        method = METHODS[name]
        settings = {"method": name, "model": method.model, "epochs": method.epochs, "overrides": list(method.overrides)}
        with tracker.start(name, settings, tags={"benchmark": "cf_models", "family": method.family}) as run:
            result, model_cfg = run_method(name, method, data, run)
            if model_cfg is not None:
                run.log_dict(model_cfg, "model_config.json")
            run.log_metrics(result["metrics"], prefix="test_")
            run.log_metrics({k: result[k] for k in ("fit_seconds", "total_seconds", "model_bytes")})
            report["methods"][name] = {**result, "settings": settings, "mlflow_run_id": run.id}
        m = result["metrics"]
        print(f"{method.label:<55} fit {result['fit_seconds']:8.2f}s  recall@20 {m['recall@20']:.4f}  "
              f"ndcg@20 {m['ndcg@20']:.4f}  recall@50 {m['recall@50']:.4f}  bytes {result['model_bytes']:,}",
              flush=True)
    report["load_average_at_end"] = list(os.getloadavg())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cf_models.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (RESULTS / "cf_models.md").write_text(markdown(report))
    plot(report, RESULTS / "cf_models.png")
    with tracker.start("summary", {"command": report["command"], "methods": names},
                       tags={"benchmark": "cf_models"}) as run:
        for suffix in ("json", "md", "png"):
            run.log_artifact(RESULTS / f"cf_models.{suffix}")
    print(markdown(report))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    try:
        benchmark(args.methods)
    finally:
        shutil.rmtree(CHECKPOINTS, ignore_errors=True)


if __name__ == "__main__":
    main()
