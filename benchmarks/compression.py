#!/usr/bin/env python
"""Embedding-compression benchmark: MF on ml100k (or a tuned config's data) with every compression method at 4 budgets.

Every method stores both MF tables (user and item, ``EmbeddingSettings.default``) at a fraction
``budget`` of the full float32 tables' bytes, for budgets 1/2, 1/4, 1/16 and 1/64. The model, data,
split, seed and training settings are the same for all (``model=mf_bpr``, composed through the real
Hydra config exactly like ``benchmarks/mf.py``); only ``embedding=`` changes.

Kinds of methods (``METHODS`` below; all run by default):

- **trained**: the compressed tables are trained from scratch with ``recsys.training.loop.fit``
  (hashing, double hashing, multi-hash, hash embedding, frequency hashing, quotient-remainder with
  the mult / concat / add combiners, compositional k=3, mixed dimension, GraphHash, low-rank factorized
  tables, TT-Rec tensor-train tables, and PQ with random codes as a baseline).
- **post-training**: the trained *full* MF tables (trained once, also the reference row) are
  compressed afterwards: product quantization by FAISS k-means (``product_quantization``, no
  fine-tuning; ``pq_finetune``: then ``--pq-finetune-epochs`` epochs of BPR on the codebooks, codes
  fixed) and the serving quantizations int8 / int4 / fp16 (fixed ratios, one point each).
- **vq**: differentiable VQ trained end to end, then each table is exported to product quantization;
  the exported model is what is evaluated and measured.

PQ and VQ use 4 subspaces where the budget allows it (the budget then picks the codewords), see
``pq_subspaces``. A budget a method cannot meet (its ``build`` raises ConfigError) is recorded as
infeasible; a crash is recorded with its traceback; neither stops the run.

For each (method, budget): bytes from ``task.memory()`` (summed over the tables: plain tables plus
id maps, codes, codebooks and combiner parameters), ratio to the full tables, Recall@20 and NDCG@20
on the test split (``recsys.training.loop.evaluate``), train seconds. Writes
benchmarks/results/compression.{json,md,png}; one MLflow run per (method, budget) in experiment
``benchmark-compression`` plus a ``summary`` run holding the three files.

    python benchmarks/compression.py                                   # everything
    python benchmarks/compression.py --budgets 0.25 0.0625 --methods full hashing --epochs 10

With ``--tuned <study>.yaml`` (written by ``pipelines.tune``) every run uses that study's data, model and settings
chosen on its validation split (early stopping on valid included), and the files are
``compression_<dataset>.{json,md,png}``; ``--item-bias`` gives every run (the full model too) MF's per-item bias,
whose bytes count against each budget. The issue-17 run on the LightGCN split of ML-1M:

    python benchmarks/compression.py --tuned data/bench_leaderboard/tuning/tuned/mf_sampled_softmax-ml1m_lightgcn.yaml \
        --item-bias --budgets 0.25 0.0625 0.015625
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/README.md, "Threads and a shared machine"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from benchmarks.mf import compose_cfg, data_info, fit_logged, fmt_bytes, machine, run_popularity  # noqa: E402
from pipelines.prepare import ensure_prepared  # noqa: E402
from recsys.errors import ConfigError  # noqa: E402
from recsys.evaluation import METRIC_DEFINITIONS  # noqa: E402
from recsys.tracking.mlflow_run import Tracker  # noqa: E402
from recsys.training.loop import evaluate  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DATASET, MODEL = "ml100k", "mf_bpr"  # --tuned sets both from a study's tuned config
TUNED: list[str] = []  # the tuned config's model and trainer settings, as overrides of every run (--tuned)
ITEM_BIAS = False  # --item-bias: every run (the full tables too) learns MF's per-item bias, counted in its bytes
BUDGETS = (1 / 2, 1 / 4, 1 / 16, 1 / 64)
EPOCHS = 20
FINETUNE_EPOCHS = 2  # codebook fine-tuning epochs of pq_finetune (product_quantization has none)
THREADS = 2
SEED = 0
K = 20
DIM = 64  # model.dim of the composed config (set by benchmark())
CHECKPOINTS = Path(tempfile.gettempdir()) / "bench-compression-checkpoints"  # removed at exit


# --------------------------------------------------------------------------- the methods

@dataclass(frozen=True)
class MethodDef:
    """How one method is run.

    Args:
        name: the method's key (CLI, JSON, MLflow).
        label: the name shown in the table and the plot.
        kind: ``full``, ``trained`` (fit from scratch), ``vq`` (fit, then export to PQ), ``post`` (PQ of
            the trained full tables) or ``serving`` (fixed-ratio quantization of the trained full tables).
        requires: ``module:name`` that must import for the method to run (else it is listed as missing).
        group: its ``conf/embedding`` group (trained and vq methods).
        params: ``embedding.default.*`` fields set besides the budget.
        fixed_ratio: the nominal ratio of a fixed-ratio method (serving quantization).
        overrides: other Hydra overrides of its runs.
    """

    name: str
    label: str
    kind: str
    requires: str | None = None
    group: str | None = None
    params: dict = field(default_factory=dict)
    fixed_ratio: float | None = None
    overrides: tuple[str, ...] = ()


EMB = "recsys.embeddings"
METHODS: dict[str, MethodDef] = {m.name: m for m in [
    MethodDef("full", "Full tables", "full"),
    MethodDef("hashing", "Hashing", "trained", f"{EMB}.hashing:Hashing", "hashing"),
    MethodDef("double_hashing", "Double hashing", "trained", f"{EMB}.hashing:DoubleHashing", "double_hashing"),
    MethodDef("multi_hash", "Multi-hash (k=2)", "trained", f"{EMB}.hashing:MultiHash", "multi_hash"),
    MethodDef("hash_embedding", "Hash embedding (k=2, importance weights)", "trained", f"{EMB}.hashing:MultiHash",
              "hash_embedding"),
    MethodDef("frequency_hashing", "Frequency hashing", "trained", f"{EMB}.hashing:FrequencyHashing",
              "frequency_hashing"),
    MethodDef("qr_mult", "Quotient-remainder (mult)", "trained", f"{EMB}.compositional:QuotientRemainder",
              "quotient_remainder", params={"collisions": None, "combiner": "mult"}),
    MethodDef("qr_concat", "Quotient-remainder (concat)", "trained", f"{EMB}.compositional:QuotientRemainder",
              "quotient_remainder", params={"collisions": None, "combiner": "concat"}),
    MethodDef("qr_add", "Quotient-remainder (add)", "trained", f"{EMB}.compositional:QuotientRemainder",
              "quotient_remainder", params={"collisions": None, "combiner": "add"}),
    MethodDef("compositional", "Compositional (k=3, mult)", "trained", f"{EMB}.compositional:Compositional",
              "compositional", params={"partitions": None, "parts": 3, "combiner": "mult"}),
    MethodDef("mixed_dim", "Mixed dimension (4 blocks, alpha 0.5)", "trained", f"{EMB}.mixed_dim:MixedDimension",
              "mixed_dim", params={"base_dim": None}),
    MethodDef("graph_hash", "GraphHash", "trained", f"{EMB}.graph_hash:GraphHash", "graph_hash",
              params={"rows": None}),
    MethodDef("low_rank", "Low-rank (N x r table, r x D projection)", "trained", f"{EMB}.low_rank:LowRank", "low_rank",
              params={"rank": None, "rank_multiple": 1},  # any rank (at 1/16 of D = 64, r = 3) ...
              overrides=("sharding=data_parallel",)),  # ... on the dense kernel: FBGEMM's fused ones need 4k widths
    MethodDef("tensor_train", "Tensor train (TT-Rec, 3 cores)", "trained", f"{EMB}.tensor_train:TensorTrain",
              "tensor_train", params={"rank": None}),
    MethodDef("product_quantization", "PQ (post-training k-means)", "post",
              f"{EMB}.quantization:ProductQuantization"),
    MethodDef("pq_finetune", "PQ (post-training k-means + codebook fine-tuning)", "post",
              f"{EMB}.quantization:ProductQuantization"),
    MethodDef("pq_random_codes", "PQ, random codes (codebooks trained)", "trained",
              f"{EMB}.quantization:ProductQuantization", "product_quantization",
              params={"subspaces": None, "codewords": None}),
    MethodDef("vq_e2e", "Differentiable VQ -> PQ export", "vq", f"{EMB}.quantization:DifferentiableVQ", "vq_e2e",
              params={"subspaces": None, "codewords": None}),
    MethodDef("int8", "int8 rows (post-training)", "serving", f"{EMB}.serving_quantization:quantize_tables",
              fixed_ratio=1 / 4),
    MethodDef("int4", "int4 rows (post-training)", "serving", f"{EMB}.serving_quantization:quantize_tables",
              fixed_ratio=1 / 8),
    MethodDef("fp16", "fp16 rows (post-training)", "serving", f"{EMB}.serving_quantization:quantize_tables",
              fixed_ratio=1 / 2),
]}
DEFAULT_METHODS = list(METHODS)


def available(method: MethodDef) -> str | None:
    """None when the method can run, else why not."""
    if method.requires is None:
        return None
    module, name = method.requires.split(":")
    try:
        getattr(importlib.import_module(module), name)
    except Exception as error:  # noqa: BLE001 - any import failure means "missing"
        return f"{type(error).__name__}: {error}"
    if method.group and not (ROOT / "conf" / "embedding" / f"{method.group}.yaml").exists():
        return f"conf/embedding/{method.group}.yaml does not exist"
    return None


def tables_budget(data, budget: float) -> float:
    """The fraction of the full user + item tables' bytes the compressed tables may use together so that the model's
    bytes (with the item bias, kept full, under ``--item-bias``) are ``budget`` x the full model's."""
    tables = (data.n_users + data.n_items) * DIM * 4
    bias = data.n_items * 4 if ITEM_BIAS else 0
    allowed = (budget * (tables + bias) - bias) / tables
    if allowed <= 0:
        raise ConfigError(f"budget {budget:g}: the item bias alone ({bias} bytes) takes all of it")
    return allowed


