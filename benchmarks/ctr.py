#!/usr/bin/env python
"""CTR benchmark: quality on Frappe (ours vs DeepCTR-Torch and plain PyTorch, every compression method at
several memory budgets) and training/inference speed on synthetic Criteo-like data (ours, full and
compressed, vs the same models in plain PyTorch with ``nn.EmbeddingBag``, and DeepCTR-Torch).

Parts (``python benchmarks/ctr.py <part> ...``):

* ``frappe``: the Frappe split of ``conf/data/frappe.yaml`` (80/10/10, seed 0). Every model trains up to
  30 epochs with early stopping on the validation AUC (patience 3, the best epoch restored) and is scored on
  the test split, over several seeds. Ours: DeepFM, DCNv2, DLRM through the real Hydra config (as
  ``python -m pipelines.train data=frappe model=...``). Beside them in the same run: DeepCTR-Torch's DeepFM
  and DCN (matrix cross layers = DCNv2) and plain-PyTorch DeepFM/DCNv2/DLRM (``benchmarks/ctr_baselines.py``).
  Then each compression method at each budget, over every seed, where the budget is the memory of the
  *compressed* tables (user, item and city: the fields of at least ``model.compress_min_rows`` rows) as a fraction
  of their full bytes, the seven small tables kept full: the model's ``embedding.total_budget`` is set to
  ``(budget x large + small) / (large + small)`` bytes, split over the compressed tables by
  ``recsys.embeddings.budget.split_budget`` (one fraction for all, raised to a table's smallest layout where that
  is larger) and checked against the tensors. ``vq_e2e`` trains differentiable VQ and is evaluated after the
  export to product quantization (codes + codebooks only); ``pq_post`` quantizes the trained full model's tables
  with FAISS k-means, no retraining. In the compression grid DeepFM has no first-order tables (its full first-order tables alone
  are 1/9 of the memory), also in its full reference.
* ``speed``: synthetic Criteo-like data (13 dense + 26 Zipf sparse fields, Criteo's cardinalities and
  missing shares, planted labels) at 1M and 10M rows, streamed from parquet. Per model: training samples/s
  over ``--steps`` steps of ``--batch-size`` rows after ``--warmup`` steps (input pipeline included, and the
  share of the time spent waiting for the next batch), and inference samples/s over ``--steps`` test
  batches; ours with full tables and with hashing (1/16), quotient-remainder (1/4) and mixed dimension (1/2),
  the plain-PyTorch model (``nn.EmbeddingBag(sparse=True)`` tables with sparse Adagrad, Adam for the dense
  layers, the same widths), and DeepCTR-Torch (its own in-memory input pipeline) for DeepFM and DCN.
  Ours run without dropout and embedding L2 penalty here, as the plain twins (``LIKE_PLAIN``).
* ``profile``: ``torch.profiler`` over training steps of each model (full tables, 1M rows, the configs as they
  are: dropout 0.2, embedding L2 for DeepFM and DLRM): where time goes.

Writes ``benchmarks/results/ctr_{frappe,speed,profile}.{json,md}`` (+ ``.png`` plots), one MLflow run per
measurement in experiment ``benchmark-ctr`` and a ``summary-<part>`` run holding the files.

    python benchmarks/ctr.py frappe                        # about 70 minutes on 2 cores
    python benchmarks/ctr.py frappe --seeds 0 --budgets 0.0625 --methods hashing
    python benchmarks/ctr.py speed                         # about 20 minutes (prepares 10M rows once, ~80 s)
    python benchmarks/ctr.py profile
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/mf.py: spinning OpenMP threads on 2 shared cores

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.compression import git_state, pq_subspaces  # noqa: E402
from benchmarks.ctr_baselines import PLAIN_MODELS, train_deepctr, train_plain  # noqa: E402
from benchmarks.mf import CHECKPOINTS, compose_cfg, fit_logged, fmt_bytes, machine  # noqa: E402
from pipelines.prepare import ensure_prepared  # noqa: E402
from recsys.data.batching import CTRBatcher, ParquetBatches  # noqa: E402
from recsys.embeddings.collection import EmbeddingSettings  # noqa: E402
from recsys.embeddings.quantization import DifferentiableVQTable, ProductQuantization  # noqa: E402
from recsys.errors import ConfigError  # noqa: E402
from recsys.tracking.mlflow_run import Tracker  # noqa: E402
from recsys.training.ctr import CTRTask  # noqa: E402
from recsys.training.loop import evaluate  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("deepfm", "dcnv2", "dlrm")
LABELS = {"deepfm": "DeepFM", "dcnv2": "DCNv2", "dlrm": "DLRM"}
STOPPING = ["trainer.epochs=30", "trainer.eval_every=1", "trainer.early_stopping=auc", "trainer.patience=3",
            "trainer.progress=false"]
# Compression methods of the grid: the conf/embedding option and how its budget is set.
METHODS = {"hashing": "Hashing", "double_hashing": "Double hashing", "hash_embedding": "Hash Embeddings (k=2)",
           "frequency_hashing": "Frequency-aware hashing", "quotient_remainder": "Quotient-remainder (mult)",
           "mixed_dim": "Mixed dimension", "low_rank": "Low-rank (N x r, r x D)", "tensor_train": "Tensor train (TT-Rec)",
           "vq_e2e": "Differentiable VQ -> PQ export", "pq_post": "Post-training PQ (k-means)"}
BUDGETS = (0.25, 0.0625)
ALL_SEED_METHODS = tuple(METHODS)  # every method over every seed
SEEDS = (0, 1, 2)
SPEED_SCALES = {"1m": 1_000_000, "10m": 10_000_000}
SPEED_METHODS = ("full", "hashing", "quotient_remainder", "mixed_dim")
# Per compressed table: the smallest budget every field has a layout for (quotient-remainder has none at 1/16 for
# Criteo's 200-1000-row fields, mixed dimension none below ~0.3 at D = 16 with widths in multiples of 4).
SPEED_BUDGETS = {"hashing": 0.0625, "quotient_remainder": 0.25, "mixed_dim": 0.5}
# The speed runs train the same network as the plain-PyTorch twin: no dropout, no embedding L2 penalty.
LIKE_PLAIN = ["model.model.dropout=0", "model.embedding_l2=0"]
# Frappe grid: at 1/16 mixed dimension has room for about one column per id, so its blocks take any width
# (dim_multiple=1), train on the dense kernel (FBGEMM's fused kernels need widths divisible by 4) and follow the
# vocabulary's frequency order (no id map, which alone would be 2 of the 8 bytes per id).
FRAPPE_OVERRIDES = {"mixed_dim": ["embedding.default.dim_multiple=1", "embedding.default.rank_by=index",
                                  "sharding=data_parallel"],
                    # below 1/8 at D = 32 a rank of 4 does not fit: any rank, on the dense kernel
                    "low_rank": ["embedding.default.rank_multiple=1", "sharding=data_parallel"]}
# Differentiable VQ: the number of subspaces S is chosen per model, budget and seed on the validation AUC among
# these sub-dimensions D / S (a fixed rule lost 0.016 AUC on DCNv2 at 1/4 when it changed)
VQ_SUBSPACE_DIMS = (4, 8, 16)
DEEPCTR = {"deepfm": "DeepFM", "dcnv2": "DCN"}


# --------------------------------------------------------------------------- building our models

def frappe_cfg(model: str, seed: int, extra: list[str] = ()):
    """The real train config of ``model`` on Frappe with early stopping on the validation AUC."""
    return compose_cfg("frappe", model, 30, [*STOPPING, f"trainer.seed={seed}", *extra])


def build_task(cfg, data, embedding: EmbeddingSettings | None = None) -> CTRTask:
    """CTRTask of ``cfg.model``; ``embedding`` (an EmbeddingSettings object) replaces ``cfg.embedding``."""
    torch.manual_seed(cfg.trainer.seed)
    trainer = instantiate(cfg.trainer)
    if embedding is None:
        embedding = instantiate(cfg.embedding, _convert_="object")
    kwargs = {k: instantiate(v, _convert_="object") if OmegaConf.is_dict(v) and "_target_" in v
              else OmegaConf.to_object(v) if OmegaConf.is_config(v) else v
              for k, v in cfg.model.items() if k not in ("name", "_target_", "embedding")}
    return CTRTask(data, trainer, embedding=embedding, **kwargs)


def table_bytes(task: CTRTask) -> int:
    return int(sum(task.memory().values()))


def train_task(task: CTRTask, cfg, data, run) -> dict:
    """``fit`` with the loop's early stopping; returns test metrics, epochs and training seconds."""
    metrics, seconds, best = fit_logged(task, data, instantiate(cfg.trainer), run)
    rows = data.manifest["rows"]["train"] * len(seconds)
    return {"test_auc": metrics["auc"], "test_logloss": metrics["logloss"], "epochs_run": len(seconds),
            "train_samples_per_second": rows / max(sum(seconds), 1e-9),
            "best_epoch": int(best.get("best_epoch", len(seconds) - 1)) + 1,
            "valid_auc": best.get("best_valid_auc"), "train_seconds": float(sum(seconds)),
            "table_bytes": table_bytes(task)}


