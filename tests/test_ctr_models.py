"""CTR models (DLRM, DCN-V2, DeepFM) and their training task: each part against a reference computation,
every compression method of conf/embedding through the real config, and training on planted CTR data."""

from __future__ import annotations

import itertools
import math
from functools import partial

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torchrec import KeyedJaggedTensor

from pipelines.prepare import ensure_prepared
from pipelines.train import build_model
from recsys.data.batching import CTRBatcher, ParquetBatches
from recsys.data.synthetic import generate_ctr
from recsys.embeddings.collection import CompressedEmbeddings
from recsys.embeddings.spec import TableSpec
from recsys.errors import ConfigError
from recsys.models.ctr import DCNv2, DLRM, Cross, DeepFM, factorization_machine
from recsys.training.ctr import CTRTask, LRSchedule
from recsys.training.distributed import unsharded
from recsys.training.loop import TrainerConfig, evaluate, fit
from recsys.training.losses import binary_cross_entropy
from tests.conftest import ROOT, SHARED_DATA

METHODS = sorted(p.stem for p in (ROOT / "conf" / "embedding").glob("*.yaml"))
MODELS = ["dlrm", "dcnv2", "deepfm"]
SMALL = ("model.dim=16", "trainer.progress=false", "trainer.batch_size=256")
# Small architectures for the planted-data tests, without the embedding penalty (the yamls' defaults are tuned for Frappe).
FAST = {"dlrm": ("model.model.top=[64]", "model.model.bottom=[16]", "model.embedding_l2=0"),
        "dcnv2": ("model.model.deep=[64]", "model.embedding_l2=0"), "deepfm": ("model.model.deep=[64]", "model.embedding_l2=0")}


def _compose(root, *overrides: str, config: str = "train"):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=config, overrides=[f"paths.root={root}", f"paths.shared_data={SHARED_DATA}",
                                                      *overrides])