def embedding_overrides(method: MethodDef, budget: float | None) -> list[str]:
    """Hydra overrides selecting ``method`` with the user and item tables in ``budget`` of their full bytes together
    (``embedding.total_budget``: ``split_budget`` gives a table under its smallest layout more, the other less)."""
    if method.kind in ("full", "post", "serving"):
        return ["embedding=full"]
    fields = {"budget": budget, **method.params}
    return ([f"embedding={method.group}", f"embedding.total_budget={budget}", "embedding.full_below_rows=0",
             *method.overrides] + [f"++embedding.default.{k}={_hydra_value(v)}" for k, v in fields.items()])


def _hydra_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    return str(value)


# --------------------------------------------------------------------------- running

def common_overrides() -> list[str]:
    return [f"trainer.checkpoint_dir={CHECKPOINTS}", *TUNED, f"model.item_bias={str(ITEM_BIAS).lower()}"]


def tuned_settings(path: Path) -> tuple[str, str, list[str], int]:
    """Data, model, overrides (its ``model`` and ``trainer`` settings but the epochs) and epochs of a tuned config
    written by ``pipelines.tune`` (``<tune.output_dir>/tuned/<study>.yaml``)."""
    tuned = OmegaConf.load(path)
    groups = {k.split("/")[-1]: v for d in tuned.defaults if OmegaConf.is_dict(d) for k, v in d.items()}
    flat = [f"{section}.{key}={_hydra_value(value)}" for section in ("model", "trainer")
            for key, value in _leaves(OmegaConf.to_container(tuned.get(section, {})))]
    epochs = [o for o in flat if o.startswith("trainer.epochs=")]
    return groups["data"], groups["model"], [o for o in flat if o not in epochs], int(epochs[0].split("=")[1])


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def model_kwargs(cfg) -> dict:
    """cfg.model's arguments of MFRetrieval (nested configs instantiated), without ``embedding``."""
    out = {}
    for key, value in cfg.model.items():
        if key in ("name", "_target_", "embedding"):
            continue
        out[key] = instantiate(value) if OmegaConf.is_dict(value) and "_target_" in value else value
    return out