def table_vectors(task: CTRTask, kind: type | None = None) -> dict[str, torch.Tensor]:
    """(N, D) outputs of every table of ``task.embeddings`` (or only those whose module is a ``kind``)."""
    return {name: task.embed(name, torch.arange(task.embeddings.specs[name].num_embeddings))
            for name, method in task.embeddings.methods.items() if kind is None or isinstance(method, kind)}


def transfer(source: CTRTask, target: CTRTask) -> int:
    """Copies every state entry of ``source``'s model that ``target`` has with the same key and shape (dense
    layers, tables kept full); returns how many."""
    wanted = target.model.state_dict()
    shared = {k: v for k, v in source.model.state_dict().items() if k in wanted and v.shape == wanted[k].shape}
    target.model.load_state_dict(shared, strict=False)
    return len(shared)


def exported(cfg, data, source: CTRTask, tables: dict[str, ProductQuantization]) -> CTRTask:
    """A model with ``tables`` as PQ tables and everything else (dense layers, small full tables) from ``source``."""
    task = build_task(cfg, data, EmbeddingSettings(tables=tables))
    transfer(source, task)
    return task


def held_out_metrics(task: CTRTask, data) -> dict:
    metrics = evaluate(task, data, "test", [20])
    return {"test_auc": metrics["auc"], "test_logloss": metrics["logloss"]}


