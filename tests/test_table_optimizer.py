"""The tables' optimizer on 2 gloo ranks: weight decay against its closed form (FBGEMM's fused kernel and the
data-parallel torch path), the weight decays FBGEMM cannot apply, and data-parallel tables (TorchRec's dense
kernel) against a plain ``nn.EmbeddingBag`` trained with the same optimizer."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from recsys.embeddings.collection import CompressedEmbeddings
from recsys.embeddings.spec import TableSpec
from recsys.errors import ConfigError
from recsys.training.distributed import (DENSE_KERNEL_WARNING, ShardingConfig, TableOptimizer, backward,
                                         combined_optimizer, load_unsharded, shard, sharding_types, unsharded)
from tests.distributed import run_ranks

ROWS, DIM = 16, 8
SPEC = TableSpec("item", ROWS, DIM, ("item",))
WEIGHT = "bags.embedding_bags.item__full.weight"


def _initial() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return CompressedEmbeddings([SPEC]).state_dict()


def _kjt(ids: list[list[int]]) -> KeyedJaggedTensor:
    """One bag per inner list (B = len(ids)) of feature ``item``."""
    values = torch.tensor([i for bag in ids for i in bag], dtype=torch.int64)
    return KeyedJaggedTensor.from_lengths_sync(["item"], values, torch.tensor([len(b) for b in ids], dtype=torch.int32))


def _trained(kind: str, optimizer: TableOptimizer, initial: dict):
    emb = CompressedEmbeddings([SPEC], device=torch.device("meta"))
    optimizer.apply(emb)
    model = shard(emb, ShardingConfig({"default": [kind]}))
    load_unsharded(model, initial)
    return model, combined_optimizer(model, optimizer, dense=torch.optim.SGD, lr=0.0)


# --- weight decay --------------------------------------------------------------------------------

def test_fbgemm_cpu_kernels_ignore_weight_decay():
    """Why a weight decay is refused on the CPU: FBGEMM's CPU kernels update a row as if it were 0, under every
    WeightDecayMode (if this fails, FBGEMM applies it now and TableOptimizer can accept it)."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (ComputeDevice, EmbeddingLocation,
                                                                        SplitTableBatchedEmbeddingBagsCodegen,
                                                                        WeightDecayMode)

    def updated(optimizer, decay: float, mode) -> torch.Tensor:
        tbe = SplitTableBatchedEmbeddingBagsCodegen([(ROWS, DIM, EmbeddingLocation.HOST, ComputeDevice.CPU)],
                                                    optimizer=optimizer, learning_rate=0.1, eps=1e-8,
                                                    weight_decay=decay, weight_decay_mode=mode)
        with torch.no_grad():
            tbe.weights_host.copy_(torch.linspace(-1, 1, ROWS * DIM))
        tbe(torch.tensor([1, 3]), torch.tensor([0, 1, 2])).backward(torch.ones(2, DIM))
        return tbe.weights_host.detach().clone()

    for optimizer in (EmbOptimType.EXACT_SGD, EmbOptimType.EXACT_ADAGRAD, EmbOptimType.EXACT_ROWWISE_ADAGRAD):
        plain = updated(optimizer, 0.0, WeightDecayMode.NONE)
        assert not torch.equal(plain, torch.linspace(-1, 1, ROWS * DIM))  # the step did move rows 1 and 3
        for mode in (WeightDecayMode.L2, WeightDecayMode.DECOUPLE):
            assert torch.equal(updated(optimizer, 0.5, mode), plain), (optimizer, mode)