def build_task(cfg, data, embedding=None, epochs: int | None = None):
    """MFRetrieval of cfg.model; ``embedding`` (an EmbeddingSettings object) replaces cfg.embedding."""
    from recsys.training.mf import MFRetrieval
    torch.manual_seed(SEED)
    trainer = instantiate(cfg.trainer)
    if epochs is not None:
        trainer.epochs = epochs
    if embedding is None:
        embedding = instantiate(cfg.embedding, _convert_="object")
    assert cfg.model._target_ == "recsys.training.mf.MFRetrieval", cfg.model._target_
    return MFRetrieval(data, trainer, embedding=embedding, **model_kwargs(cfg)), trainer


def layout(task) -> dict:
    """Per table: the plain tables (suffix, rows, dim) and the bytes outside them."""
    return {name: {"plain_tables": [[t.suffix, t.rows, t.dim] for t in method.plain_tables()],
                   "extra_bytes": int(method.extra_memory()), "method": type(method).__name__}
            for name, method in task.embeddings.methods.items()}


def copy_bias(source, target) -> None:
    """``target``'s item bias set to ``source``'s (tables built from a trained model keep its bias)."""
    if source.item_bias is not None:
        with torch.no_grad():
            target.item_bias.copy_(source.item_bias)


def train(cfg, data, run, embedding=None, epochs: int | None = None, bias_from=None) -> tuple[object, dict]:
    """Builds the task (its item bias from ``bias_from``, if given) and trains it with ``fit`` (test metrics at the
    end); returns (task, record)."""
    began = time.perf_counter()
    task, trainer = build_task(cfg, data, embedding, epochs)
    if bias_from is not None:
        copy_bias(bias_from, task)
    build_seconds = time.perf_counter() - began
    began = time.perf_counter()
    metrics, seconds, _ = fit_logged(task, data, trainer, run)
    return task, {"epochs": len(seconds), "build_seconds": build_seconds, "train_seconds": float(np.sum(seconds)),
                  "fit_seconds": time.perf_counter() - began, "metrics": metrics,
                  "memory": {k: int(v) for k, v in task.memory().items()}, "layout": layout(task)}


def full_model(state: dict, data, epochs: int, run=None) -> tuple[object, dict]:
    """The full MF model, trained once and reused by the post-training methods."""
    if "full" not in state:
        state["cfg"] = compose_cfg(DATASET, MODEL, epochs, common_overrides() + ["embedding=full"])
        state["full"] = train(state["cfg"], data, run)
    return state["full"]


def trained_vectors(task) -> dict[str, torch.Tensor]:
    """(N, D) output of every id of each table (the rows themselves for a full table)."""
    from recsys.data.schemas import ITEM, USER
    return {USER: task.embed(USER, torch.arange(task.data.n_users)),
            ITEM: task.embed(ITEM, torch.arange(task.data.n_items))}


PQ_SUBSPACES = 4  # S of PQ and VQ (conf/embedding/{product_quantization,vq_e2e}.yaml) where the budget allows it