def fit_budget(build: Callable[[float], CTRTask], target: int, start: float,
               size: Callable[[CTRTask], int] = table_bytes) -> tuple[float, CTRTask]:
    """The per-table budget, searched from ``start`` down, whose model (``build(budget)``) has a measured
    ``size`` within ``target`` bytes; returns it and that model."""
    budget = start
    for _ in range(12):
        task = build(budget)
        if (measured := size(task)) <= target:
            return budget, task
        budget *= 0.98 * target / measured
    raise ConfigError(f"no per-table budget fits {target} bytes (last tried {budget:.5f}: {measured} bytes)")


def embedding_overrides(method: str, budget: float) -> list[str]:
    extra = ["embedding.default.codewords=null"] if method == "vq_e2e" else []
    return [f"embedding={method}", f"embedding.default.budget={budget}", *extra]


# --------------------------------------------------------------------------- frappe

def frappe_full(model: str, seed: int, data, run, first_order: str | None = None) -> tuple[dict, CTRTask]:
    cfg = frappe_cfg(model, seed, [f"model.first_order={first_order}"] if first_order else [])
    task = build_task(cfg, data)
    return train_task(task, cfg, data, run), task


def frappe_compressed(model: str, method: str, ratio: float, seed: int, data, full: tuple[dict, CTRTask],
                      run) -> dict:
    """One compression method at ``ratio`` of the compressed tables' full bytes; ``vq_e2e``: the run whose number
    of subspaces (``VQ_SUBSPACE_DIMS``) gives the best validation AUC."""
    if method != "vq_e2e":
        return compressed_run(model, method, ratio, seed, data, full, run)
    dim = frappe_cfg(model, seed).model.dim
    tried = {}
    for subspaces in sorted({dim // d for d in VQ_SUBSPACE_DIMS if dim % d == 0 and dim > d}):
        try:
            tried[subspaces] = compressed_run(model, method, ratio, seed, data, full, None,
                                              [f"embedding.default.subspaces={subspaces}"])
        except ConfigError as error:
            print(f"vq_e2e with {subspaces} subspaces: {error}", flush=True)
    if not tried:
        raise ConfigError(f"vq_e2e: no number of subspaces has a layout at {ratio}")
    best = max(tried, key=lambda k: tried[k]["valid_auc"])
    run.log_params({"subspaces": best})
    return {**tried[best], "subspaces": best, "valid_auc_by_subspaces": {k: r["valid_auc"] for k, r in tried.items()}}


def compressed_run(model: str, method: str, ratio: float, seed: int, data, full: tuple[dict, CTRTask], run,
                   extra: list[str] = ()) -> dict:
    """One compression method at ``ratio`` of the compressed tables' full bytes, ``extra`` overrides added."""
    first_order = ["model.first_order=none"] if model == "deepfm" else []
    cfg = frappe_cfg(model, seed, first_order)  # the model and trainer settings; each build sets the tables
    large, small = compressed_share(full[1], cfg.model.compress_min_rows)
    target = int(ratio * large + small)  # the large tables in `ratio` of their bytes, the small ones full
    if method == "pq_post":
        vectors = table_vectors(full[1])

        def tables(budget: float) -> dict[str, ProductQuantization]:
            return {name: ProductQuantization.from_table(v, pq_subspaces({name: tuple(v.shape)}, budget), budget=budget,
                                                         seed=seed)
                    for name, v in vectors.items() if len(v) >= cfg.model.compress_min_rows}

        began = time.perf_counter()
        budget, task = fit_budget(lambda b: exported(cfg, data, full[1], tables(b)), target, ratio)
        return {**held_out_metrics(task, data), **compressed_bytes(task, small, large), "per_table_budget": budget,
                "epochs_run": 0, "best_epoch": 0, "train_seconds": time.perf_counter() - began}

    def vq_export(task: CTRTask) -> CTRTask:
        """The served model of a vq_e2e task: its VQ tables exported to PQ (codes + codebooks)."""
        vq = table_vectors(task, DifferentiableVQTable)
        return exported(cfg, data, task, {n: task.embeddings.methods[n].export(v) for n, v in vq.items()})

    extra = [*extra, *FRAPPE_OVERRIDES.get(method, [])]
    # model.compress_min_rows keeps the small fields full (their bytes count against the total); full_below_rows=0,
    # as its default (1000 rows) would keep the user and city tables full too
    total = target / (large + small)
    cfg = frappe_cfg(model, seed, [*first_order, *embedding_overrides(method, ratio), f"embedding.total_budget={total}",
                                   "embedding.full_below_rows=0", *extra])
    task = build_task(cfg, data)
    # vq_e2e: what counts is the export's memory (an eval-mode export leaves the VQ tables' counters as they are)
    if (measured := table_bytes(vq_export(task) if method == "vq_e2e" else task)) > target:
        raise ConfigError(f"{method}: embedding.total_budget={total} measures {measured} bytes, over the {target} allowed")
    record = train_task(task, cfg, data, run)
    if method == "vq_e2e":
        trained = {"test_auc_before_export": record["test_auc"], "training_table_bytes": record["table_bytes"]}
        served = vq_export(task)
        record |= {**held_out_metrics(served, data), **trained}
        task = served
    return {**record, **compressed_bytes(task, small, large), "table_memory": task.memory()}


def compressed_share(task: CTRTask, min_rows: int) -> tuple[int, int]:
    """Bytes of ``task``'s tables of at least ``min_rows`` rows (the ones a method compresses) and of the others."""
    memory, specs = task.memory(), task.embeddings.specs
    large = sum(b for t, b in memory.items() if specs[t].num_embeddings >= min_rows)
    return large, sum(memory.values()) - large


def compressed_bytes(task: CTRTask, small: int, large_full: int) -> dict:
    """The measured table bytes of a compressed ``task``, and the compressed tables' share of their full bytes."""
    measured = table_bytes(task)
    return {"table_bytes": measured, "compressed_ratio": (measured - small) / large_full}


def frappe(args, tracker: Tracker) -> dict:
    data = ensure_prepared(frappe_cfg("deepfm", 0).data)
    report = header(args, data_info=frappe_info(data))
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        write(report | {"rows": rows}, "frappe", frappe_markdown, frappe_plot)  # a stopped run keeps what it measured
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    for seed in args.seeds:
        for model in args.models:
            for variant, first_order in (("full", None), ("full_no_first_order", "none")):
                if variant == "full_no_first_order" and model != "deepfm":
                    continue
                with tracker.start(f"frappe-{model}-{variant}-s{seed}", {"model": model, "seed": seed},
                                   tags={"benchmark": "ctr", "part": "frappe"}) as run:
                    result, task = frappe_full(model, seed, data, run, first_order)
                record({"library": "ours", "model": model, "method": variant, "budget": 1.0, "seed": seed, **result})
                if variant == "full" and model == "deepfm":
                    continue  # the grid's DeepFM reference is the one without first-order tables
                full = (result, task)
                for method in args.methods:
                    for ratio in args.budgets:
                        if seed != args.seeds[0] and (ratio not in args.all_seed_budgets
                                                      or method not in args.all_seed_methods):
                            continue
                        with tracker.start(f"frappe-{model}-{method}-{ratio:g}-s{seed}",
                                           {"model": model, "method": method, "budget": ratio, "seed": seed},
                                           tags={"benchmark": "ctr", "part": "frappe"}) as run:
                            try:
                                result = frappe_compressed(model, method, ratio, seed, data, full, run)
                            except ConfigError as error:
                                result = {"error": str(error).splitlines()[0]}
                            if "error" not in result:
                                run.log_metrics({k: v for k, v in result.items() if isinstance(v, (int, float))})
                        record({"library": "ours", "model": model, "method": method, "budget": ratio, "seed": seed,
                                "full_table_bytes": full[0]["table_bytes"], **result})
        for model in args.models:
            baselines = [("plain-torch", lambda m=model: train_plain(m, data, seed=seed))]
            if model in DEEPCTR and not args.skip_deepctr:
                baselines.append(("deepctr-torch", lambda m=model: train_deepctr(DEEPCTR[m], data, seed=seed)))
            for library, train in baselines:
                with tracker.start(f"frappe-{library}-{model}-s{seed}", {"model": model, "seed": seed},
                                   tags={"benchmark": "ctr", "part": "frappe", "library": library}) as run:
                    result = train()
                    run.log_metrics({k: v for k, v in result.items() if isinstance(v, (int, float))})
                record({**result, "library": library, "model": model, "method": "full", "budget": 1.0, "seed": seed,
                        "table_bytes": result["embedding_bytes"]})
    report["rows"] = rows
    return finish(report, "frappe", frappe_markdown, frappe_plot, tracker)


def frappe_info(data) -> dict:
    return {"name": "frappe", "rows": data.manifest["rows"], "vocab_sizes": data.vocab_sizes,
            "prepared_dir": str(data.root)}


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def frappe_markdown(report: dict) -> str:
    rows = [r for r in report["rows"] if "error" not in r]
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"### Full tables (test AUC / log loss, mean ± std over seeds {seeds})", "",
             "| Model | Library | Test AUC | Test log loss | Best epoch | Train samples/s | Table bytes |",
             "|---|---|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["library"], r["model"], r["method"], r["budget"]), []).append(r)
    for (library, model, method, _), g in groups.items():
        if not method.startswith("full"):
            continue
        name = LABELS.get(model, model) + (" (no first-order tables)" if method == "full_no_first_order" else "")
        speed = [r["train_samples_per_second"] for r in g]
        lines.append(f"| {name} | {library} | {_mean_std([r['test_auc'] for r in g])} | "
                     f"{_mean_std([r['test_logloss'] for r in g])} | "
                     f"{np.mean([r['best_epoch'] for r in g]):.1f} | {f'{np.mean(speed):,.0f}' if speed else '-'} | "
                     f"{g[0]['table_bytes']:,} |")
    budgets = sorted({r["budget"] for r in rows if r["budget"] < 1}, reverse=True)
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    lines += ["", "### Compressed tables: test AUC (mean ± std where several seeds), and its difference to the "
              "same model with full tables (same seeds)", "",
              "| Method | Budget | " + " | ".join(LABELS[m] for m in models) + " |",
              "|---|---:|" + "---:|" * len(models)]
    reference = {m: {r["seed"]: r["test_auc"] for r in rows if r["library"] == "ours" and r["model"] == m
                     and r["method"] == ("full_no_first_order" if m == "deepfm" else "full")} for m in models}
    for method in METHODS:
        for budget in budgets:
            cells = []
            for m in models:
                g = groups.get(("ours", m, method, budget), [])
                if not g:
                    cells.append("n/a")
                    continue
                delta = [r["test_auc"] - reference[m][r["seed"]] for r in g if r["seed"] in reference[m]]
                ratio = max(r["compressed_ratio"] for r in g)
                cells.append(f"{_mean_std([r['test_auc'] for r in g])} ({np.mean(delta):+.4f}; "
                             f"{ratio:.3f} of full)")
            lines.append(f"| {METHODS[method]} | 1/{round(1 / budget)} | " + " | ".join(cells) + " |")
    errors = {(r["model"], r["method"], r["budget"]): r["error"] for r in report["rows"] if "error" in r}
    if errors:
        lines += ["", "n/a (the method has no layout within the budget; every seed):"]
        lines += [f"- {LABELS[m]} {METHODS[method]} at 1/{round(1 / b)}: {e}" for (m, method, b), e in errors.items()]
    lines += footer(report)
    return "\n".join(lines)


def frappe_plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if "error" not in r and r["library"] == "ours"]
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        reference = "full_no_first_order" if model == "deepfm" else "full"
        full = [r["test_auc"] for r in rows if r["model"] == model and r["method"] == reference]
        ax.axhline(np.mean(full), color="black", label="full tables")
        ax.axhspan(np.mean(full) - 0.005, np.mean(full) + 0.005, color="grey", alpha=0.2, label="full ± 0.005")
        for method, label in METHODS.items():
            points = sorted((r["compressed_ratio"], r["test_auc"]) for r in rows
                            if r["model"] == model and r["method"] == method)
            if points:
                ratios = sorted({p[0] for p in points})
                means = [np.mean([a for x, a in points if x == ratio]) for ratio in ratios]
                ax.plot(ratios, means, marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("compressed tables' bytes / their full bytes (measured)")
        ax.set_ylabel("test AUC")
        ax.set_title(f"Frappe, {LABELS[model]}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- speed

def criteo_cfg(model: str, scale: str, extra: list[str] = ()):
    overrides = ["data=synthetic_criteo", f"data.source.generator.n_rows={SPEED_SCALES[scale]}",
                 f"data.name=synthetic_criteo_{scale}", "trainer.progress=false"]
    if model == "dcnv2":
        overrides.append("model.model.cross.structure=parallel")  # as the plain-PyTorch DCNv2
    cfg = compose_cfg("synthetic_criteo", model, 1, [*overrides, *extra])
    cfg.data.prepared_dir = f"{ROOT}/data/prepared/bench/synthetic_criteo_{scale}"
    return cfg


def timed_steps(step: Callable, batches: Iterator, warmup: int, steps: int) -> dict:
    """Runs ``step`` on ``warmup`` then ``steps`` batches; samples/s over the timed ones and the share of
    that time spent waiting for the next batch."""
    for _ in range(warmup):
        step(next(batches))
    waiting = working = 0.0
    rows = 0
    for _ in range(steps):
        began = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            break
        got = time.perf_counter()
        step(batch)
        working += time.perf_counter() - got
        waiting += got - began
        rows += len(batch)
    return {"samples_per_second": rows / (waiting + working), "input_wait_fraction": waiting / (waiting + working),
            "timed_rows": rows}


def plain_step(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> Callable:
    def step(batch) -> None:
        model.train()
        for optimizer in optimizers:
            optimizer.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels).backward()
        for optimizer in optimizers:
            optimizer.step()
    return step


def plain_model(model: str, data, cfg) -> tuple[nn.Module, list[torch.optim.Optimizer]]:
    """The plain-PyTorch twin of ``cfg.model``: same D and MLP widths, sparse EmbeddingBags + sparse Adagrad."""
    schema, m = data.ctr_schema, cfg.model
    hidden = list(m.model.top if model == "dlrm" else m.model.deep)
    torch.manual_seed(0)
    net = PLAIN_MODELS[model]({k: data.vocab_sizes[k] for k in schema.sparse_features}, len(schema.dense), m.dim,
                              hidden, sparse=True)
    tables = [p for mod in net.modules() if isinstance(mod, nn.EmbeddingBag) for p in mod.parameters()]
    ids = {id(p) for p in tables}
    dense = [p for p in net.parameters() if id(p) not in ids]
    return net, [torch.optim.Adagrad(tables, lr=m.table_optimizer.lr), torch.optim.Adam(dense, lr=m.dense_optimizer.lr)]


def speed_one(model: str, scale: str, library: str, method: str, args, data) -> dict:
    """Training and inference samples/s of one configuration."""
    extra = [] if method == "full" else embedding_overrides(method, SPEED_BUDGETS[method])
    cfg = criteo_cfg(model, scale, [f"trainer.batch_size={args.batch_size}", *LIKE_PLAIN, *extra])
    to_batch = CTRBatcher(data.ctr_schema)

    def stream(split: str, shuffle: int) -> Iterator:
        return iter(ParquetBatches(data.path(split), to_batch, args.batch_size, shuffle, 0, cfg.trainer.prefetch))

    out: dict = {}
    if library == "ours":
        task = build_task(cfg, data)
        train = timed_steps(task.train_step, stream("train", cfg.trainer.shuffle_buffer), args.warmup, args.steps)
        infer = timed_steps(task.predict, stream("test", 0), 2, args.steps)
        out["table_bytes"] = table_bytes(task)
    elif library == "plain-torch":
        net, optimizers = plain_model(model, data, cfg)
        train = timed_steps(plain_step(net, optimizers), stream("train", cfg.trainer.shuffle_buffer), args.warmup,
                            args.steps)
        net.eval()
        with torch.no_grad():
            infer = timed_steps(lambda b: torch.sigmoid(net(b)), stream("test", 0), 2, args.steps)
        out["table_bytes"] = sum(p.numel() * p.element_size() for mod in net.modules()
                                 if isinstance(mod, nn.EmbeddingBag) for p in mod.parameters())
    else:  # deepctr-torch: its own in-memory pipeline over the first rows of each split
        result = train_deepctr(DEEPCTR[model], data, epochs=1, batch_size=args.batch_size, dim=cfg.model.dim,
                               dnn_hidden_units=list(cfg.model.model.deep), patience=1,
                               max_rows=(args.warmup + args.steps) * args.batch_size)
        return {"train_samples_per_second": result["train_samples_per_second"],
                "inference_samples_per_second": result["inference_samples_per_second"],
                "table_bytes": result["embedding_bytes"], "input_wait_fraction": None}
    return {**out, "train_samples_per_second": train["samples_per_second"],
            "input_wait_fraction": train["input_wait_fraction"], "timed_train_rows": train["timed_rows"],
            "inference_samples_per_second": infer["samples_per_second"]}


def speed(args, tracker: Tracker) -> dict:
    report = header(args, data_info={})
    rows = []
    for scale in args.scales:
        data = ensure_prepared(criteo_cfg("dlrm", scale).data)
        report["data_info"][scale] = {"rows": data.manifest["rows"], "total_ids": int(sum(data.vocab_sizes.values())),
                                      "planted_auc": data.manifest.get("generator", {}).get("planted_auc")}
        for model in args.models:
            configs = [("ours", m) for m in SPEED_METHODS] + [("plain-torch", "full")]
            if model in DEEPCTR and not args.skip_deepctr:
                configs.append(("deepctr-torch", "full"))
            for library, method in configs:
                with tracker.start(f"speed-{scale}-{model}-{library}-{method}", {"model": model, "scale": scale,
                                   "library": library, "method": method, "batch_size": args.batch_size},
                                   tags={"benchmark": "ctr", "part": "speed"}) as run:
                    result = speed_one(model, scale, library, method, args, data)
                    run.log_metrics({k: v for k, v in result.items() if isinstance(v, (int, float))})
                row = {"scale": scale, "model": model, "library": library, "method": method, **result}
                rows.append(row)
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}),
                      flush=True)
    report["rows"] = rows
    return finish(report, "speed", speed_markdown, speed_plot, tracker)