def _synthetic(root, *overrides: str):
    """Planted CTR data (4 dense, 6 single-valued fields, a multi-valued ``tags``) prepared with conf/data/synthetic_ctr,
    and the planted model's own AUC over every row."""
    cfg = _compose(root, "data=synthetic_ctr", *(f"data.{o}" for o in overrides), config="prepare")
    data = ensure_prepared(cfg.data)
    planted = generate_ctr(instantiate(cfg.data.source.generator), root / "planted_again.parquet")
    return data, planted["planted_auc"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _synthetic(tmp_path_factory.mktemp("tiny_ctr"), "source.generator.n_rows=3000",
                      "source.generator.chunk_rows=3000")[0]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Enough rows per id to learn the planted model (small vocabularies) and a 30% test split, so the test AUC's
    sampling error (~0.004) stays well below the tolerance."""
    return _synthetic(tmp_path_factory.mktemp("planted_ctr"), "source.generator.n_rows=150000",
                      "source.generator.chunk_rows=150000", "source.generator.cardinalities=[50,20,20,10,10,5]",
                      "source.generator.multi_valued_cardinality=50", "ctr.test_fraction=0.3")


def _build(data, root, *overrides: str):
    """(task, trainer) from the real config; Hydra's wrapper of a construction error is removed."""
    cfg = _compose(root, *SMALL, f"trainer.checkpoint_dir={root}/checkpoints", *overrides)
    trainer = instantiate(cfg.trainer)
    try:
        return build_model(cfg, data, trainer), trainer
    except InstantiationException as error:
        raise error.__cause__ from None


def _batch(data, rows: int = 64):
    return next(iter(ParquetBatches(data.path("test"), CTRBatcher(data.ctr_schema), rows)))


def _kjt(ids: dict[str, list[list[int]]]) -> KeyedJaggedTensor:
    keys = list(ids)
    values = [i for k in keys for cell in ids[k] for i in cell]
    lengths = [len(cell) for k in keys for cell in ids[k]]
    return KeyedJaggedTensor.from_lengths_sync(keys, torch.tensor(values), torch.tensor(lengths, dtype=torch.int32))


def _tables(fields=("a", "b", "c"), dim: int = 4, suffix: str = "") -> CompressedEmbeddings:
    return CompressedEmbeddings([TableSpec(f"{f}{suffix}", 6, dim, (f,)) for f in fields])


IDS = {"a": [[1], [2]], "b": [[3], [4]], "c": [[5, 1], [2]]}  # c is multi-valued (sum pooling)


# --- each model against a reference computation ----------------------------------------------------------


@pytest.mark.parametrize("n_dense", [0, 3])
def test_dlrm_interaction_is_every_pairwise_dot_product(n_dense):
    torch.manual_seed(0)
    model = DLRM(_tables(), n_dense=n_dense, bottom=[8], top=[8])
    fields = torch.randn(2, 3, 4)
    projected = torch.randn(2, 4) if n_dense else None
    vectors = ([projected] if n_dense else []) + [fields[:, i] for i in range(3)]
    dots = [(u * v).sum(1) for u, v in itertools.combinations(vectors, 2)]
    expected = torch.cat(([projected] if n_dense else []) + [torch.stack(dots, 1)], dim=1)
    torch.testing.assert_close(model.interact(fields, projected), expected)


def test_dlrm_forward_is_top_of_interactions_of_bottom_and_fields():
    torch.manual_seed(0)
    model, dense = DLRM(_tables(), n_dense=3, bottom=[8], top=[8]), torch.rand(2, 3)
    out = model.embeddings(_kjt(IDS))
    fields = torch.stack([out["a"], out["b"], out["c"]], dim=1)
    expected = model.top(model.interact(fields, model.bottom(dense))).squeeze(1)
    torch.testing.assert_close(model(_kjt(IDS), dense), expected)
    with pytest.raises(ConfigError, match=r"model.fields=\['a'\] is invalid: expected at least two vectors"):
        DLRM(_tables(("a",)), n_dense=0)


@pytest.mark.parametrize("low_rank", [None, 2])
def test_dcn_cross_layers_follow_the_formula(low_rank):
    torch.manual_seed(0)
    cross = Cross(layers=2, low_rank=low_rank).build(5)
    x0 = torch.randn(3, 5)
    x = x0
    for layer in range(2):
        if low_rank is None:
            w, b = cross.kernels[layer], cross.bias[layer].squeeze(1)
        else:
            w, b = cross.W_kernels[layer] @ cross.V_kernels[layer], cross.bias[layer]
        x = x0 * (x @ w.T + b) + x
    torch.testing.assert_close(cross(x0), x)


def test_dcn_one_cross_layer_on_a_hand_example():
    cross = Cross(layers=1).build(2)
    with torch.no_grad():
        cross.kernels[0].copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0]]))
        cross.bias[0].copy_(torch.tensor([[0.5], [1.0]]))
    # x0 = (1, 2): W x0 + b = (5.5, -1); x0 * that + x0 = (6.5, 0)
    torch.testing.assert_close(cross(torch.tensor([[1.0, 2.0]])), torch.tensor([[6.5, 0.0]]))


@pytest.mark.parametrize("structure", ["stacked", "parallel"])
def test_dcn_structures_compose_cross_and_deep(structure):
    torch.manual_seed(0)
    model, dense = DCNv2(_tables(), 2, Cross(layers=2, structure=structure), deep=[8]), torch.rand(2, 2)
    out = model.embeddings(_kjt(IDS))
    x0 = torch.cat([dense, out["a"], out["b"], out["c"]], dim=1)
    hidden = model.deep(model.cross(x0)) if structure == "stacked" else torch.cat([model.cross(x0), model.deep(x0)], 1)
    torch.testing.assert_close(model(_kjt(IDS), dense), model.head(hidden).squeeze(1))


def test_fm_equals_the_sum_over_pairs_of_fields():
    torch.manual_seed(0)
    fields = torch.randn(4, 5, 3)
    expected = sum((fields[:, i] * fields[:, j]).sum(1) for i in range(5) for j in range(i + 1, 5))
    torch.testing.assert_close(factorization_machine(fields), expected)


