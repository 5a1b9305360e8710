#!/usr/bin/env python
"""Every collaborative-filtering family on a published split, tuned on its validation split, beside the peers.

Data: ``data=ml1m_lightgcn``, MovieLens 1M as split for LightGCN++ (``../shared/data/ml-1m-lightgcn``: train, valid
and test files, 6,039 users x 3,628 items). Metrics on test with training items excluded: Recall@20 = hits /
|test items| (the definition of LightGCN, BARS and RecBole) and NDCG@20 with IDCG over min(20, |test items|).

- **Ours**: each model is tuned by ``pipelines.tune`` (Optuna TPE, median pruning on the per-epoch validation
  metric, ``--trials`` trials, EASE ``--ease-trials`` over its lambda), then its best config is trained by
  ``pipelines.train`` on the training split (early stopping on valid, as in the trials) and scored on test.
- **Peers, in the same script and on the same split**: ``implicit`` ALS and BPR over grids of ``--trials`` points
  chosen on valid (each grid point fit on train, the best one's fit scored on test), the NumPy EASE reference over a
  lambda grid, and popularity.

Writes benchmarks/results/leaderboard.{json,md,png} (a run replaces the rows it ran and keeps the others, so the
families can run in several sessions; Optuna studies resume from ``WORK/optuna.db``), and logs one MLflow run per
row in experiment ``benchmark-leaderboard`` (the studies' parent and trial runs go there too).

    python benchmarks/leaderboard.py --models popularity ease ease_numpy implicit_als als
    python benchmarks/leaderboard.py --models mf_bpr --trials 30
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/README.md, "Threads and a shared machine"

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.cf_models import numpy_ease  # noqa: E402
from benchmarks.mf import machine  # noqa: E402
from pipelines import train as train_pipeline  # noqa: E402
from pipelines import tune as tune_pipeline  # noqa: E402
from pipelines.config import compose_run  # noqa: E402
from pipelines.prepare import ensure_prepared  # noqa: E402
from recsys.evaluation import PopularityScorer  # noqa: E402
from recsys.tracking.mlflow_run import Tracker  # noqa: E402
from recsys.training.loop import evaluate  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "data" / "bench_leaderboard"
DATA = "ml1m_lightgcn"
EXPERIMENT = "benchmark-leaderboard"
K = 20
THREADS = 2
OURS = ("ease", "als", "mf_bpr", "mf_softmax", "mf_sampled_softmax", "mf_simplex", "nbmf", "comirec_sa", "comirec_dr")
PEERS = ("popularity", "ease_numpy", "implicit_als", "implicit_bpr")
KIND = {"ease": "EASE", "ease_numpy": "EASE", "als": "ALS", "implicit_als": "ALS", "mf_bpr": "MF", "mf_softmax": "MF",
        "mf_sampled_softmax": "MF", "mf_simplex": "MF", "implicit_bpr": "MF", "nbmf": "NBMF",
        "comirec_sa": "ComiRec", "comirec_dr": "ComiRec", "popularity": "popularity"}
EASE_LAMBDAS = (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0)
# The peers' grids: 30 points each, as many as our studies' trials by default.
ALS_GRID = {"factors": (64, 128), "regularization": (0.1, 1.0, 10.0, 100.0, 1000.0), "alpha": (1.0, 5.0, 20.0)}
BPR_GRID = {"factors": (64, 128), "learning_rate": (0.005, 0.01, 0.025, 0.05, 0.1), "regularization": (0.001, 0.01, 0.1)}
ALS_ITERATIONS, BPR_ITERATIONS = 15, 100


def base_overrides() -> list[str]:
    return [f"paths.root={WORK}", f"data={DATA}", f"tracking.experiment={EXPERIMENT}", f"trainer.eval_ks=[{K}]",
            "trainer.progress=false"]


def metrics_row(metrics: dict) -> dict:
    return {"recall@20": metrics[f"recall@{K}"], "ndcg@20": metrics[f"ndcg@{K}"]}


# --------------------------------------------------------------------------- ours: tuned, then trained

def run_ours(model: str, trials: int) -> dict:
    """Tunes ``model`` on valid with ``pipelines.tune``, trains its best config with ``pipelines.train``."""
    began = time.perf_counter()
    study = tune_pipeline.run(compose_run("tune", [*base_overrides(), f"model={model}", f"tune.trials={trials}"]))
    tuned_seconds = time.perf_counter() - began
    final = train_pipeline.run(compose_run("train", [
        *base_overrides(), f"hydra.searchpath=[file://{WORK / 'tuning'}]", f"+tuned={model}-{DATA}",
        "log_model=false", f"run_name=final-{model}"]))
    return {"test": metrics_row(final["metrics"]), "valid": {"recall@20": study["best_value"]},
            "chosen": study["best_params"], "trials": study["trials"], "tune_seconds": tuned_seconds,
            "final_seconds": time.perf_counter() - began - tuned_seconds, "table_bytes": int(sum(final["memory"].values())),
            "tuned_config": study["tuned_config"], "run_id": final["run_id"]}


# --------------------------------------------------------------------------- peers: grids chosen on valid

def grid_search(points: list[dict], fit, data) -> dict:
    """Fits every grid point on train, keeps the one with the best valid Recall@20, scores that fit on test."""
    best, tried, began = None, [], time.perf_counter()
    for point in points:
        score = fit(point)
        valid = evaluate(score, data, "valid", [K])
        tried.append({**point, "valid_recall@20": valid[f"recall@{K}"]})
        if best is None or valid[f"recall@{K}"] > best[1][f"recall@{K}"]:
            best = (point, valid, score)
    point, valid, score = best
    return {"test": metrics_row(evaluate(score, data, "test", [K])), "valid": {"recall@20": valid[f"recall@{K}"]},
            "chosen": point, "trials": {"complete": len(points)}, "tune_seconds": time.perf_counter() - began,
            "grid": tried}


def implicit_fit(kind: str, data):
    from threadpoolctl import threadpool_limits
    if kind == "bpr":
        from implicit.cpu.bpr import BayesianPersonalizedRanking as Model
    else:
        from implicit.cpu.als import AlternatingLeastSquares as Model
    train = data.matrix("train").astype(np.float32)

    def fit(point: dict):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # implicit's BLAS-threads advice: BLAS is limited below
            model = Model(**point, iterations=BPR_ITERATIONS if kind == "bpr" else ALS_ITERATIONS,
                          num_threads=THREADS, random_state=0)
        with threadpool_limits(1, "blas"):
            model.fit(train, show_progress=False)
        users, items = torch.from_numpy(np.ascontiguousarray(model.user_factors)), torch.from_numpy(
            np.ascontiguousarray(model.item_factors))
        return lambda batch: users[batch] @ items.T  # BPR's factors carry its item bias: implicit's own score
    return fit


def numpy_ease_fit(data):
    train = data.matrix("train").astype(np.float64)

    def fit(point: dict):
        weights = torch.from_numpy(numpy_ease(train, point["regularization"]).astype(np.float32))
        return lambda users: torch.from_numpy(train[users.numpy()].toarray().astype(np.float32)) @ weights
    return fit


def run_peer(name: str, data) -> dict:
    if name == "popularity":
        scorer = PopularityScorer(data.matrix("train"))
        return {"test": metrics_row(evaluate(scorer, data, "test", [K])), "chosen": {}, "trials": {}}
    if name == "ease_numpy":
        return grid_search([{"regularization": r} for r in EASE_LAMBDAS], numpy_ease_fit(data), data)
    grid = ALS_GRID if name == "implicit_als" else BPR_GRID
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    return grid_search(points, implicit_fit(name.removeprefix("implicit_"), data), data)


# --------------------------------------------------------------------------- report

def markdown(report: dict) -> str:
    rows = report["rows"]
    lines = [f"# Leaderboard: {DATA} (updated {report['date']})", "",
             "MovieLens 1M as split for LightGCN++ (train / valid / test files in ../shared/data/ml-1m-lightgcn; "
             f"{report['data']['n_users']:,} users x {report['data']['n_items']:,} items). Settings chosen on valid, "
             "the test split read once per row. **Recall@20 = hits / |test items|** (LightGCN, BARS, RecBole); "
             "NDCG@20 with IDCG over min(20, |test items|); training items excluded from the ranking.", "",
             "| Model | Kind | Chosen on valid by | Recall@20 | NDCG@20 | valid Recall@20 | Chosen settings |",
             "|---|---|---|---:|---:|---:|---|"]
    order = sorted(rows, key=lambda n: -rows[n]["test"]["recall@20"])
    for name in order:
        r = rows[name]
        how = (f"Optuna, {r['trials'].get('complete', 0)} complete + {r['trials'].get('pruned', 0)} pruned trials"
               if name in OURS else (f"grid of {r['trials'].get('complete', 0)}" if r["trials"] else "-"))
        chosen = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in r["chosen"].items())
        valid = r.get("valid", {}).get("recall@20")
        lines.append(f"| {name}{' (ours)' if name in OURS else ''} | {KIND[name]} | {how} | "
                     f"{r['test']['recall@20']:.4f} | {r['test']['ndcg@20']:.4f} | "
                     f"{'' if valid is None else f'{valid:.4f}'} | {chosen} |")
    lines += ["", "## What the tuning found", "",
              "fANOVA importance of each setting for valid Recall@20 (Optuna's FanovaImportanceEvaluator over the "
              "study's completed trials; pruned trials are left out; shares sum to 1), and the chosen value:", ""]
    for name in (n for n in order if n in OURS):
        found = importances(name)
        if found:
            chosen = rows[name]["chosen"]
            lines.append(f"- **{name}**: " + ", ".join(
                f"{k.split('.')[-1]} {v:.2f} (chosen {_short(chosen.get(k))})" for k, v in found.items()))
    m = report["machine"]
    lines += ["", "For orientation (../shared/data/README.md, settings chosen on valid): popularity 0.118 / 0.164, "
              "NumPy EASE (lambda 1000) 0.254 / 0.327, implicit ALS 0.251 / 0.308, implicit BPR 0.153 / 0.185.", "",
              f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, implicit {m['implicit']}, "
              f"OMP_WAIT_POLICY={m['OMP_WAIT_POLICY']}; load average at start {m['load_average_at_start']}. "
              f"Command: `{report['command']}`."]
    return "\n".join(lines) + "\n"


def importances(model: str) -> dict[str, float]:
    """fANOVA importances of the settings of ``model``'s stored study, largest first; {} without one (or without
    two completed trials)."""
    import optuna

    storage = f"sqlite:///{WORK / 'optuna.db'}"
    study = f"{model}-{DATA}"
    if not (WORK / "optuna.db").is_file() or study not in optuna.study.get_all_study_names(storage):
        return {}
    loaded = optuna.load_study(study_name=study, storage=storage)
    if sum(t.state == optuna.trial.TrialState.COMPLETE for t in loaded.trials) < 2:
        return {}
    found = optuna.importance.get_param_importances(loaded, evaluator=optuna.importance.FanovaImportanceEvaluator(
        seed=0))
    return {k: float(v) for k, v in found.items()}


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["rows"]
    names = sorted(rows, key=lambda n: rows[n]["test"]["recall@20"])
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.5))
    colors = ["tab:blue" if n in OURS else "tab:gray" for n in names]
    ax.barh(names, [rows[n]["test"]["recall@20"] for n in names], color=colors)
    ax.set_xlabel("test Recall@20 (hits / |test items|)")
    ax.set_title(f"{DATA}: ours (blue) and peers (gray), settings chosen on valid")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[*PEERS, *OURS], choices=[*PEERS, *OURS])
    parser.add_argument("--trials", type=int, default=30, help="Optuna trials per model (and grid points per peer)")
    parser.add_argument("--ease-trials", type=int, default=12, help="Optuna trials over EASE's lambda")
    parser.add_argument("--report", action="store_true",
                        help="only write leaderboard.md and .png again from leaderboard.json and the stored studies")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / "leaderboard.json"
    report = json.loads(json_path.read_text()) if json_path.is_file() else {"rows": {}}
    if args.report:
        (RESULTS / "leaderboard.md").write_text(markdown(report))
        plot(report, RESULTS / "leaderboard.png")
        return
    data = ensure_prepared(compose_run("train", base_overrides()).data)
    report |= {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
               "command": "python benchmarks/leaderboard.py " + shlex.join(argv or sys.argv[1:]),
               "data": {"name": DATA, "n_users": data.n_users - 1, "n_items": data.n_items - 1,
                        **{f"{s}_interactions": int(data.matrix(s).nnz) for s in data.splits}},
               "metric": "Recall@20 = hits / |test items|; NDCG@20 with IDCG over min(20, |test items|)"}
    tracker = Tracker(experiment=EXPERIMENT, root=str(WORK))
    for name in args.models:
        began = time.perf_counter()
        row = (run_ours(name, args.ease_trials if name == "ease" else args.trials) if name in OURS
               else run_peer(name, data))
        row["seconds"] = time.perf_counter() - began
        report["rows"][name] = row
        with tracker.start(name, {"model": name, "trials": args.trials}, tags={"benchmark": "leaderboard"}) as run:
            run.log_metrics({f"test_{k}": v for k, v in row["test"].items()})
        print(f"{name}: test recall@20 {row['test']['recall@20']:.4f}, ndcg@20 {row['test']['ndcg@20']:.4f} "
              f"({row['seconds']:.0f} s)", flush=True)
        json_path.write_text(json.dumps(report, indent=2, default=str))
        (RESULTS / "leaderboard.md").write_text(markdown(report))
        plot(report, RESULTS / "leaderboard.png")
    with tracker.start("summary", {"models": " ".join(args.models)}, tags={"benchmark": "leaderboard"}) as run:
        for suffix in ("json", "md", "png"):
            run.log_artifact(RESULTS / f"leaderboard.{suffix}")


if __name__ == "__main__":
    main()