def speed_markdown(report: dict) -> str:
    lines = [f"Batch {report['args']['batch_size']}, {report['args']['warmup']} warm-up + "
             f"{report['args']['steps']} timed steps; inference over {report['args']['steps']} test batches.", "",
             "| Rows | Model | Library | Tables | Train samples/s | Input wait | Inference samples/s | Table bytes |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in report["rows"]:
        tables = "full" if r["method"] == "full" else f"{r['method']} 1/{round(1 / SPEED_BUDGETS[r['method']])}"
        wait = "-" if r["input_wait_fraction"] is None else f"{100 * r['input_wait_fraction']:.1f}%"
        lines.append(f"| {r['scale']} | {LABELS[r['model']]} | {r['library']} | {tables} | "
                     f"{r['train_samples_per_second']:,.0f} | {wait} | {r['inference_samples_per_second']:,.0f} | "
                     f"{r['table_bytes']:,} ({fmt_bytes(r['table_bytes'])}) |")
    info = report["data_info"]
    lines += ["", "Data: " + "; ".join(f"{scale}: {d['rows']['train']:,} train rows, {d['total_ids']:,} ids over 26 "
                                       f"fields, planted AUC {d['planted_auc']:.3f}" for scale, d in info.items())]
    lines += footer(report)
    return "\n".join(lines)


def speed_plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted({r["scale"] for r in report["rows"]}, key=lambda s: SPEED_SCALES[s])
    fig, axes = plt.subplots(len(scales), 2, figsize=(14, 4.5 * len(scales)), squeeze=False)
    for row_axes, scale in zip(axes, scales):
        rows = [r for r in report["rows"] if r["scale"] == scale]
        labels = [f"{LABELS[r['model']]}\n{r['library']}\n{r['method']}" for r in rows]
        for ax, key, title in zip(row_axes, ("train_samples_per_second", "inference_samples_per_second"),
                                  ("training", "inference")):
            ax.bar(range(len(rows)), [r[key] for r in rows],
                   color=[{"ours": "C0", "plain-torch": "C1", "deepctr-torch": "C2"}[r["library"]] for r in rows])
            ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
            ax.set_ylabel("samples / s")
            ax.set_title(f"synthetic Criteo {scale}: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- profile

def profile(args, tracker: Tracker) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    report = header(args, data_info={})
    data = ensure_prepared(criteo_cfg("dlrm", "1m").data)
    report["models"] = {}
    for model in args.models:
        cfg = criteo_cfg(model, "1m", [f"trainer.batch_size={args.batch_size}"])
        task = build_task(cfg, data)
        batches = iter(ParquetBatches(data.path("train"), CTRBatcher(data.ctr_schema), args.batch_size,
                                      cfg.trainer.shuffle_buffer, 0, cfg.trainer.prefetch))
        for _ in range(args.warmup):
            task.train_step(next(batches))
        phases = {"wait_for_batch": 0.0, "step": 0.0}
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.profile_steps):
                began = time.perf_counter()
                batch = next(batches)
                got = time.perf_counter()
                task.train_step(batch)
                phases["wait_for_batch"] += got - began
                phases["step"] += time.perf_counter() - got
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        top = [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3 / args.profile_steps,
                "share": e.self_cpu_time_total / total, "calls_per_step": e.count / args.profile_steps}
               for e in events[:25]]
        report["models"][model] = {"phases_seconds_per_step": {k: v / args.profile_steps for k, v in phases.items()},
                                   "top_ops": top, "groups": op_groups(events, total)}
        with tracker.start(f"profile-{model}", {"model": model, "batch_size": args.batch_size},
                           tags={"benchmark": "ctr", "part": "profile"}) as run:
            run.log_dict(report["models"][model], f"profile_{model}.json")
    return finish(report, "profile", profile_markdown, None, tracker)