def pq_subspaces(tables: dict[str, tuple[int, int]], budget: float) -> int | None:
    """S of PQ / VQ at ``budget`` for tables {name: (N, D)}: PQ_SUBSPACES when every table fits the budget
    with it (the budget then picks K), else the library's choice (``plan_codebooks(subspaces=None)``: the most
    code bits), or, if that choice gives a sub-dimension D/S that is not a multiple of 4, the S with the most
    code bits among those whose D/S is: FBGEMM's fused kernel (every table runs on it under DMP) rejects
    tables whose dim is not a multiple of 4. None = let the library choose."""
    from recsys.embeddings.quantization import plan_codebooks

    def fits(s: int) -> float | None:  # code bits of the smallest table, None when S does not fit
        try:
            return min(s * math.log2(plan_codebooks(n, d, budget, s, name)[1]) for name, (n, d) in tables.items())
        except ConfigError:
            return None

    if all(d % PQ_SUBSPACES == 0 and (d // PQ_SUBSPACES) % 4 == 0 for _, d in tables.values()) \
            and fits(PQ_SUBSPACES) is not None:
        return PQ_SUBSPACES
    chosen = [plan_codebooks(n, d, budget, None, name)[0] for name, (n, d) in tables.items()]
    if len(set(chosen)) == 1 and all((d // chosen[0]) % 4 == 0 for _, d in tables.values()):
        return None
    dims = {d for _, d in tables.values()}
    options = [s for s in range(1, min(dims) + 1) if all(d % s == 0 and (d // s) % 4 == 0 for d in dims)]
    scored = [(bits, s) for s in options if (bits := fits(s)) is not None]
    if not scored:
        raise ConfigError(f"no number of subspaces with a sub-dimension divisible by 4 fits budget {budget}")
    return max(scored, key=lambda t: (t[0], -t[1]))[1]


def run_post_pq(state: dict, data, budget: float, epochs: int, run, finetune: int = 0) -> dict:
    """Post-training PQ: FAISS k-means codes + codebooks fitted to each trained full table (the budget picks
    K, see ``pq_subspaces`` for S), evaluated as is, then ``finetune`` epochs of BPR fine-tuning of the
    codebooks (codes fixed; same loss, optimizer and learning rate as the MF training)."""
    from recsys.embeddings.collection import EmbeddingSettings
    from recsys.embeddings.quantization import ProductQuantization
    full_task, full = full_model(state, data, epochs)
    began = time.perf_counter()
    vectors = trained_vectors(full_task)
    budget = tables_budget(data, budget)
    tables = {name: ProductQuantization.from_table(rows, subspaces=pq_subspaces({name: tuple(rows.shape)}, budget),
                                                   budget=budget, seed=SEED)
              for name, rows in vectors.items()}
    kmeans_seconds = time.perf_counter() - began
    settings = EmbeddingSettings(tables=tables)
    began = time.perf_counter()
    task, _ = build_task(state["cfg"], data, settings, epochs=finetune)
    copy_bias(full_task, task)
    before = evaluate(task, data, "test", [K])
    if finetune:
        task, record = train(state["cfg"], data, run, settings, epochs=finetune, bias_from=full_task)
    else:
        record = {"epochs": 0, "train_seconds": 0.0, "metrics": before,
                  "memory": {k: int(v) for k, v in task.memory().items()}, "layout": layout(task)}
    post = kmeans_seconds + record["train_seconds"]
    return {**record, "train_seconds": full["train_seconds"] + post, "post_seconds": post,
            "kmeans_seconds": kmeans_seconds, "finetune_epochs": finetune,
            **({"before_finetune": {f"recall@{K}": before[f"recall@{K}"], f"ndcg@{K}": before[f"ndcg@{K}"]}}
               if finetune else {}),
            "notes": {name: {"subspaces": pq.subspaces, "codewords": pq.codewords} for name, pq in tables.items()}}


def run_serving(state: dict, data, kind: str, epochs: int, run) -> dict:
    """int8 / int4 / fp16 rows: ``quantize_tables`` of an unsharded copy of the trained full tables."""
    from recsys.data.batching import jagged
    from recsys.data.schemas import ITEM, USER
    from recsys.embeddings.collection import CompressedEmbeddings, EmbeddingSettings
    from recsys.embeddings.serving_quantization import quantize_tables
    from recsys.models.mf import mf_specs
    full_task, full = full_model(state, data, epochs)
    vectors = trained_vectors(full_task)
    began = time.perf_counter()
    float_tables = CompressedEmbeddings(mf_specs(data.n_users, data.n_items, vectors[USER].shape[1]),
                                        EmbeddingSettings())
    with torch.no_grad():
        for name, rows in vectors.items():
            float_tables.bags.embedding_bags[f"{name}__full"].weight.copy_(rows)
    served = quantize_tables(float_tables, kind)
    post = time.perf_counter() - began
    with torch.no_grad():
        items = served(jagged([ITEM], [np.arange(data.n_items)]))[ITEM]
        error = {name: float((served(jagged([name], [np.arange(len(rows))]))[name] - rows).abs().max())
                 for name, rows in vectors.items()}

    bias = 0.0 if full_task.item_bias is None else full_task.item_bias.detach()[:, 0]

    def score(users: torch.Tensor) -> torch.Tensor:
        return served(jagged([USER], [users.numpy()]))[USER] @ items.T + bias

    metrics = evaluate(score, data, "test", [K])
    return {"epochs": full["epochs"], "train_seconds": full["train_seconds"] + post, "post_seconds": post,
            "metrics": metrics, "memory": {k: int(v) + (4 * data.n_items if ITEM_BIAS and k == "item" else 0)
                                           for k, v in served.memory().items()},
            "notes": {"max_abs_error": error}}


def run_vq(cfg, data, run) -> dict:
    """Differentiable VQ trained end to end; each table's ``export()`` (codes + codebooks, no query table)
    is loaded into a fresh MF task, which is what is evaluated and measured."""
    from recsys.embeddings.collection import EmbeddingSettings
    task, record = train(cfg, data, run)
    vectors = trained_vectors(task)
    methods = task.embeddings.methods
    usage = {name: methods[name].codebook_usage(vectors[name]) for name in vectors}
    exported = {name: methods[name].export(vectors[name]) for name in vectors}
    export_task, _ = build_task(cfg, data, EmbeddingSettings(tables=exported))
    copy_bias(task, export_task)
    metrics = evaluate(export_task, data, "test", [K])
    exported_vectors = trained_vectors(export_task)
    same = {name: float((exported_vectors[name] - vectors[name]).abs().max()) for name in vectors}
    return {**record, "metrics": metrics, "memory": {k: int(v) for k, v in export_task.memory().items()},
            "layout": layout(export_task),
            "training_memory": record["memory"], "training_metrics": record["metrics"],
            "notes": {"codebook_usage": usage, "max_abs_diff_export_vs_trained": same,
                      "subspaces_codewords": {n: [pq.subspaces, pq.codewords] for n, pq in exported.items()}}}


def run_one(method: MethodDef, budget: float | None, state: dict, data, epochs: int, run) -> dict:
    if method.kind == "serving":
        return run_serving(state, data, method.name, epochs, run)
    if method.kind == "post":
        return run_post_pq(state, data, budget, epochs, run, FINETUNE_EPOCHS if method.name == "pq_finetune" else 0)
    overrides = embedding_overrides(method, tables_budget(data, budget))
    if method.kind == "vq" or method.name == "pq_random_codes":
        sizes = {"user": (data.n_users, DIM), "item": (data.n_items, DIM)}
        subspaces = pq_subspaces(sizes, tables_budget(data, budget))
        overrides.append(f"++embedding.default.subspaces={_hydra_value(subspaces)}")
    cfg = compose_cfg(DATASET, MODEL, epochs, common_overrides() + overrides)
    if run is not None:
        run.log_dict(OmegaConf.to_container(cfg.embedding, resolve=True), "embedding_config.json")
    if method.kind == "vq":
        return run_vq(cfg, data, run)
    return train(cfg, data, run)[1]


# --------------------------------------------------------------------------- outputs

def budget_label(budget: float | None) -> str:
    if budget is None:
        return "fixed"
    if budget == 1:
        return "full"
    inverse = 1 / budget
    return f"1/{inverse:.0f}" if abs(inverse - round(inverse)) < 1e-9 else f"{budget:g}"


def git_state() -> dict:
    """The commit the benchmark ran at, and whether the library or configs had uncommitted changes."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted_changes": git("status", "--porcelain", "--", "recsys", "conf", "pipelines").splitlines()}


def ok(r: dict) -> bool:
    return "error" not in r and "infeasible" not in r


def markdown(report: dict) -> str:
    rows, budgets, full = report["rows"], report["settings"]["budgets"], report["full_bytes"]
    pop = report["popularity"]
    settings = report["settings"]
    lines = [f"{settings['model_name']} on {settings['dataset']}: Recall@{K} / NDCG@{K} on the test split, and the "
             f"measured bytes as a fraction of the full model's {report['full_bytes']:,} bytes ({fmt_bytes(full)}"
             f"{', the item bias included' if settings.get('item_bias') else ''}; the user and item tables share "
             f"each budget: embedding.total_budget). Settings: {settings.get('tuned') or 'the model config'}. "
             f"`!` = measured bytes above the budget; "
             f"`n/a` = the method cannot fit the budget (it raises a ConfigError). Full tables: Recall@{K} "
             f"{report['full'][f'recall@{K}']:.4f}, NDCG@{K} {report['full'][f'ndcg@{K}']:.4f}; popularity: "
             f"Recall@{K} {pop[f'recall@{K}']:.4f}, NDCG@{K} {pop[f'ndcg@{K}']:.4f}. Metric definitions: "
             f"{report['metric_definitions']}.", "",
             "| Method | " + " | ".join(f"budget {budget_label(b)}" for b in budgets) + " | fixed ratio |",
             "|---|" + "---:|" * (len(budgets) + 1)]
    by: dict[str, dict] = {}
    for r in rows:
        by.setdefault(r["method"], {})[r["budget"]] = r
    for name, cells in by.items():
        if name == "full":
            continue
        out = []
        for b in [*budgets, None]:
            r = cells.get(b)
            if r is None:
                out.append("")
            elif "error" in r:
                out.append("**error**")
            elif "infeasible" in r:
                out.append("n/a")
            else:
                flag = " !" if r.get("over_budget") else ""
                out.append(f"{r[f'recall@{K}']:.3f} / {r[f'ndcg@{K}']:.3f} ({r['ratio']:.3f}{flag})")
        lines.append(f"| {METHODS[name].label} | " + " | ".join(out) + " |")
    lines += ["", "| Method | Budget | Bytes | Ratio | Recall@20 | NDCG@20 | Train s | Notes |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        label = METHODS[r["method"]].label
        if "error" in r:
            lines.append(f"| {label} | {budget_label(r['budget'])} | | | | | | error: "
                         f"`{r['error'].strip().splitlines()[-1][:160]}` |")
            continue
        if "infeasible" in r:
            lines.append(f"| {label} | {budget_label(r['budget'])} | | | | | | infeasible: {r['infeasible'][:160]} |")
            continue
        notes = []
        if r.get("over_budget"):
            notes.append("**over budget**")
        if "before_finetune" in r:
            notes.append(f"k-means only: {r['before_finetune'][f'recall@{K}']:.4f} / "
                         f"{r['before_finetune'][f'ndcg@{K}']:.4f}; +{r['finetune_epochs']} fine-tuning epochs")
        if r.get("post_seconds") is not None:
            notes.append(f"{r['post_seconds']:.1f} s after the full model")
        if "training_metrics" in r:
            notes.append(f"VQ model before export: {r['training_metrics'][f'recall@{K}']:.4f}")
        lines.append(f"| {label} | {budget_label(r['budget'])} | {r['bytes']:,} | "
                     f"{r['ratio']:.4f} | {r[f'recall@{K}']:.4f} | {r[f'ndcg@{K}']:.4f} | {r['train_seconds']:.1f} | "
                     f"{'; '.join(notes)} |")
    if report["missing"]:
        lines += ["", "Missing (not run): " + "; ".join(f"`{n}` ({why})" for n, why in report["missing"].items())]
    m = report["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']} ({m['torch_threads']} threads), "
              f"OMP_WAIT_POLICY={m['OMP_WAIT_POLICY']}. Load average at start "
              f"{' / '.join(f'{x:.2f}' for x in m['load_average_at_start'])}, at end "
              f"{' / '.join(f'{x:.2f}' for x in report['load_average_at_end'])}. {report['date']}; "
              f"total {report['total_seconds'] / 60:.1f} min. Commit {report['git']['commit'][:10]}"
              f"{' with uncommitted library/config changes' if report['git']['uncommitted_changes'] else ''}."]
    return "\n".join(lines) + "\n"


STYLE = {  # method -> (colour, line style, marker); variants of one method share colour and marker
    "hashing": ("#4363d8", "-", "o"), "double_hashing": ("#000075", "--", "o"), "multi_hash": ("#42a5f5", ":", "o"),
    "hash_embedding": ("#469990", "-", "s"), "frequency_hashing": ("#3cb44b", "-", "v"),
    "qr_mult": ("#e6194b", "-", "^"), "qr_concat": ("#f58231", "-", "^"), "qr_add": ("#800000", "--", "^"),
    "compositional": ("#9a6324", "-", "D"), "compositional_init1": ("#9a6324", "--", "D"),
    "mixed_dim": ("#911eb4", "-", "P"), "graph_hash": ("#808000", "-", "X"),
    "low_rank": ("#008080", "-", "<"), "tensor_train": ("#aa6e28", "-", ">"),
    "product_quantization": ("#f032e6", "-", "*"), "pq_finetune": ("#f032e6", "--", "*"),
    "pq_random_codes": ("#f032e6", ":", "d"), "vq_e2e": ("#d4a017", "-", "h"),
    "int8": ("#404040", "", "o"), "int4": ("#404040", "", "s"), "fp16": ("#404040", "", "D"),
}


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(15, 8))
    full, pop = report["full"], report["popularity"]
    full_bytes = report["full_bytes"]
    ax.axhline(full[f"recall@{K}"], color="black", lw=1.2, ls="--",
               label=f"Full tables ({fmt_bytes(full_bytes)}, {full[f'recall@{K}']:.3f})")
    ax.axhline(pop[f"recall@{K}"], color="grey", lw=1.2, ls=":", label=f"Popularity ({pop[f'recall@{K}']:.3f})")
    ax.plot([full_bytes], [full[f"recall@{K}"]], "k*", ms=14)
    for b in report["settings"]["budgets"]:
        ax.axvline(b * full_bytes, color="#cccccc", lw=0.8, zorder=0)
        ax.annotate(f"budget {budget_label(b)}", (b * full_bytes, 1), xycoords=("data", "axes fraction"),
                    xytext=(2, -12), textcoords="offset points", fontsize=8, color="#777777")
    names = [n for n in dict.fromkeys(r["method"] for r in report["rows"]) if n != "full"]
    for name in names:
        rows = sorted((r for r in report["rows"] if r["method"] == name and ok(r)), key=lambda r: r["bytes"])
        if not rows:
            continue
        colour, line, marker = STYLE.get(name, ("#888888", "-", "o"))
        x, y = [r["bytes"] for r in rows], [r[f"recall@{K}"] for r in rows]
        if METHODS[name].kind == "serving":
            ax.plot(x, y, ls="none", marker=marker, ms=11, mfc="white", mec=colour, mew=2, label=METHODS[name].label)
            ax.annotate(name, (x[0], y[0]), xytext=(0, -18), textcoords="offset points", ha="center", fontsize=8)
        else:
            ax.plot(x, y, color=colour, ls=line, marker=marker, ms=7, lw=1.6, label=METHODS[name].label)
    ax.set_xscale("log")
    ax.set_xlabel("bytes of the user + item tables as measured by task.memory() (log scale)")
    ax.set_ylabel(f"Recall@{K} (test)")
    ax.set_ylim(0, full[f"recall@{K}"] * 1.15)
    ax.set_xlim(report["full_bytes"] * min(report["settings"]["budgets"]) / 2, report["full_bytes"] * 1.6)
    ax.set_title(f"{report['settings']['model_name']} on {report['settings']['dataset']}, both tables compressed: "
                 f"memory vs Recall@{K} "
                 f"({report['settings']['epochs']} epochs, dim {report['settings']['dim']}, seed {SEED})")
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- entry point

def benchmark(args) -> dict:
    began_all = time.perf_counter()
    tracker = Tracker(experiment="benchmark-compression", root=str(ROOT))
    methods, missing = [], {}
    for name in args.methods:
        why = available(METHODS[name])
        (missing.__setitem__(name, why) if why else methods.append(METHODS[name]))
    for name, why in missing.items():
        print(f"missing: {name}: {why}", flush=True)
    global DIM
    cfg = compose_cfg(DATASET, MODEL, args.epochs, common_overrides())
    DIM = cfg.model.dim
    data = ensure_prepared(cfg.data)
    info = data_info(data)
    print(f"[{DATASET}] {info['n_users']} users x {info['n_items']} items, {info['train']} train / "
          f"{info['test']} test interactions", flush=True)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=False)
    report = {"machine": machine(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "git": git_state(),
              "settings": {"dataset": DATASET, "model_name": MODEL, "tuned": args.tuned and str(args.tuned),
                           "item_bias": ITEM_BIAS, "budgets": list(args.budgets), "methods": [m.name for m in methods],
                           "epochs": args.epochs, "dim": cfg.model.dim, "seed": SEED, "k": K, "threads": THREADS,
                           "pq_finetune_epochs": args.pq_finetune_epochs, "model": model_cfg,
                           "trainer": OmegaConf.to_container(cfg.trainer, resolve=True),
                           "data": info | {"data_config": OmegaConf.to_container(cfg.data, resolve=True)}},
              "metric_definitions": METRIC_DEFINITIONS, "missing": missing, "rows": []}
    state: dict = {}
    with tracker.start("popularity", {"method": "popularity", "dataset": DATASET},
                       tags={"benchmark": "compression", "invocation": report["date"], "method": "popularity"}) as run:
        pop = run_popularity(data)
        run.log_metrics(pop["metrics"], prefix="test_")
    report["popularity"] = {f"recall@{K}": pop["metrics"][f"recall@{K}"], f"ndcg@{K}": pop["metrics"][f"ndcg@{K}"]}
    # the reference: full tables (trained first, so post-training methods can reuse them)
    with tracker.start("full", {"method": "full", "budget": 1.0, "epochs": args.epochs, "seed": SEED},
                       tags={"benchmark": "compression", "invocation": report["date"], "method": "full"}) as run:
        _, full = full_model(state, data, args.epochs, run)
        full_bytes = sum(full["memory"].values())
        run.log_metrics(full["metrics"], prefix="test_")
        run.log_metrics({"bytes": full_bytes, "ratio": 1.0, "train_seconds": full["train_seconds"]})
    report["full_bytes"] = full_bytes
    report["full"] = {f"recall@{K}": full["metrics"][f"recall@{K}"], f"ndcg@{K}": full["metrics"][f"ndcg@{K}"],
                      "train_seconds": full["train_seconds"], "memory": full["memory"]}
    report["rows"].append(row(METHODS["full"], 1.0, full, full_bytes, None))
    print(f"full: {fmt_bytes(full_bytes)} recall@{K} {full['metrics'][f'recall@{K}']:.4f} "
          f"({full['train_seconds']:.1f}s)", flush=True)
    for method in methods:
        if method.kind == "full":
            continue
        budgets = [None] if method.kind == "serving" else args.budgets
        for budget in budgets:
            params = {"method": method.name, "budget": budget if budget is not None else method.fixed_ratio,
                      "epochs": args.epochs, "seed": SEED, "kind": method.kind, **method.params}
            with tracker.start(f"{method.name}-{budget_label(budget)}", params,
                               tags={"benchmark": "compression", "invocation": report["date"], "method": method.name}) as run:
                try:
                    began = time.perf_counter()
                    record = run_one(method, budget, state, data, args.epochs, run)
                    record["wall_seconds"] = time.perf_counter() - began
                except ConfigError as error:  # the method cannot meet this budget (or rejects its settings)
                    print(f"{method.name} @ {budget_label(budget)} infeasible: {error}", flush=True)
                    run.set_tags({"infeasible": str(error)[:250]})
                    report["rows"].append({"method": method.name, "label": method.label, "budget": budget,
                                           "infeasible": str(error)})
                    continue
                except Exception:  # noqa: BLE001 - a broken method is reported, not fatal
                    error = traceback.format_exc()
                    print(f"{method.name} @ {budget_label(budget)} FAILED:\n{error}", flush=True)
                    run.set_tags({"error": error.strip().splitlines()[-1][:250]})
                    report["rows"].append({"method": method.name, "label": method.label, "budget": budget,
                                           "error": error})
                    continue
                r = row(method, budget, record, full_bytes, budget)
                run.log_metrics(record["metrics"], prefix="test_")
                run.log_metrics({k: r[k] for k in ("bytes", "ratio", "train_seconds")} |
                                {f"bytes_{t}": b for t, b in record["memory"].items()})
                run.set_tags({"over_budget": str(r["over_budget"])})
                r["mlflow_run_id"] = run.id
            report["rows"].append(r)
            write(report, began_all)  # after every row: a stopped run keeps what it measured
            print(f"{method.name:<22} {budget_label(budget):>5}  {fmt_bytes(r['bytes']):>10} x{r['ratio']:.4f}"
                  f"{' OVER BUDGET' if r['over_budget'] else ''}  recall@{K} {r[f'recall@{K}']:.4f}  "
                  f"ndcg@{K} {r[f'ndcg@{K}']:.4f}  train {r['train_seconds']:.1f}s", flush=True)
    files = write(report, began_all)
    with tracker.start("summary", {"command": report["command"], "budgets": list(args.budgets),
                                   "methods": [m.name for m in methods], "epochs": args.epochs},
                       tags={"benchmark": "compression", "invocation": report["date"]}) as run:
        for path in files:
            run.log_artifact(path)
    print(markdown(report))
    return report


def write(report: dict, began: float) -> list[Path]:
    """Writes the report's json, md and png (``compression[_<dataset>]``); returns their paths."""
    report["load_average_at_end"] = list(os.getloadavg())
    report["total_seconds"] = time.perf_counter() - began
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "compression" if DATASET == "ml100k" else f"compression_{DATASET}"
    files = [RESULTS / f"{stem}.{ext}" for ext in ("json", "md", "png")]
    files[0].write_text(json.dumps(report, indent=2, default=str) + "\n")
    files[1].write_text(markdown(report))
    plot(report, files[2])
    return files


def row(method: MethodDef, budget: float | None, record: dict, full_bytes: int, limit: float | None) -> dict:
    measured = int(sum(record["memory"].values()))
    limit = limit if limit is not None else method.fixed_ratio
    out = {"method": method.name, "label": method.label, "kind": method.kind, "budget": budget,
           "bytes": measured, "ratio": measured / full_bytes, "memory": record["memory"],
           f"recall@{K}": record["metrics"][f"recall@{K}"], f"ndcg@{K}": record["metrics"][f"ndcg@{K}"],
           "train_seconds": record["train_seconds"],
           "over_budget": bool(limit is not None and method.kind != "serving" and measured > limit * full_bytes),
           "metrics": record["metrics"]}
    for key in ("epochs", "fit_seconds", "build_seconds", "wall_seconds", "post_seconds", "kmeans_seconds",
                "finetune_epochs", "before_finetune", "training_metrics", "training_memory", "layout", "notes"):
        if key in record:
            out[key] = record[key]
    return out


def main(argv: list[str] | None = None) -> None:
    global FINETUNE_EPOCHS, DATASET, MODEL, TUNED, ITEM_BIAS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS),
                        help="fractions of the full tables' bytes (default 1/2 1/4 1/16 1/64)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"MF epochs of every method (default: the tuned config's, else {EPOCHS})")
    parser.add_argument("--tuned", type=Path, default=None,
                        help="a tuned config of pipelines.tune (<tune.output_dir>/tuned/<study>.yaml): its data, model "
                             "and settings (chosen on valid) for every run, instead of MF-BPR on ml100k")
    parser.add_argument("--item-bias", action="store_true",
                        help="every run learns MF's per-item bias (kept full; its bytes count against the budget)")
    parser.add_argument("--pq-finetune-epochs", type=int, default=FINETUNE_EPOCHS,
                        help=f"codebook fine-tuning epochs of pq_finetune (default {FINETUNE_EPOCHS})")
    args = parser.parse_args(argv)
    FINETUNE_EPOCHS, ITEM_BIAS = args.pq_finetune_epochs, args.item_bias
    if args.tuned is not None:
        DATASET, MODEL, TUNED, tuned_epochs = tuned_settings(args.tuned)
        args.epochs = args.epochs or tuned_epochs
    args.epochs = args.epochs or EPOCHS
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    try:
        benchmark(args)
    finally:
        shutil.rmtree(CHECKPOINTS, ignore_errors=True)


if __name__ == "__main__":
    main()
