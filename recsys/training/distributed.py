"""Process groups and sharding with TorchRec's DistributedModelParallel.

Every run, even a single process, goes through DMP: the planner places the tables and
FBGEMM's fused kernels run them with the table optimizer applied in the backward pass.
Under ``torchrun`` the environment gives rank and world size; otherwise a one-process
group on an in-memory store is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from recsys.errors import ConfigError

TABLE_OPTIMIZERS = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad,
                    "rowwise_adagrad": RowWiseAdagrad, "adam": torch.optim.Adam}


def device() -> torch.device:
    """This rank's device: its CUDA device when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_process_group() -> tuple[int, int]:
    """Joins (or creates) the default process group; returns (rank, world_size)."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "WORLD_SIZE" in os.environ:
            if torch.cuda.is_available():
                torch.cuda.set_device(device())
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


@dataclass
class TableOptimizer:
    """The fused optimizer FBGEMM applies to embedding rows in the backward pass.

    Args:
        name: sgd, adagrad, rowwise_adagrad (CPU and CUDA) or adam (CUDA only).
        lr: learning rate.
        weight_decay: L2 penalty applied by the fused kernel.
        eps: numerical epsilon of the adaptive optimizers.
    """

    name: str = "rowwise_adagrad"
    lr: float = 0.05
    weight_decay: float = 0.0
    eps: float = 1e-8

    def apply(self, model: nn.Module) -> None:
        """Attaches the optimizer to the rows of every TorchRec table in ``model`` (not to dense parameters)."""
        if self.name not in TABLE_OPTIMIZERS:
            raise ConfigError(f"table_optimizer.name must be one of {sorted(TABLE_OPTIMIZERS)}, got {self.name!r}")
        if self.name == "adam" and not torch.cuda.is_available():
            raise ConfigError("table_optimizer.name=adam needs CUDA: FBGEMM's CPU kernels support sgd, adagrad "
                              "and rowwise_adagrad")
        kwargs = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.name != "sgd":
            kwargs["eps"] = self.eps
        tables = [p for m in model.modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))
                  for p in m.parameters()]
        apply_optimizer_in_backward(TABLE_OPTIMIZERS[self.name], tables, kwargs)


@dataclass
class ShardingConfig:
    """How tables are placed.

    Args:
        sharding_types: allowed types per table (data_parallel, table_wise, column_wise,
            table_column_wise, row_wise); ``default`` applies to tables not listed.
    """

    sharding_types: dict[str, list[str]] = field(default_factory=lambda: {"default": ["table_wise"]})


def _constraints(model: nn.Module, sharding: ShardingConfig) -> dict[str, ParameterConstraints]:
    """Per-table planner constraints; tables keep the fused kernel (so the table optimizer runs in FBGEMM)."""
    constraints = {}
    for module in model.modules():
        if isinstance(module, (EmbeddingBagCollection, EmbeddingCollection)):
            configs = module.embedding_bag_configs() if isinstance(module, EmbeddingBagCollection) else module.embedding_configs()
            for config in configs:
                types = sharding.sharding_types.get(config.name, sharding.sharding_types.get("default"))
                kernels = None if types == ["data_parallel"] else ["fused"]
                constraints[config.name] = ParameterConstraints(sharding_types=list(types), compute_kernels=kernels)
    return constraints


def shard(model: nn.Module, sharding: ShardingConfig | None = None) -> DistributedModelParallel:
    """Plans and shards ``model``'s TorchRec tables over the process group with DMP."""
    init_process_group()
    dev = device()
    sharders = [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]
    topology = Topology(world_size=dist.get_world_size(), compute_device=dev.type,
                        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())))
    planner = EmbeddingShardingPlanner(topology=topology, constraints=_constraints(model, sharding or ShardingConfig()),
                                       storage_reservation=FixedPercentageStorageReservation(0.15))
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    return DistributedModelParallel(model, device=dev, plan=plan, sharders=sharders)


def combined_optimizer(model: DistributedModelParallel, dense: type[torch.optim.Optimizer] = torch.optim.Adam,
                       **dense_kwargs) -> CombinedOptimizer:
    """The tables' fused optimizer plus ``dense`` for every parameter it does not own."""
    fused = set(model.fused_optimizer.params)
    dense_params = {n: p for n, p in model.named_parameters() if n not in fused}
    optimizers = [model.fused_optimizer]
    if dense_params:
        wrapper = KeyedOptimizerWrapper(dense_params, lambda params: dense(params, **dense_kwargs))
        wrapper.init_state()  # creates the state entries, so a checkpoint can be loaded into them
        optimizers.append(wrapper)
    return CombinedOptimizer(optimizers)