GROUPS = {  # substring of the op name -> what it is
    "fbgemm": "FBGEMM embedding kernels (lookup + fused optimizer)",
    "addmm": "dense layers (matmul)", "mm": "dense layers (matmul)", "bmm": "interactions (batched matmul)",
    "Adam": "dense optimizer", "adam": "dense optimizer", "_foreach": "dense optimizer",
    "threshold": "activations", "relu": "activations", "dropout": "dropout", "bernoulli": "dropout",
    "cat": "concat / copies", "copy_": "concat / copies", "stack": "concat / copies", "to_padded": "jagged -> dense",
    "binary_cross_entropy": "loss", "jagged": "jagged -> dense", "all_reduce": "collectives", "sum": "reductions",
    "mul": "elementwise (mul, add, pow, ...)", "add": "elementwise (mul, add, pow, ...)",
    "pow": "elementwise (mul, add, pow, ...)", "index": "indexing / gathers", "gather": "indexing / gathers",
}


def op_groups(events, total: float) -> dict[str, float]:
    groups: dict[str, float] = {}
    for e in events:
        group = next((g for key, g in GROUPS.items() if key in e.key), "other")
        groups[group] = groups.get(group, 0.0) + e.self_cpu_time_total / total
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def profile_markdown(report: dict) -> str:
    lines = []
    for model, r in report["models"].items():
        phases = r["phases_seconds_per_step"]
        lines += [f"### {LABELS[model]} (full tables, synthetic Criteo 1M, batch {report['args']['batch_size']})", "",
                  f"Per step: {1e3 * phases['step']:.1f} ms in the training step, "
                  f"{1e3 * phases['wait_for_batch']:.2f} ms waiting for the next batch.", "",
                  "| Share of self CPU time | Group |", "|---:|---|"]
        lines += [f"| {100 * share:.1f}% | {group} |" for group, share in r["groups"].items()]
        lines += ["", "| Op | Self CPU ms / step | Share | Calls / step |", "|---|---:|---:|---:|"]
        lines += [f"| `{o['op']}` | {o['self_cpu_ms']:.2f} | {100 * o['share']:.1f}% | {o['calls_per_step']:.0f} |"
                  for o in r["top_ops"][:15]]
        lines.append("")
    lines += footer(report)
    return "\n".join(lines)