def test_deepfm_is_bias_plus_first_order_plus_fm_plus_deep():
    torch.manual_seed(0)
    model = DeepFM(_tables(), _tables(dim=4, suffix="_linear"), n_dense=2, deep=[8])
    with torch.no_grad():
        model.bias.fill_(0.3)
    dense = torch.rand(2, 2)
    out, linear = model.embeddings(_kjt(IDS)), model.first_order(_kjt(IDS))
    vectors = [out[f] for f in "abc"] + [dense[:, j:j + 1] * model.dense_vectors[j] for j in range(2)]
    fm = sum((u * v).sum(1) for u, v in itertools.combinations(vectors, 2))
    first = sum(linear[f].sum(1) for f in "abc") + dense @ model.dense_linear.weight[0]
    deep = model.deep.dense_module(torch.cat([dense, out["a"], out["b"], out["c"]], dim=1)).squeeze(1)
    torch.testing.assert_close(model(_kjt(IDS), dense), 0.3 + first + fm + deep)
    no_first = DeepFM(_tables(), None, n_dense=0, deep=[])
    fields = torch.stack([no_first.embeddings(_kjt(IDS))[f] for f in "abc"], 1)
    expected = no_first.deep.dense_module(fields.flatten(1)).squeeze(1) + factorization_machine(fields)
    torch.testing.assert_close(no_first(_kjt(IDS), torch.empty(2, 0)), expected)