@pytest.mark.parametrize("name, kernel", [("sgd", "EXACT_SGD"), ("adagrad", "EXACT_ADAGRAD")])
def test_a_weight_decay_fbgemm_would_ignore_is_rejected(name, kernel, monkeypatch):
    with pytest.raises(ConfigError, match=rf"table_optimizer.weight_decay=0.01 cannot be honoured with "
                                          rf"table_optimizer.name={name}: FBGEMM's fused {name} kernel \({kernel}\) "
                                          rf"has no weight decay and would ignore it; set weight_decay=0"):
        TableOptimizer(name, weight_decay=0.01)
    assert TableOptimizer(name, weight_decay=0.0)._kwargs()["weight_decay"] == 0.0
    for bad in (-0.1, "0.1", True, float("nan")):
        with pytest.raises(ConfigError, match="table_optimizer.weight_decay must be a number >= 0, got"):
            TableOptimizer("rowwise_adagrad", weight_decay=bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rowwise = TableOptimizer("rowwise_adagrad", weight_decay=0.01)  # a config, valid on CUDA
    emb = CompressedEmbeddings([SPEC])
    for use, argument in ((rowwise.apply, emb), (rowwise.build, list(emb.parameters()))):
        with pytest.raises(ConfigError, match=r"table_optimizer.weight_decay=0.01 cannot be honoured with "
                                              r"table_optimizer.name=rowwise_adagrad on the CPU: FBGEMM's CPU "
                                              r"rowwise_adagrad kernel \(EXACT_ROWWISE_ADAGRAD\) ignores weight decay"):
            use(argument)


def _fused_decay_settings(rank: int, world: int) -> list[tuple[float, int]]:
    """(weight_decay, weight_decay_mode) of the FBGEMM modules DMP builds for a rowwise_adagrad table configured as
    on CUDA (the CUDA check is bypassed in this rank; the modules are only built, not trained)."""
    emb = CompressedEmbeddings([SPEC], device=torch.device("meta"))
    available, torch.cuda.is_available = torch.cuda.is_available, lambda: True
    try:
        TableOptimizer("rowwise_adagrad", lr=0.1, weight_decay=0.5).apply(emb)
    finally:
        torch.cuda.is_available = available
    model = shard(emb, ShardingConfig({"default": ["column_wise"]}, column_shard_dim=4))
    return [(m._emb_module.optimizer_args.weight_decay, m._emb_module.optimizer_args.weight_decay_mode)
            for lookup in model.module.bags._lookups for m in getattr(lookup, "module", lookup)._emb_modules]


def test_on_cuda_rowwise_adagrad_hands_fbgemm_its_l2_weight_decay_mode():
    """Without WeightDecayMode.L2 (FBGEMM's default is NONE) the CUDA kernel ignores weight_decay too."""
    assert run_ranks(_fused_decay_settings) == [[(0.5, 1)], [(0.5, 1)]]  # WeightDecayMode.L2 == 1


def test_data_parallel_rowwise_adagrad_weight_decay_is_fbgemms_l2_update(monkeypatch):
    """The torch optimizer of data-parallel tables (on CUDA) applies FBGEMM's L2 update to the rows with a
    gradient: g' = g + wd w; w - lr g' / (sqrt(mean g'^2) + eps); the other rows stay (a dense decay would move
    them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    lr, decay, eps = 0.1, 0.5, 1e-8
    weight = nn.Parameter(torch.linspace(-1, 1, ROWS * DIM).view(ROWS, DIM))
    initial = weight.detach().clone()
    gradient = torch.zeros(ROWS, DIM)
    gradient[[1, 3, 5]] = torch.randn(3, DIM, generator=torch.Generator().manual_seed(1))
    weight.grad = gradient.clone()
    TableOptimizer("rowwise_adagrad", lr=lr, weight_decay=decay, eps=eps).build([weight]).step()
    expected = initial.clone()
    for row in (1, 3, 5):
        g = gradient[row] + decay * initial[row]
        expected[row] = initial[row] - lr * g / (g.pow(2).mean().sqrt() + eps)
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-6, atol=1e-7)


# --- data-parallel tables against a plain nn.EmbeddingBag ----------------------------------------

BATCHES = {0: [[[0, 1, 1], [], [7]], [[2], [3, 4], [5, 6, 1]]],  # rank -> the batch of each step
           1: [[[1, 9], [9], [15, 0]], [[12, 12, 12], [0], [3]]]}


def _targets(step: int, rank: int) -> torch.Tensor:
    return torch.randn(3, DIM, generator=torch.Generator().manual_seed(10 * step + rank))


def _loss(out: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """Nonlinear in the rows, so the second step's gradient depends on the first step's update."""
    return (out - _targets(step, rank)).pow(2).sum(1).mean()


def _data_parallel_steps(rank: int, world: int, optimizer: TableOptimizer, initial: dict) -> dict:
    """Two steps; the first calls ``loss.backward()`` itself, the second the library's ``backward``."""
    model, step = _trained("data_parallel", optimizer, initial)
    losses, weights, warned = [], [], []
    for index, ids in enumerate(BATCHES[rank]):
        loss = _loss(model(_kjt(ids))["item"], index, rank)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss.backward() if index == 0 else backward(loss)
        step.step()
        step.zero_grad()
        losses.append(loss.item())
        weights.append(unsharded(model.state_dict())[WEIGHT])
        warned.append([str(w.message) for w in caught if DENSE_KERNEL_WARNING in str(w.message)])
    return {"losses": losses, "weights": weights, "plan": sharding_types(model), "warned": warned}


def _reference(optimizer: TableOptimizer, initial: dict) -> tuple[list[list[float]], list[torch.Tensor]]:
    """A plain EmbeddingBag and torch optimizer: each step sums both ranks' losses and halves the gradient (DDP
    averages the ranks' gradients of a replicated table)."""
    bag = nn.EmbeddingBag(ROWS, DIM, mode="sum")
    with torch.no_grad():
        bag.weight.copy_(initial[WEIGHT])
    kwargs = {"lr": optimizer.lr} | ({"eps": optimizer.eps} if optimizer.name != "sgd" else {})
    torch_optimizer = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}[optimizer.name]([bag.weight], **kwargs)
    losses, weights = [[], []], []
    for index in range(2):
        total = 0
        for rank in (0, 1):
            ids = BATCHES[rank][index]
            offsets = torch.tensor([0, *torch.tensor([len(b) for b in ids]).cumsum(0)[:-1].tolist()])
            loss = _loss(bag(torch.tensor([i for b in ids for i in b]), offsets), index, rank)
            losses[rank].append(loss.item())
            total = total + loss / 2
        total.backward()
        torch_optimizer.step()
        torch_optimizer.zero_grad()
        weights.append(bag.weight.detach().clone())
    return losses, weights


@pytest.mark.parametrize("name", ["sgd", "adagrad"])
def test_data_parallel_tables_train_like_a_plain_embedding_bag(name):
    """TorchRec's dense kernel (FBGEMM's dense_embedding_codegen_lookup_function) warns in backward that the op
    has no autograd kernel; its CPU kernel wraps itself in an autograd Function (SplitLookupFunction_Dense_Op), so
    torch's fallback only hooks a warning on the output and the gradient is FBGEMM's: the losses and the weights
    after two steps equal the plain reference's on both ranks."""
    optimizer = TableOptimizer(name, lr=0.3)
    initial = _initial()
    results = run_ranks(_data_parallel_steps, optimizer, initial)
    losses, weights = _reference(optimizer, initial)
    assert not torch.equal(weights[1], initial[WEIGHT])
    for rank, result in enumerate(results):
        assert set(result["plan"].values()) == {"data_parallel"}
        # the warning backward() filters (if torch stops raising it, the filter can go)
        assert [len(w) for w in result["warned"]] == [1, 0], result["warned"]
        assert result["losses"] == pytest.approx(losses[rank], rel=1e-6)
        for index in range(2):
            torch.testing.assert_close(result["weights"][index], weights[index], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name} rank {rank} after step {index + 1}: {m}")
