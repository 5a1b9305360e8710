#!/usr/bin/env python
"""Matrix-factorization benchmark: our MF-BPR and ALS against the `implicit` library.

For each dataset (ml100k, synthetic_1m) the data are prepared through the real Hydra config
(``conf/train.yaml`` + ``data=...``), then trained and evaluated on the same split:

- ``popularity``     most-popular baseline (recsys.evaluation.PopularityScorer)
- ``mf_bpr``         our MF-BPR (model=mf_bpr: TorchRec tables, FBGEMM fused row-wise Adagrad)
- ``implicit_bpr``   implicit's BayesianPersonalizedRanking (CPU, Hogwild SGD), same epochs as ours
- ``implicit_bpr_x4`` the same with 4x the epochs: one epoch of implicit samples one negative per
                     positive, ours samples 4 (model.negatives.num), so this is the same number of
                     (user, positive, negative) triples as ``mf_bpr``
- ``als``            our implicit ALS (model=als: batched Cholesky in torch)
- ``implicit_als``   implicit's AlternatingLeastSquares, alpha=1 (confidence c_ui = 1 on positives)
- ``implicit_als_a2`` the same with alpha=2, i.e. c_ui = 2 = our ALS's 1 + alpha*r with alpha=1:
                     the same objective as ``als``

Every method is scored by the same evaluator (recsys.training.loop.evaluate: full ranking over all
items, training items excluded) on the test split. Records seconds per epoch, total seconds,
Recall@20, NDCG@20 and table bytes; writes benchmarks/results/mf.{json,md,png} and one MLflow run per
(dataset, method) in experiment ``benchmark-mf`` plus a summary run holding the three files.

    python benchmarks/mf.py                                  # everything (make bench)
    python benchmarks/mf.py --datasets ml100k --epochs-bpr 20 --iterations-als 15
    python benchmarks/mf.py --tune                           # learning-rate sweep on a validation split

Hyper-parameters were chosen with ``--tune`` on ml100k's validation split (10% of the training part,
``data.split.valid_fraction=0.1``); the test split is never looked at when choosing them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# OpenMP threads that sleep instead of spin while waiting. Must be set before torch (and implicit)
# load libgomp. With the default (spinning) policy, 2 threads on 2 cores slow down 5-20x as soon as
# any other process needs a core: our MF-BPR epoch on synthetic_1m went from ~3 s to 22-80 s with
# one busy process beside it, ~5.5 s with PASSIVE. Applies to both libraries; set the variable
# yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from pipelines.prepare import ensure_prepared  # noqa: E402
from pipelines.train import build_model  # noqa: E402
from recsys.evaluation import METRIC_DEFINITIONS, PopularityScorer  # noqa: E402
from recsys.tracking.mlflow_run import Tracker  # noqa: E402
from recsys.training.loop import evaluate, fit  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DATASETS = ("ml100k", "synthetic_1m")
METHODS = ("popularity", "mf_bpr", "implicit_bpr", "implicit_bpr_x4", "als", "implicit_als", "implicit_als_a2")
SHORT = {"popularity": "Popularity", "mf_bpr": "MF-BPR\n(ours)", "implicit_bpr": "implicit\nBPR",
         "implicit_bpr_x4": "implicit\nBPR 4x ep.", "als": "ALS\n(ours)", "implicit_als": "implicit\nALS a=1",
         "implicit_als_a2": "implicit\nALS a=2"}
LABELS = {"popularity": "Popularity", "mf_bpr": "MF-BPR (ours)", "implicit_bpr": "implicit BPR",
          "implicit_bpr_x4": "implicit BPR (4x epochs = our triples)",
          "als": "ALS (ours)", "implicit_als": "implicit ALS (alpha=1)",
          "implicit_als_a2": "implicit ALS (alpha=2, = our objective)"}
THREADS = 2
SEED = 0
K = 20
CHECKPOINTS = Path(tempfile.gettempdir()) / "bench-mf-checkpoints"  # per-epoch checkpoints of fit(); removed at exit

# Epochs of BPR (ours and implicit's alike) per dataset. Our MF-BPR spends ~3-6 s per epoch on
# synthetic_1m (4 negatives per positive: 3.2M triples per epoch), so 20 epochs fit the budget.
BPR_EPOCHS = {"ml100k": 20, "synthetic_1m": 20}
ALS_ITERATIONS = 15

# Chosen with `--tune` on ml100k's validation split (see README); conf defaults otherwise.
OUR_BPR_LR = 0.05            # conf/model/mf_bpr.yaml default (row-wise Adagrad), kept by the sweep
IMPLICIT_BPR_LR = 0.025      # implicit's default is 0.01; the sweep picked 0.025
IMPLICIT_BPR_X4_LR = 0.005   # the same sweep at 4x the epochs picked 0.005
IMPLICIT_BPR_REG = 0.01
ALS_REG, ALS_ALPHA, FACTORS = 10.0, 1.0, 64


# --------------------------------------------------------------------------- config and data

def compose_cfg(dataset: str, model: str, epochs: int, extra: list[str] = (), valid: bool = False):
    """The real train config for ``dataset`` x ``model`` (as ``python -m pipelines.train`` composes it)."""
    prepared = f"{ROOT}/data/prepared/bench/{dataset}{'_valid' if valid else ''}"
    overrides = [f"paths.root={ROOT}", f"data={dataset}", f"model={model}", f"trainer.epochs={epochs}",
                 f"trainer.seed={SEED}", f"trainer.eval_ks=[{K}]", "trainer.progress=false",
                 f"trainer.checkpoint_dir={CHECKPOINTS}/{dataset}-{model}",
                 # a folder of its own, so that a concurrent `pipelines.train` never re-prepares under us
                 f"data.prepared_dir={prepared}"]
    if valid:
        overrides.append("data.split.valid_fraction=0.1")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides + list(extra))


def data_info(data) -> dict:
    train, test = data.matrix("train"), data.matrix("test")
    return {"n_users": data.n_users - 1, "n_items": data.n_items - 1, "train": int(train.nnz),
            "test": int(test.nnz), "density": train.nnz / ((data.n_users - 1) * (data.n_items - 1)),
            "prepared_dir": str(data.root)}


# --------------------------------------------------------------------------- the methods

def fit_logged(model, data, trainer, run) -> tuple[dict, list[float], dict]:
    """``recsys.training.loop.fit`` with its per-epoch metrics logged to the MLflow ``run`` (None: not logged);
    returns (test metrics, each epoch's training seconds, the early-stopping summary: best metric and epoch)."""
    epochs: list[float] = []
    best: dict[str, float] = {}

    def log(metrics, step):
        if "epoch_seconds" in metrics:
            epochs.append(metrics["epoch_seconds"])
        else:  # the early-stopping summary
            best.update(metrics)
        if run is not None:
            run.log_metrics(metrics, step)

    return fit(model, data, trainer, log=log), epochs, best


def run_ours(cfg, data, run, split: str = "test") -> dict:
    """Trains cfg.model with recsys.training.loop.fit; returns its record."""
    torch.manual_seed(SEED)
    trainer = instantiate(cfg.trainer)
    model = build_model(cfg, data, trainer)
    began = time.perf_counter()
    metrics, epochs, best = fit_logged(model, data, trainer, run)  # test metrics (checkpoints every epoch)
    fit_seconds = time.perf_counter() - began
    if split != "test":
        metrics = evaluate(model, data, split, [K])
    return {"epochs": len(epochs), "seconds_per_epoch": float(np.mean(epochs)) if epochs else 0.0,
            "train_seconds": float(np.sum(epochs)), "fit_seconds": fit_seconds,
            "epoch_seconds": [round(s, 4) for s in epochs], "metrics": metrics, "early_stopping": best,
            "table_bytes": int(sum(model.memory().values()))}


def run_implicit(kind: str, data, epochs: int, params: dict, split: str = "test") -> dict:
    """Fits implicit's BPR or ALS on data.matrix('train') and scores it with our evaluator."""
    from threadpoolctl import threadpool_limits
    if kind == "bpr":
        from implicit.cpu.bpr import BayesianPersonalizedRanking as Model
    else:
        from implicit.cpu.als import AlternatingLeastSquares as Model
    train = data.matrix("train").astype(np.float32)  # users x items, implicit >= 0.5 convention
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # implicit's BLAS-threads advice: we limit BLAS below
        model = Model(factors=FACTORS, iterations=epochs, num_threads=THREADS, random_state=SEED, **params)
    # implicit parallelises over rows itself; a multi-threaded BLAS inside would oversubscribe.
    with threadpool_limits(1, "blas"):
        began = time.perf_counter()
        model.fit(train, show_progress=False)
        train_seconds = time.perf_counter() - began
    users, items = torch.from_numpy(np.ascontiguousarray(model.user_factors)), torch.from_numpy(
        np.ascontiguousarray(model.item_factors))

    def score(batch: torch.Tensor) -> torch.Tensor:
        # BPR: user_factors end with a column of ones and item_factors with the item bias,
        # so this dot product is implicit's own score.
        return users[batch] @ items.T

    began = time.perf_counter()
    metrics = evaluate(score, data, split, [K])
    eval_seconds = time.perf_counter() - began
    return {"epochs": epochs, "seconds_per_epoch": train_seconds / max(epochs, 1), "train_seconds": train_seconds,
            "fit_seconds": train_seconds + eval_seconds, "metrics": metrics,
            "table_bytes": int(model.user_factors.nbytes + model.item_factors.nbytes)}


def run_popularity(data, split: str = "test") -> dict:
    began = time.perf_counter()
    scorer = PopularityScorer(data.matrix("train"))
    metrics = evaluate(scorer, data, split, [K])
    return {"epochs": 0, "seconds_per_epoch": 0.0, "train_seconds": 0.0, "fit_seconds": time.perf_counter() - began,
            "metrics": metrics, "table_bytes": int(scorer.counts.numel() * scorer.counts.element_size())}


def method_settings(method: str, bpr_epochs: int, als_iterations: int) -> dict:
    """What a method is run with (also its MLflow params)."""
    if method == "mf_bpr":
        return {"model": "mf_bpr", "epochs": bpr_epochs, "overrides": [f"model.table_optimizer.lr={OUR_BPR_LR}"]}
    if method == "als":
        return {"model": "als", "epochs": als_iterations,
                "overrides": [f"model.factors={FACTORS}", f"model.regularization={ALS_REG}",
                              f"model.alpha={ALS_ALPHA}"]}
    if method == "implicit_bpr":
        return {"kind": "bpr", "epochs": bpr_epochs,
                "params": {"learning_rate": IMPLICIT_BPR_LR, "regularization": IMPLICIT_BPR_REG}}
    if method == "implicit_bpr_x4":
        return {"kind": "bpr", "epochs": 4 * bpr_epochs,
                "params": {"learning_rate": IMPLICIT_BPR_X4_LR, "regularization": IMPLICIT_BPR_REG}}
    if method == "implicit_als":
        return {"kind": "als", "epochs": als_iterations, "params": {"regularization": ALS_REG, "alpha": 1.0}}
    if method == "implicit_als_a2":
        # implicit's confidence is alpha * r, ours 1 + alpha * r: on 0/1 data its alpha = ours + 1
        return {"kind": "als", "epochs": als_iterations,
                "params": {"regularization": ALS_REG, "alpha": 1.0 + ALS_ALPHA}}
    return {"epochs": 0}


def run_method(method: str, dataset: str, data, settings: dict, run=None, split: str = "test", valid: bool = False):
    if method == "popularity":
        return run_popularity(data, split), None
    if "model" in settings:
        cfg = compose_cfg(dataset, settings["model"], settings["epochs"], settings["overrides"], valid=valid)
        return run_ours(cfg, data, run, split), OmegaConf.to_container(cfg.model, resolve=True)
    return run_implicit(settings["kind"], data, settings["epochs"], settings["params"], split), None


# --------------------------------------------------------------------------- machine and outputs

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gb() -> float | None:
    try:
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        return round(kb / 2**20, 1)
    except (OSError, IndexError, ValueError):
        return None


def machine() -> dict:
    import implicit
    import torchrec
    return {"platform": platform.platform(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "torchrec": torchrec.__version__,
            "implicit": implicit.__version__, "torch_threads": torch.get_num_threads(), "implicit_threads": THREADS,
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "memory_gb": _memory_gb(),
            "load_average_at_start": list(os.getloadavg())}


def fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def markdown(report: dict) -> str:
    lines = ["| Dataset | Method | Epochs | s / epoch | Total s | Recall@20 | NDCG@20 | Table bytes |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for dataset, block in report["results"].items():
        for method, r in block["methods"].items():
            spe = f"{r['seconds_per_epoch']:.3f}" if r["epochs"] else "-"
            lines.append(f"| {dataset} | {LABELS[method]} | {r['epochs'] or '-'} | {spe} | {r['fit_seconds']:.1f} | "
                         f"{r[f'recall@{K}']:.4f} | {r[f'ndcg@{K}']:.4f} | {fmt_bytes(r['table_bytes'])} |")
    m = report["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; torch {m['torch']} "
              f"({m['torch_threads']} threads), torchrec {m['torchrec']}, implicit {m['implicit']} "
              f"({m['implicit_threads']} threads), OMP_WAIT_POLICY={m['OMP_WAIT_POLICY']}. Load average at start "
              f"{' / '.join(f'{x:.2f}' for x in m['load_average_at_start'])}, at end "
              f"{' / '.join(f'{x:.2f}' for x in report['load_average_at_end'])}. {report['date']}.",
              "", "Total s: ours = the whole `fit()` call (training, a checkpoint per epoch, test evaluation); "
              "implicit = `model.fit` + the same test evaluation; popularity = counting + evaluation.",
              "", f"Metric definitions: {report['metric_definitions']}."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    datasets = list(report["results"])
    fig, axes = plt.subplots(len(datasets), 2, figsize=(13, 4 * len(datasets)), squeeze=False)
    colours = {"popularity": "#999999", "mf_bpr": "#1f77b4", "implicit_bpr": "#aec7e8", "implicit_bpr_x4": "#9edae5",
               "als": "#d62728",
               "implicit_als": "#ff9896", "implicit_als_a2": "#f7b6d2"}
    for row, dataset in enumerate(datasets):
        methods = report["results"][dataset]["methods"]
        names = list(methods)
        labels = [SHORT[n] for n in names]
        recall = [methods[n][f"recall@{K}"] for n in names]
        ax = axes[row][0]
        bars = ax.bar(labels, recall, color=[colours[n] for n in names])
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_title(f"{dataset}: Recall@{K} (test)")
        ax.set_ylim(0, max(recall) * 1.2)
        timed = [n for n in names if methods[n]["epochs"]]
        ax = axes[row][1]
        bars = ax.bar([SHORT[n] for n in timed], [methods[n]["seconds_per_epoch"] for n in timed],
                      color=[colours[n] for n in timed])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"{dataset}: seconds per epoch ({THREADS} threads, log scale)")
        for a in axes[row]:
            a.tick_params(axis="x", labelsize=8)
    fig.text(0.01, 0.005, "implicit ALS a=2 has the same objective as our ALS (c_ui = 1 + r_ui); "
             "implicit BPR 4x ep. = as many sampled triples as ours (4 negatives per positive)", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- entry points

def benchmark(args) -> dict:
    tracker = Tracker(experiment="benchmark-mf", root=str(ROOT))
    report = {"machine": machine(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
              "k": K, "seed": SEED, "metric_definitions": METRIC_DEFINITIONS,
              "tuning": "learning rates chosen on ml100k's validation split "
              "(`--tune`, data.split.valid_fraction=0.1); test never used for choices",
              "results": {}}
    for dataset in args.datasets:
        bpr_epochs = args.epochs_bpr if args.epochs_bpr is not None else BPR_EPOCHS.get(dataset, 20)
        cfg = compose_cfg(dataset, "mf_bpr", bpr_epochs)
        began = time.perf_counter()
        data = ensure_prepared(cfg.data)
        info = data_info(data) | {"prepare_seconds": time.perf_counter() - began,
                                  "data_config": OmegaConf.to_container(cfg.data, resolve=True)}
        print(f"[{dataset}] {info['n_users']} users x {info['n_items']} items, {info['train']} train / "
              f"{info['test']} test interactions", flush=True)
        block = report["results"][dataset] = {"data": info, "methods": {}}
        for method in args.methods:
            settings = method_settings(method, bpr_epochs, args.iterations_als)
            params = {"dataset": dataset, "method": method, "threads": THREADS, "seed": SEED,
                      **{k: v for k, v in settings.items() if k != "overrides"}}
            with tracker.start(f"{method}-{dataset}", params, tags={"benchmark": "mf", "data": dataset,
                                                                      "method": method}) as run:
                result, model_cfg = run_method(method, dataset, data, settings, run)
                if model_cfg is not None:
                    run.log_dict(model_cfg, "model_config.json")
                run.log_metrics(result["metrics"], prefix="test_")
                run.log_metrics({k: result[k] for k in ("seconds_per_epoch", "train_seconds", "fit_seconds",
                                                         "table_bytes")})
                run_id = run.id
            metrics = result.pop("metrics")
            block["methods"][method] = {**result, f"recall@{K}": metrics[f"recall@{K}"],
                                        f"ndcg@{K}": metrics[f"ndcg@{K}"], "metrics": metrics,
                                        "settings": {k: v for k, v in settings.items()}, "mlflow_run_id": run_id}
            print(f"[{dataset}] {LABELS[method]:<40} epochs {result['epochs']:>3}  s/epoch "
                  f"{result['seconds_per_epoch']:8.3f}  total {result['fit_seconds']:7.1f}s  "
                  f"recall@{K} {metrics[f'recall@{K}']:.4f}  ndcg@{K} {metrics[f'ndcg@{K}']:.4f}", flush=True)
    report["load_average_at_end"] = list(os.getloadavg())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mf.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (RESULTS / "mf.md").write_text(markdown(report))
    plot(report, RESULTS / "mf.png")
    with tracker.start("summary", {"command": report["command"], "datasets": list(args.datasets),
                                   "methods": list(args.methods)}, tags={"benchmark": "mf"}) as run:
        for name in ("mf.json", "mf.md", "mf.png"):
            run.log_artifact(RESULTS / name)
    print(markdown(report))
    return report


def tune(args) -> None:
    """Learning-rate sweep of both BPRs on ml100k's validation split (test untouched)."""
    global OUR_BPR_LR, IMPLICIT_BPR_LR, IMPLICIT_BPR_X4_LR
    dataset, epochs = "ml100k", args.epochs_bpr or BPR_EPOCHS["ml100k"]
    data = ensure_prepared(compose_cfg(dataset, "mf_bpr", epochs, valid=True).data)
    print(f"validation sweep on {dataset} (train {data.matrix('train').nnz}, valid {data.matrix('valid').nnz}),"
          f" {epochs} epochs, recall@{K} / ndcg@{K} on valid")
    rows = []
    for lr in args.our_lrs:
        OUR_BPR_LR = lr
        r, _ = run_method("mf_bpr", dataset, data, method_settings("mf_bpr", epochs, 0), split="valid", valid=True)
        rows.append(("mf_bpr", lr, r["metrics"][f"recall@{K}"], r["metrics"][f"ndcg@{K}"]))
        print(*rows[-1], flush=True)
    for method in ("implicit_bpr", "implicit_bpr_x4"):
        for lr in args.implicit_lrs:
            IMPLICIT_BPR_LR = IMPLICIT_BPR_X4_LR = lr
            r, _ = run_method(method, dataset, data, method_settings(method, epochs, 0), split="valid")
            rows.append((method, lr, r["metrics"][f"recall@{K}"], r["metrics"][f"ndcg@{K}"]))
            print(*rows[-1], flush=True)
    print(f"\nMetric definitions: {METRIC_DEFINITIONS}.")
    print("\n| Method | learning rate | valid Recall@20 | valid NDCG@20 |\n|---|---:|---:|---:|")
    for method, lr, recall, ndcg in rows:
        print(f"| {LABELS[method]} | {lr} | {recall:.4f} | {ndcg:.4f} |")


def main(argv: list[str] | None = None) -> None:
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epochs-bpr", type=int, default=None,
                        help=f"BPR epochs for both libraries (default per dataset: {BPR_EPOCHS})")
    parser.add_argument("--iterations-als", type=int, default=ALS_ITERATIONS,
                        help=f"ALS sweeps for both libraries (default {ALS_ITERATIONS})")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch and implicit threads (default 2)")
    parser.add_argument("--tune", action="store_true", help="only run the validation learning-rate sweep")
    parser.add_argument("--our-lrs", nargs="+", type=float, default=[0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--implicit-lrs", nargs="+", type=float, default=[0.005, 0.01, 0.025, 0.05, 0.1])
    args = parser.parse_args(argv)
    THREADS = args.threads
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    try:
        tune(args) if args.tune else benchmark(args)
    finally:
        shutil.rmtree(CHECKPOINTS, ignore_errors=True)


if __name__ == "__main__":
    main()