# --------------------------------------------------------------------------- report plumbing

def header(args, data_info: dict) -> dict:
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **git_state(),
            "command": shlex.join(["python", *sys.argv]), "machine": machine(), "args": vars(args),
            "data_info": data_info}


def footer(report: dict) -> list[str]:
    m = report["machine"]
    return ["", f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; torch {m['torch']} "
            f"({m['torch_threads']} threads), torchrec {m['torchrec']}, OMP_WAIT_POLICY={m['OMP_WAIT_POLICY']}; "
            f"load average {m['load_average_at_start'][0]:.2f} at start, {report['load_average_at_end'][0]:.2f} at "
            f"end. Date {report['date']}, commit {report['commit'][:10]}"
            f"{' (with uncommitted changes)' if report['uncommitted_changes'] else ''}.",
            f"Command: `{report['command']}`", ""]


def write(report: dict, part: str, markdown, plot) -> list[Path]:
    """Writes ``ctr_<part>.{json,md,png}``; returns their paths."""
    report["load_average_at_end"] = list(os.getloadavg())
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"ctr_{part}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    files = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    if plot is not None:
        plot(report, stem.with_suffix(".png"))
        files.append(stem.with_suffix(".png"))
    return files


def finish(report: dict, part: str, markdown, plot, tracker: Tracker) -> dict:
    files = write(report, part, markdown, plot)
    with tracker.start(f"summary-{part}", {"command": report["command"]}, tags={"benchmark": "ctr"}) as run:
        for path in files:
            run.log_artifact(path)
    print(markdown(report))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("frappe", "speed", "profile"))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument("--all-seed-budgets", nargs="*", type=float, default=list(BUDGETS),
                        help="budgets run with every seed (the others with the first seed only)")
    parser.add_argument("--all-seed-methods", nargs="*", default=list(ALL_SEED_METHODS), choices=list(METHODS),
                        help="methods run with every seed at --all-seed-budgets")
    parser.add_argument("--scales", nargs="+", default=list(SPEED_SCALES), choices=list(SPEED_SCALES))
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--profile-steps", type=int, default=20)
    parser.add_argument("--skip-deepctr", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tracker = Tracker(experiment="benchmark-ctr", root=ROOT)
    try:
        {"frappe": frappe, "speed": speed, "profile": profile}[args.part](args, tracker)
    finally:
        shutil.rmtree(CHECKPOINTS, ignore_errors=True)


if __name__ == "__main__":
    main()
