"""CTR training on 2 gloo ranks == one process: after one CTRTask training step, the same parameters and predictions.

Each rank trains on a batch of B rows, the single process on one batch of 2B rows, the same rows (the train split
holds exactly 2B rows, shuffled with the same seed). Every parameter steps with the mean over ranks of the ranks'
gradients (``recsys.training.distributed``), and the loss is a per-row mean, so the step is the same.
Optimizers whose state splits exactly under the plan: rowwise_adagrad for whole tables (table_wise), adagrad
(element-wise) for column shards, sgd for data-parallel tables (the dense kernel); sgd for the dense layers.
"""

from __future__ import annotations

from functools import partial

import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir

from pipelines.prepare import ensure_prepared
from recsys.data.batching import CTRBatcher, ParquetBatches
from recsys.data.dataset import PreparedData
from recsys.embeddings.collection import EmbeddingSettings
from recsys.embeddings.compositional import QuotientRemainder
from recsys.embeddings.full import Full
from recsys.embeddings.memory import TABLE_KEY
from recsys.models.ctr import DCNv2, DLRM, Cross, DeepFM
from recsys.training.ctr import CTRTask, DenseOptimizer
from recsys.training.distributed import ShardingConfig, TableOptimizer, load_unsharded, sharding_types, unsharded
from recsys.training.loop import TrainerConfig
from tests.conftest import ROOT, SHARED_DATA
from tests.distributed import run_ranks

B = 32  # rows per rank; the train split holds 2B
MODELS = {"dlrm": partial(DLRM, bottom=[8], top=[16]), "dcnv2": partial(DCNv2, cross=Cross(layers=2), deep=[16]),
          "dcnv2_low_rank_parallel": partial(DCNv2, cross=Cross(layers=2, low_rank=3, structure="parallel"), deep=[16]),
          "deepfm": partial(DeepFM, deep=[16])}
PLANS = {"table_wise": "rowwise_adagrad", "column_wise": "adagrad", "data_parallel": "sgd"}
METHODS = {"full": Full(), "quotient_remainder": QuotientRemainder(collisions=4)}  # QR (mult): per-id lookups
# TorchRec 1.8 fails on a data-parallel unpooled table (EmbeddingCollection) read by a multi-valued feature
# (``tags`` here): its output splits assume one id per row. Pooled tables (full) run data-parallel.
CASES = [(m, p, c) for m in MODELS for p in PLANS for c in METHODS if (p, c) != ("data_parallel", "quotient_remainder")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> PreparedData:
    """Tiny planted CTR data (4 dense, 6 single-valued fields and a multi-valued one); train cut to 2B rows."""
    root = tmp_path_factory.mktemp("ctr_sharding")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="prepare", overrides=[
            f"paths.root={root}", f"paths.shared_data={SHARED_DATA}", "data=synthetic_ctr",
            "data.source.generator.n_rows=1000", "data.source.generator.chunk_rows=1000"])
    prepared = ensure_prepared(cfg.data)
    train = prepared.path("train")
    pq.write_table(pq.read_table(train).slice(0, 2 * B), train)
    return prepared


def _task(data: PreparedData, case: tuple[str, str, str], rows: int, distributed: bool) -> CTRTask:
    model, plan, method = case
    trainer = TrainerConfig(epochs=1, batch_size=rows, progress=False, distributed=distributed)
    return CTRTask(data, trainer, MODELS[model], dim=8, table_optimizer=TableOptimizer(PLANS[plan], lr=0.3),
                   dense_optimizer=DenseOptimizer("sgd", lr=0.2), first_order="full" if model == "deepfm" else "none",
                   compress_min_rows=0, embedding=EmbeddingSettings(default=METHODS[method]),
                   sharding=ShardingConfig({"default": [plan]}, column_shard_dim=4))


def _probe(data: PreparedData):
    return next(iter(ParquetBatches(data.path("test"), CTRBatcher(data.ctr_schema), 50)))


def _step_on_ranks(rank: int, world: int, root: str, jobs: str) -> dict:
    """For each (case, initial state) saved in ``jobs``: shard, load the state, train this rank's batch, return state
    and predictions."""
    data, results = PreparedData.open(root), {}
    for case, initial in torch.load(jobs, weights_only=True):
        task = _task(data, case, B, distributed=True)
        load_unsharded(task.model, initial)
        loss = task.train_epoch(0, None)["loss"]
        results[case] = {"state": unsharded(task.model.state_dict()), "predictions": task.predict(_probe(data)),
                         "loss": loss, "plan": sorted(set(sharding_types(task.model).values()))}
    return results


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """The single-process references and one 2-rank run of every case (the ranks start once; the initial states
    travel in a file: passed as arguments, their tensors would each hold a file descriptor)."""
    references, jobs = {}, []
    for case in CASES:
        task = _task(data, case, 2 * B, distributed=False)
        initial = unsharded(task.model.state_dict())
        loss = task.train_epoch(0, None)["loss"]
        references[case] = {"state": unsharded(task.model.state_dict()), "predictions": task.predict(_probe(data)),
                            "loss": loss, "initial": initial}
        jobs.append((case, initial))
    path = tmp_path_factory.mktemp("ctr_jobs") / "jobs.pt"
    torch.save(jobs, path)
    return references, run_ranks(_step_on_ranks, str(data.root), str(path), timeout=400)


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_two_ranks_step_like_one_process(case, runs):
    references, ranks = runs
    expected = references[case]
    moved = [k for k, v in expected["state"].items() if not torch.equal(v, expected["initial"][k])]
    assert any(TABLE_KEY.search(k) for k in moved), "the step must move the tables"
    for rank, result in enumerate(ranks):
        got = result[case]
        assert got["plan"] == [case[1]]
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)  # mean over both ranks' rows
        torch.testing.assert_close(got["predictions"], expected["predictions"], rtol=1e-5, atol=1e-6)
        assert set(got["state"]) == set(expected["state"])
        for key, value in expected["state"].items():
            torch.testing.assert_close(got["state"][key], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{case} rank {rank} {key}: {m}")
