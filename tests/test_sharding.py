"""Sharding on 2 gloo ranks: sharded == unsharded (forward and one optimizer step) for every
compression method and plan, sharded checkpoints across world sizes, the sharding config, the
launch checks, and a torchrun end-to-end run.

Gradients over ranks (see ``recsys.training.distributed``): every parameter, model-parallel
table, data-parallel table or dense, steps with the mean over ranks of the ranks' gradients
(TorchRec divides the all-to-all gradients by the world size, DDP averages). The single-process
reference runs both ranks' batches and steps with half the summed gradient.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
import traceback

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.sparse.jagged_tensor import JaggedTensor

from recsys.embeddings.collection import CompressedEmbeddings, EmbeddingSettings
from recsys.embeddings.memory import TABLE_KEY
from recsys.embeddings.spec import TableSpec
from recsys.errors import CheckpointError, ConfigError
from recsys.training import checkpoint
from recsys.training import distributed
from recsys.training.distributed import (ShardingConfig, TableOptimizer, combined_optimizer, load_unsharded,
                                         rank_share, shard, sharding_types, unsharded)
from tests.conftest import ROOT, SHARED_DATA
from tests.distributed import RankError, run_ranks
from tests.embedding_contract import D, batch, specs, stats

WORLD = 2
LR_TABLE, LR_DENSE = 0.5, 0.1
COLUMN_SHARD = 4  # the D = 8 table splits into two column shards, one per rank

# Methods checked for sharded == unsharded: (id, module, Compression class, keyword arguments),
# at the contract suite's table size (N = 64, D = 8). A method that does not import is skipped.
METHODS = [
    ("full", "recsys.embeddings.full", "Full", {}),
    ("graph_hash", "recsys.embeddings.graph_hash", "GraphHash", {}),  # the contract's stats carry 8 clusters
    ("hashing", "recsys.embeddings.hashing", "Hashing", {"rows": 16}),
    ("double_hashing", "recsys.embeddings.hashing", "DoubleHashing", {"rows": 16, "seed": 3}),
    ("multi_hash_importance", "recsys.embeddings.hashing", "MultiHash", {"k": 2, "rows": 8, "importance": True}),
    ("frequency_hashing", "recsys.embeddings.hashing", "FrequencyHashing", {"private": 8, "rows": 8}),
    ("quotient_remainder_mult", "recsys.embeddings.compositional", "QuotientRemainder",
     {"collisions": 8, "combiner": "mult"}),
    ("compositional_concat", "recsys.embeddings.compositional", "Compositional",  # widths 4 + 4: FBGEMM needs
     {"partitions": [8, 8], "combiner": "concat"}),                             # multiples of 4
    ("mixed_dim", "recsys.embeddings.mixed_dim", "MixedDimension", {"blocks": 2, "alpha": 0.5}),
    ("low_rank", "recsys.embeddings.low_rank", "LowRank", {"rank": 4}),  # a 64 x 4 table + a 4 x 8 projection
    ("tensor_train", "recsys.embeddings.tensor_train", "TensorTrain", {"rank": 4}),  # cores 4 x 8, 4 x 32, 4 x 8
    ("product_quantization", "recsys.embeddings.quantization", "ProductQuantization",
     {"subspaces": 2, "codewords": 16}),
    ("vq_e2e", "recsys.embeddings.quantization", "DifferentiableVQ",  # its usage counts and `calls` cover
     {"subspaces": 2, "codewords": 16}),                               # every rank's batch
]
PLANS = {True: ["table_wise", "column_wise", "table_column_wise", "data_parallel"],  # pooled tables (EBC)
         False: ["table_wise", "column_wise"]}  # per-id tables (EC); data_parallel is rejected for shared tables


def _compression(module: str, name: str, kwargs: dict):
    return getattr(importlib.import_module(module), name)(**kwargs)


def _available(method) -> str | None:
    """None when the method builds, else why not."""
    try:
        _compression(*method[1:]).build(specs()[0], stats()["item"])
    except (ImportError, AttributeError) as error:
        return f"{method[1]}.{method[2]} is not available: {error}"
    return None


def _reference(method, pooling: str) -> CompressedEmbeddings:
    torch.manual_seed(0)
    return CompressedEmbeddings(specs(pooling), EmbeddingSettings(default=_compression(*method[1:])), stats())


def _dense(out: dict) -> dict[str, torch.Tensor]:
    return {k: v.values() if isinstance(v, JaggedTensor) else v for k, v in out.items()}


def _loss(out: dict) -> torch.Tensor:
    """Sums over rows, so the loss of two batches is the sum of their losses."""
    return sum(v.pow(2).sum() + v.sum() for v in _dense(out).values())


def _sharded(method, pooling: str, types: list[str], optimizer: TableOptimizer):
    emb = CompressedEmbeddings(specs(pooling), EmbeddingSettings(default=_compression(*method[1:])), stats(),
                               device=torch.device("meta"))
    optimizer.apply(emb)
    return shard(emb, ShardingConfig({"default": types}, column_shard_dim=COLUMN_SHARD)), emb


def _poolings(method) -> list[str]:
    """The poolings the method builds unsharded (the contract suite reports the others)."""
    found = []
    for pooling in ("sum", "none"):
        try:
            _reference(method, pooling)
            found.append(pooling)
        except Exception:
            pass
    return found


def _cases(method) -> list[tuple[str, str]]:
    additive = _compression(*method[1:]).build(specs()[0], stats()["item"]).additive
    return [(pooling, kind) for pooling in _poolings(method) for kind in PLANS[additive and pooling == "sum"]]


def _equivalence_ranks(rank: int, world: int, jobs: list) -> dict:
    """For each (method, cases, reference states): shard, copy the reference weights in, run this
    rank's batch forward and backward, step; returns outputs, full parameters and the plan."""
    results = {}
    for method, cases, references in jobs:
        try:
            for pooling, kind in cases:
                sgd = TableOptimizer("sgd", lr=LR_TABLE)
                model, emb = _sharded(method, pooling, [kind], sgd)
                load_unsharded(model, references[pooling])
                optimizer = combined_optimizer(model, sgd, dense=torch.optim.SGD, lr=LR_DENSE)
                out = model(batch(rank))
                (_loss(out) + (emb.auxiliary_loss() or 0)).backward()
                optimizer.step()
                optimizer.zero_grad()
                state = model.state_dict()
                shards = {k: len(v.local_shards()) for k, v in state.items() if hasattr(v, "local_shards")}
                results[(method[0], pooling, kind)] = {"out": {k: v.detach() for k, v in _dense(out).items()},
                                                       "state": unsharded(state), "plan": sharding_types(model),
                                                       "local_shards": shards}
        except Exception:  # reported by the method's test; the other methods still run
            results[method[0]] = traceback.format_exc()
    return results