@pytest.mark.parametrize("make, message", [
    (lambda: DCNv2(_tables(), 0, Cross(structure="mixed")), r"model.cross.structure='mixed' is invalid"),
    (lambda: DCNv2(_tables(), 0, Cross(low_rank=0)), r"model.cross.low_rank=0 is invalid: expected null"),
    (lambda: DeepFM(_tables(), None, 0, deep=[64, 0]), r"model.deep=\[64, 0\] is invalid: expected a list"),
    (lambda: DLRM(_tables(), 0, dropout=1.0), r"model.dropout=1.0 is invalid: expected a dropout probability"),
    (lambda: DeepFM(_tables(), _tables(("a", "b"), suffix="_linear"), 0), r"model.first_order=\['a', 'b'\]"),
])
def test_models_reject_bad_settings(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_loss_is_binary_cross_entropy_of_the_logits():
    logits, labels = torch.tensor([0.3, -2.0, 1.5]), torch.tensor([1.0, 0.0, 0.0])
    expected = -sum(math.log(1 / (1 + math.exp(-z))) if y else math.log(1 - 1 / (1 + math.exp(-z)))
                    for z, y in zip(logits.tolist(), labels.tolist())) / 3
    assert binary_cross_entropy(logits, labels).item() == pytest.approx(expected, rel=1e-6)


# --- every model with every compression method, through the real config -----------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model", MODELS)
def test_every_model_runs_with_every_compression_method(model, method, tiny, tmp_path):
    # compress_min_rows=200 (the yamls' default) compresses s0, s1 and tags; the smaller tables cannot fit the
    # budgets of every method. mixed_dim's narrowest block (4 columns + a 4 x 16 projection) needs more than 0.25 at D = 16,
    # and so does low_rank's smallest rank, 4 (4 / 16 of the rows + a 4 x 16 projection).
    overrides = (f"model={model}", f"embedding={method}",
                 *(("embedding.default.budget=0.5",) if method in ("mixed_dim", "low_rank") else ()))
    if method == "graph_hash":
        with pytest.raises(ConfigError, match=r"GraphHash on table '\w+' needs the training graph .* CTR fields do "
                                              "not have; choose another compression method"):
            _build(tiny, tmp_path, *overrides)
        return
    task, _ = _build(tiny, tmp_path, *overrides)
    batch = _batch(tiny)
    assert batch.dense.shape == (64, 4) and "tags" in batch.sparse.keys()  # dense and multi-valued fields
    task.train_epoch(0, None)
    probabilities = task.predict(batch)
    assert probabilities.shape == (64,) and probabilities.dtype == torch.float32
    assert torch.isfinite(probabilities).all() and ((probabilities > 0) & (probabilities < 1)).all()
    assert probabilities.std() > 0
    torch.testing.assert_close(task.embed("s0", batch.sparse["s0"].values()), task.embeddings(batch.sparse)["s0"])
    memory = task.memory()
    assert set(memory) >= set(tiny.ctr_schema.sparse_features) and all(b > 0 for b in memory.values())
    if method not in ("full", "vq_e2e"):  # vq_e2e trains a full query table; its budget applies to the export
        assert memory["s0"] < 1001 * 16 * 4
    assert sum(task.memory_parts().values()) == sum(memory.values())


@pytest.mark.parametrize("method", ["hashing", "quotient_remainder", "double_hashing"])
def test_deepfm_first_order_tables_can_be_compressed(method, tiny, tmp_path):
    def first_order_bytes(first_order: str) -> dict[str, int]:
        task, _ = _build(tiny, tmp_path, "model=deepfm", f"embedding={method}", "embedding.default.budget=0.25",
                         f"model.first_order={first_order}")
        assert task.predict(_batch(tiny)).shape == (64,)
        return {k.removesuffix("_linear"): v for k, v in task.memory().items() if k.endswith("_linear")}

    full = {f: n * 4 * 4 for f, n in tiny.vocab_sizes.items()}  # FIRST_ORDER_WIDTH = 4 float32 per row
    assert first_order_bytes("full") == full
    compressed = first_order_bytes("compressed")
    for field, n in tiny.vocab_sizes.items():  # compress_min_rows=200 keeps the small tables full
        assert compressed[field] == full[field] if n < 200 else compressed[field] <= 0.25 * full[field], field


def test_total_budget_holds_for_the_fields_and_the_compressed_first_order_tables(tiny, tmp_path):
    # embedding.total_budget: each collection (the fields, the first-order tables) within 1/4 of its full bytes,
    # the small tables kept full included (by model.compress_min_rows=200 only: every field of the tiny data is under
    # embedding.full_below_rows' default 1000 rows)
    task, _ = _build(tiny, tmp_path, "model=deepfm", "embedding=quotient_remainder", "embedding.default.budget=0.9",
                     "embedding.total_budget=0.25", "embedding.full_below_rows=0", "model.first_order=compressed")
    assert task.predict(_batch(tiny)).shape == (64,)
    for collection in task.embeddings, task.first_order:
        full = sum(spec.full_bytes for spec in collection.specs.values())
        memory = collection.memory()
        assert full // 5 < sum(memory.values()) <= full // 4
        assert all(memory[n] == s.full_bytes for n, s in collection.specs.items() if s.num_embeddings < 200)


def test_small_tables_stay_full_below_compress_min_rows(tiny, tmp_path):
    task, _ = _build(tiny, tmp_path, "model=dcnv2", "embedding=hashing", "model.compress_min_rows=200")
    plain = {p.split("/")[2] for p in task.memory_parts() if "/plain/" in p}
    sizes = tiny.vocab_sizes
    assert {f"{f}__full" for f, n in sizes.items() if n < 200} <= plain
    assert not {f"{f}__full" for f, n in sizes.items() if n >= 200} & plain


# --- the task --------------------------------------------------------------------------------------------


def test_training_is_deterministic_given_the_seed(tiny, tmp_path):
    def run(seed: int):
        task, _ = _build(tiny, tmp_path, "model=deepfm", f"trainer.seed={seed}", *FAST["deepfm"])
        loss = task.train_epoch(0, None)["loss"]
        return loss, task.predict(_batch(tiny))

    (loss_a, p_a), (loss_b, p_b), (_, p_c) = run(0), run(0), run(1)
    assert loss_a == loss_b and torch.equal(p_a, p_b)
    assert not torch.equal(p_a, p_c)


def test_resume_ends_where_a_straight_run_ends(tiny, tmp_path):
    def run(directory, epochs, resume=False):
        task, trainer = _build(tiny, tmp_path, "model=deepfm", *FAST["deepfm"], f"trainer.checkpoint_dir={directory}",
                               f"trainer.epochs={epochs}", f"trainer.resume={str(resume).lower()}",
                               "model.lr_schedule.kind=step")  # cosine would depend on trainer.epochs
        return fit(task, tiny, trainer)

    straight = run(tmp_path / "a", 3)
    run(tmp_path / "b", 2)
    assert run(tmp_path / "b", 3, resume=True) == pytest.approx(straight, rel=1e-6)


def test_embedding_l2_shrinks_the_looked_up_embeddings(tiny, tmp_path):
    def norms(l2: float) -> tuple[float, float]:
        task, _ = _build(tiny, tmp_path, "model=dlrm", *FAST["dlrm"], f"model.embedding_l2={l2}")
        loss = task.train_epoch(0, None)["loss"]
        ids = torch.arange(1, tiny.vocab_sizes["s0"])
        return task.embed("s0", ids).norm(dim=1).mean().item(), loss

    (free, free_loss), (penalised, penalised_loss) = norms(0.0), norms(1.0)
    assert penalised < 0.5 * free, (penalised, free)  # measured: 0.38
    assert penalised_loss > free_loss  # the reported loss is the cross-entropy alone; the penalty costs fit


def test_lr_schedule_factors():
    cosine = LRSchedule("cosine", warmup_steps=4, min_factor=0.1)
    assert [cosine.factor(s, 24, 6) for s in (0, 1, 3)] == pytest.approx([0.25, 0.5, 1.0])
    t = (13 - 4) / (24 - 1 - 4)  # 0 after the warmup, 1 at the last step
    assert cosine.factor(13, 24, 6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    assert cosine.factor(23, 24, 6) == pytest.approx(0.1)
    step = LRSchedule("step", step_epochs=2, gamma=0.5)
    assert [step.factor(s, 60, 10) for s in (0, 19, 20, 45)] == [1.0, 1.0, 0.5, 0.25]
    assert LRSchedule().factor(17, 20, 5) == 1.0
    with pytest.raises(ConfigError, match=r"model.lr_schedule.kind='linear' is invalid"):
        LRSchedule("linear")


@pytest.mark.parametrize("tables", [True, False])
def test_lr_schedule_reaches_the_fused_table_optimizer(tables, tiny, tmp_path):
    """A factor of 0 freezes every parameter it scales: the tables only when ``tables`` is set."""
    task, _ = _build(tiny, tmp_path, "model=dlrm", *FAST["dlrm"], "model.dense_optimizer.name=sgd")
    task.schedule = LRSchedule("step", gamma=1e-30, tables=tables)  # factor 1 in epoch 0, ~0 afterwards
    task.train_epoch(0, None)
    before = unsharded(task.model.state_dict())
    task.train_epoch(1, None)
    after = unsharded(task.model.state_dict())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    table_keys = {k for k in before if "embedding_bags" in k}
    assert changed == (set() if tables else table_keys)


def test_task_rejects_what_it_cannot_train(tiny, tiny_interactions, tmp_path):
    with pytest.raises(ConfigError, match=r"model.first_order='full' is invalid: the model takes no first-order"):
        _build(tiny, tmp_path, "model=dcnv2", "+model.first_order=full")
    with pytest.raises(ConfigError, match="CTR models need a CTR dataset; .* holds 'interactions'"):
        CTRTask(tiny_interactions, TrainerConfig(), partial(DLRM))
    with pytest.raises(ConfigError, match=r"model.dense_optimizer.name='lamb' is invalid"):
        _build(tiny, tmp_path, "model=deepfm", "model.dense_optimizer.name=lamb")


# --- planted data ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_training_approaches_the_planted_auc(model, planted, tmp_path):
    data, planted_auc = planted
    task, trainer = _build(data, tmp_path, f"model={model}", *FAST[model], "trainer.epochs=4", "trainer.batch_size=1024")
    metrics = fit(task, data, trainer)
    assert metrics["auc"] > planted_auc - 0.02, (metrics, planted_auc)  # measured gaps: 0.008 to 0.014
    assert metrics["logloss"] < evaluate(_ClickRate(data), data, "test", [])["logloss"] - 0.05


class _ClickRate:
    """Every row gets the training click rate: the log loss a model must beat."""

    def __init__(self, data):
        import pyarrow.parquet as pq

        self.rate = float(pq.read_table(data.path("train"), columns=["label"])["label"].to_numpy().mean())

    def predict(self, batch):
        return torch.full((len(batch),), self.rate)