def _reference_step(method, pooling: str) -> tuple[list[dict], dict]:
    """Outputs of the unsharded model on each rank's batch, and its state after one SGD step
    on the mean of the ranks' gradients (as DMP combines them)."""
    model = _reference(method, pooling)
    outs = []
    for rank in range(WORLD):
        out = model(batch(rank))
        (_loss(out) + (model.auxiliary_loss() or 0)).backward()
        outs.append({k: v.detach() for k, v in _dense(out).items()})
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.grad is not None:
                parameter -= (LR_TABLE if TABLE_KEY.search(name) else LR_DENSE) * parameter.grad / WORLD
    return outs, model.state_dict()


@pytest.fixture(scope="module")
def equivalence_runs():
    """One 2-rank run that shards every available method under every plan (ranks start once)."""
    jobs = [(m, _cases(m), {p: _reference(m, p).state_dict() for p in _poolings(m)})
            for m in METHODS if _available(m) is None]
    began = time.perf_counter()
    results = run_ranks(_equivalence_ranks, jobs, timeout=400)
    return results, time.perf_counter() - began


@pytest.mark.parametrize("method", METHODS, ids=[m[0] for m in METHODS])
def test_every_plan_matches_a_single_process(method, equivalence_runs):
    if reason := _available(method):
        pytest.skip(reason)
    results, _ = equivalence_runs
    for rank, result in enumerate(results):
        if method[0] in result:
            pytest.fail(f"rank {rank} failed on {method[0]}:\n{result[method[0]]}")
    for pooling, kind in _cases(method):
        outs, expected = _reference_step(method, pooling)
        case = f"{method[0]} pooling={pooling} {kind}"
        if method[0] == "full" and kind != "data_parallel":  # the table is whole on one rank, or split over both
            shards = sorted(sum(r[(method[0], pooling, kind)]["local_shards"].values()) for r in results)
            assert shards == ([0, 1] if kind == "table_wise" else [1, 1]), (case, shards)
        for rank, result in enumerate(results):
            got = result[(method[0], pooling, kind)]
            assert set(got["plan"].values()) == {kind}, (case, got["plan"])
            for feature, value in outs[rank].items():
                torch.testing.assert_close(got["out"][feature], value, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{case} rank {rank} output {feature}: {m}")
            assert set(got["state"]) == set(expected), case
            for key, value in expected.items():
                torch.testing.assert_close(got["state"][key], value, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{case} rank {rank} {key} after one step: {m}")


# --- checkpoints across world sizes -------------------------------------------------------------

ADAGRAD = TableOptimizer("adagrad", lr=0.1)  # element-wise state: exact under any column split


def _trainable(kind: str):
    emb = CompressedEmbeddings(specs("sum"), device=torch.device("meta"))
    ADAGRAD.apply(emb)
    model = shard(emb, ShardingConfig({"default": [kind]}, column_shard_dim=COLUMN_SHARD))
    return model, combined_optimizer(model, ADAGRAD)


def _merged(kjts: list[KeyedJaggedTensor]) -> KeyedJaggedTensor:
    """The batches' rows one after the other, as one batch."""
    parts = [k.to_dict() for k in kjts]
    keys = kjts[0].keys()
    return KeyedJaggedTensor.from_lengths_sync(keys, torch.cat([p[k].values() for k in keys for p in parts]),
                                               torch.cat([p[k].lengths() for k in keys for p in parts]))


def _step(model, optimizer, rank: int, world: int) -> None:
    """One step on the global batch [batch(0), batch(1)], split over the ranks; the per-row mean
    loss makes 2 ranks with a batch each equal 1 rank with both."""
    kjt = batch(rank) if world == 2 else _merged([batch(0), batch(1)])
    (_loss(model(kjt)) / kjt.stride()).backward()
    optimizer.step()
    optimizer.zero_grad()


def _snapshot(model, optimizer) -> dict:
    with torch.no_grad():
        out = model(batch(7))
    return {"eval": out["item"], "model": unsharded(model.state_dict()),
            "optimizer": unsharded(optimizer.state_dict()["state"])}


def _save_on_two_ranks(rank: int, world: int, directory: str, initial: dict) -> dict:
    model, optimizer = _trainable("table_wise")
    load_unsharded(model, initial)
    _step(model, optimizer, rank, world)
    checkpoint.save(directory, 0, {"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    saved = _snapshot(model, optimizer)
    _step(model, optimizer, rank, world)
    return {"saved": saved, "next": _snapshot(model, optimizer)}


def _load_on_two_ranks(rank: int, world: int, path: str) -> dict:
    model, optimizer = _trainable("column_wise")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    checkpoint.load(path, state)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return _snapshot(model, optimizer)


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert set(a) == set(b), what
    for key in a:
        if isinstance(a[key], dict):
            _assert_same(a[key], b[key], f"{what}/{key}")
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}/{key}: {m}")


def test_checkpoints_move_between_two_ranks_and_one_process(tmp_path):
    torch.manual_seed(0)
    initial = CompressedEmbeddings(specs("sum")).state_dict()
    on_two = run_ranks(_save_on_two_ranks, str(tmp_path / "two"), initial)
    info = checkpoint.latest(tmp_path / "two")
    assert info["epoch"] == 0
    _assert_same(on_two[0]["saved"], on_two[1]["saved"], "ranks agree")

    # 2 ranks -> a plain, unsharded module in this process
    plain = CompressedEmbeddings(specs("sum"))
    checkpoint.load_module(info["path"], plain)
    torch.testing.assert_close(plain(batch(7))["item"], on_two[0]["saved"]["eval"])

    # 2 ranks (table-wise) -> 1 process (column-wise): same model, same optimizer state, so the
    # next step lands where the 2 ranks' next step did
    model, optimizer = _trainable("column_wise")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    checkpoint.load(info["path"], state)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _assert_same(_snapshot(model, optimizer), on_two[0]["saved"], "loaded on 1 process")
    _step(model, optimizer, 0, 1)
    one = _snapshot(model, optimizer)
    _assert_same(one, on_two[0]["next"], "1 process after the next step")

    # 1 process -> 2 ranks (column-wise)
    checkpoint.save(tmp_path / "one", 1, {"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    loaded = run_ranks(_load_on_two_ranks, str(checkpoint.latest(tmp_path / "one")["path"]))
    for rank in range(WORLD):
        _assert_same(loaded[rank], one, f"rank {rank} loaded the 1-process checkpoint")


def test_loading_into_a_different_model_names_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    checkpoint.save(tmp_path, 0, {"model": CompressedEmbeddings(specs("sum")).state_dict()})
    wider = CompressedEmbeddings([TableSpec("item", 64, 2 * D, ("item", "neg_item"))])
    with pytest.raises(CheckpointError, match=r"epoch_0000: cannot load checkpoint into this model: rank 0: "
                                              r"ValueError: Size mismatch between saved torch.Size\(\[64, 8\]\) and "
                                              r"current: torch.Size\(\[64, 16\]\)"):
        checkpoint.load_module(tmp_path / "epoch_0000", wider)


# --- the sharding config ------------------------------------------------------------------------

def _tables() -> nn.Module:
    """Two collections: pooled item__a, item__b (one logical table, two plain ones) and user__full,
    and an unpooled seq__full read by two features."""
    module = nn.Module()
    module.bags = EmbeddingBagCollection([EmbeddingBagConfig(name=n, num_embeddings=16, embedding_dim=8,
                                                             feature_names=[f"{n}_f"])
                                          for n in ("item__a", "item__b", "user__full")], device=torch.device("meta"))
    module.seqs = EmbeddingCollection([EmbeddingConfig(name="seq__full", num_embeddings=16, embedding_dim=8,
                                                       feature_names=["s1", "s2"])], device=torch.device("meta"))
    return module


def test_logical_table_names_apply_to_all_their_plain_tables():
    constraints = distributed._constraints(_tables(), ShardingConfig(
        {"default": ["table_wise", "column_wise", "table_column_wise"], "item": ["column_wise"],
         "item__b": ["table_wise"]}, column_shard_dim=4))
    assert constraints["item__a"].sharding_types == ["column_wise"]
    assert constraints["item__b"].sharding_types == ["table_wise"]  # the plain name wins over the logical one
    assert constraints["user__full"].sharding_types == ["table_wise", "column_wise", "table_column_wise"]
    assert constraints["seq__full"].sharding_types == ["table_wise", "column_wise"]  # TWCW is pooled-only
    assert {c.compute_kernels[0] for c in constraints.values()} == {"fused"}
    assert constraints["item__a"].min_partition == 4
    dp = distributed._constraints(_tables(), ShardingConfig({"default": ["table_wise"], "item": "data_parallel"}))
    assert dp["item__a"].sharding_types == ["data_parallel"] and dp["item__a"].compute_kernels == ["dense"]


@pytest.mark.parametrize("types, message", [
    ({"default": ["row_wise"]}, r"sharding.sharding_types.default: row_wise needs CUDA \(NCCL\); on cpu \(gloo\) use "
                                r"data_parallel, table_wise, column_wise or table_column_wise"),
    ({"item": ["table_row_wise"]}, r"sharding.sharding_types.item: table_row_wise needs CUDA"),
    ({"nope": ["table_wise"]}, r"sharding.sharding_types names unknown tables \['nope'\]; tables are "
                               r"\['item', 'seq', 'user'\]"),
    ({"seq": ["table_column_wise"]}, r"table 'seq__full' is unpooled \(EmbeddingCollection\) and cannot use "
                                     r"\['table_column_wise'\]"),
    ({"seq": ["data_parallel"]}, r"data_parallel fails in TorchRec 1.8 for an unpooled table read by several features"),
])
def test_sharding_constraints_reject_what_cannot_run(types, message):
    with pytest.raises(ConfigError, match=message):
        distributed._constraints(_tables(), ShardingConfig(types))


@pytest.mark.parametrize("types, message", [
    ({"default": ["rows"]}, r"sharding.sharding_types.default: unknown sharding type\(s\) \['rows'\]"),
    ({"item": []}, r"sharding.sharding_types.item is empty"),
    ({"default": ["data_parallel", "table_wise"]}, r"data_parallel cannot be listed with other types"),
])
def test_sharding_config_checks_its_types(types, message):
    with pytest.raises(ConfigError, match=message):
        ShardingConfig(types)
    with pytest.raises(ConfigError, match="sharding.column_shard_dim must be a multiple of 4"):
        ShardingConfig(column_shard_dim=6)


def test_table_widths_fbgemm_cannot_run_are_data_parallel_by_default_and_rejected_when_named():
    module = nn.Module()
    module.bags = EmbeddingBagCollection([EmbeddingBagConfig(name="item__part0", num_embeddings=16, embedding_dim=3,
                                                             feature_names=["f"])], device=torch.device("meta"))
    by_default = distributed._constraints(module, ShardingConfig())["item__part0"]
    assert (by_default.sharding_types, by_default.compute_kernels) == (["data_parallel"], ["dense"])
    with pytest.raises(ConfigError, match=r"table 'item__part0' has dimension 3, but FBGEMM's fused kernels need a "
                                          r"multiple of 4"):
        distributed._constraints(module, ShardingConfig({"item": ["table_wise"]}))


def test_sharding_group_composes_into_the_model(compose_config):
    from hydra.utils import instantiate

    cfg = compose_config("train", ("sharding=column_wise", "sharding.column_shard_dim=16"))
    assert cfg.model.sharding.sharding_types.default == ["column_wise"]
    assert instantiate(cfg.model.sharding) == ShardingConfig({"default": ["column_wise"]}, column_shard_dim=16)
    per_table = compose_config("train", ("+sharding.sharding_types.item=[data_parallel]",))
    assert instantiate(per_table.model.sharding).sharding_types == {
        "default": ["table_wise", "column_wise", "table_column_wise"], "item": ["data_parallel"]}
    assert instantiate(compose_config("train").model.sharding) == ShardingConfig()  # auto is the dataclass default
    assert compose_config("train").trainer.distributed is False
    for option in sorted(p.stem for p in (ROOT / "conf" / "sharding").glob("*.yaml")):
        assert isinstance(instantiate(compose_config("train", (f"sharding={option}",)).sharding), ShardingConfig)


# --- launch checks and the harness --------------------------------------------------------------

def test_distributed_without_torchrun_says_how_to_launch(monkeypatch):
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=r"trainer.distributed=true needs one process per rank started by torchrun, "
                                          r"e.g. `torchrun --nproc_per_node=2 -m pipelines.train"):
        distributed.init_process_group(True)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 ranks .torchrun. but trainer.distributed=false"):
        distributed.init_process_group(False)


def _shares(rank: int, world: int) -> list:
    return list(rank_share(range(7), 7))


def _fails_on_rank_one(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("boom on rank 1")
    torch.distributed.barrier()  # rank 0 waits for a rank that never comes


def _sleeps(rank: int, world: int) -> None:
    time.sleep(60)


def test_each_rank_reads_a_disjoint_equal_share_of_the_batches():
    assert run_ranks(_shares) == [[0, 2, 4], [1, 3, 5]]  # batch 6 is left out so both ranks step 3 times


def test_harness_reports_a_failing_rank_with_its_traceback_and_times_out():
    with pytest.raises(RankError, match=r"(?s)^rank 1 failed first:.*ValueError: boom on rank 1.*then rank0"):
        run_ranks(_fails_on_rank_one, timeout=60)
    with pytest.raises(TimeoutError, match="did not finish in 2 s"):
        run_ranks(_sleeps, timeout=2)


# --- torchrun end to end ------------------------------------------------------------------------

TINY = ["data.source.generator.n_users=300", "data.source.generator.n_items=200",
        "data.source.generator.n_interactions=12000", "model.dim=16", "trainer.batch_size=256"]


@pytest.mark.integration
@pytest.mark.slow  # 25 s: torchrun end to end (run_ranks covers sharding)
def test_torchrun_trains_on_two_ranks_and_logs_one_mlflow_run(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "pipelines.train", "trainer.distributed=true",
               "trainer.epochs=2", "trainer.progress=false", "sharding=column_wise", "sharding.column_shard_dim=8",
               "model.item_bias=true",  # a dense parameter beside the sharded tables: replicated and all-reduced
               f"paths.root={tmp_path}", f"paths.shared_data={SHARED_DATA}", f"hydra.run.dir={tmp_path}/outputs",
               *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("recsys").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["trainer.distributed"] == "True"
    metrics = run.data.metrics
    assert metrics["test_recall_at_20"] > metrics["popularity_recall_at_20"]
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert len(losses) == 2 and losses[1] < losses[0]  # one loss per epoch, averaged over the ranks
    assert metrics["table_bytes_total"] == metrics["table_bytes_user"] + metrics["table_bytes_item"] > 0
    assert len(list((tmp_path / "checkpoints").rglob("latest.json"))) == 1


def test_distributed_pipeline_without_torchrun_fails_with_the_launch_command(tmp_path):
    command = [sys.executable, "-m", "pipelines.train", "trainer.distributed=true", f"paths.root={tmp_path}",
               f"hydra.run.dir={tmp_path}/outputs"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode != 0
    assert "trainer.distributed=true needs one process per rank started by torchrun" in done.stderr
