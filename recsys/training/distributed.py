"""Process groups and sharding with TorchRec's DistributedModelParallel.

Every run, even a single process, goes through DMP: the planner places the tables and
FBGEMM's fused kernels run them with the table optimizer applied in the backward pass.
A multi-process run is started by ``torchrun`` (``trainer.distributed=true``), whose
environment gives rank and world size; otherwise a one-process group on an in-memory store
is used.

How gradients combine over ranks (each rank reads its own batches): every parameter steps with
the *mean* over ranks of the ranks' gradients. DDP averages those of the dense parameters and
data-parallel tables; a model-parallel table (table_wise, column_wise, table_column_wise,
row_wise) receives the gradients of every rank's batch through TorchRec's all-to-all, whose
backward divides them by the world size (TorchRec's default gradient division). So W ranks with
batches of B rows and a per-batch mean loss train like one process with batches of W x B rows.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from fbgemm_gpu.split_table_batched_embeddings_ops_training import WeightDecayMode
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from recsys.embeddings.collection import served_form
from recsys.embeddings.memory import TABLE_KEY
from recsys.errors import ConfigError
from recsys.inference.package import to_config
from recsys.models.settings import is_number

TABLE_OPTIMIZERS = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad,
                    "rowwise_adagrad": RowWiseAdagrad, "adam": torch.optim.Adam}
SHARDING_TYPES = ("data_parallel", "table_wise", "column_wise", "table_column_wise", "row_wise", "table_row_wise",
                  "grid_shard")
CUDA_ONLY = ("row_wise", "table_row_wise", "grid_shard")
# Where FBGEMM's fused kernels cannot apply table_optimizer.weight_decay (it would be silently ignored): sgd and
# adagrad on any device (their lookup invokers do not pass weight_decay to the kernel; SplitTableBatchedEmbeddingBags-
# Codegen's docstring: "EXACT_ADAGRAD, SGD, EXACT_SGD do not support weight decay"), and rowwise_adagrad on the CPU:
# fbgemm-gpu-cpu 1.8.0 hands weight_decay and weight_decay_mode to its CPU kernel, which updates the rows as if both
# were 0 under every WeightDecayMode (tests/test_table_optimizer.py checks this, so an FBGEMM that fixes it shows up).
NO_WEIGHT_DECAY = {"sgd": "EXACT_SGD", "adagrad": "EXACT_ADAGRAD"}
NO_CPU_WEIGHT_DECAY = {"rowwise_adagrad": "EXACT_ROWWISE_ADAGRAD"}
WEIGHT_DECAY_ADVICE = "set weight_decay=0 (CTR models: embedding_l2 penalises the looked-up rows)"
LAUNCH = "torchrun --nproc_per_node=2 -m pipelines.train trainer.distributed=true ..."

T = TypeVar("T")


def device() -> torch.device:
    """This rank's device: its CUDA device when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def launched() -> bool:
    """Whether a launcher (``torchrun``) started this process as one rank of a group."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_process_group(distributed: bool | None = None) -> tuple[int, int]:
    """Joins (or creates) the default process group; returns (rank, world_size).

    Args:
        distributed: ``trainer.distributed``. True requires a launch by ``torchrun`` (or an
            already initialised group); False requires a single process; None joins whatever
            the environment describes (torchrun's variables, else a one-process group).

    Raises:
        ConfigError: the launch does not match ``distributed``.
    """
    if distributed and not dist.is_initialized() and not launched():
        raise ConfigError("trainer.distributed=true needs one process per rank started by torchrun, e.g. "
                          f"`{LAUNCH}` (add --nnodes/--rdzv-endpoint for several machines); this process "
                          "was started without torchrun's RANK and WORLD_SIZE")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if launched() and distributed is not False:
            if torch.cuda.is_available():
                torch.cuda.set_device(device())
            dist.init_process_group(backend)
        elif distributed is False and launched() and int(os.environ["WORLD_SIZE"]) > 1:
            raise ConfigError(f"this process is one of WORLD_SIZE={os.environ['WORLD_SIZE']} ranks (torchrun) "
                              "but trainer.distributed=false: add trainer.distributed=true, or run a single "
                              "process without torchrun")
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    elif distributed is False and dist.get_world_size() > 1:
        raise ConfigError(f"trainer.distributed=false but the process group has {dist.get_world_size()} ranks")
    return dist.get_rank(), dist.get_world_size()


def rank_and_world() -> tuple[int, int]:
    """(rank, world_size) of the default group, (0, 1) when there is none."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main() -> bool:
    """Whether this process is rank 0 (or the only process): the one that logs and writes summaries."""
    return rank_and_world()[0] == 0


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first, the other ranks after it (e.g. to prepare data once).

    Example:
        >>> with main_first():  # doctest: +SKIP
        ...     data = ensure_prepared(cfg.data)
    """
    rank, world = rank_and_world()
    if world > 1 and rank != 0:
        dist.barrier()
    yield
    if world > 1 and rank == 0:
        dist.barrier()


def rank_share(items: Iterable[T], count: int) -> Iterator[T]:
    """This rank's share of ``count`` items: item i goes to rank i % world_size.

    Every rank gets ``count // world_size`` items (the last ``count % world_size`` are skipped),
    so the collectives of the ranks' training steps line up.

    Example:
        >>> list(rank_share("abcde", 5))  # one process: everything
        ['a', 'b', 'c', 'd', 'e']
    """
    rank, world = rank_and_world()
    usable = count // world * world
    for index, item in enumerate(items):
        if index >= usable:
            return
        if index % world == rank:
            yield item


def all_sum(values: list[float]) -> list[float]:
    """Sums ``values`` element-wise over the ranks (identity in one process)."""
    if rank_and_world()[1] == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


class ShardedTask:
    """What the tasks training a DMP-wrapped ``self.model`` with ``self.optimizer`` share: their checkpoint state
    and the table memory of ``self.collections()`` (default: ``self.embeddings``). Loading a state clears
    ``self._items``, a cache of item vectors that tasks may keep between training steps."""

    _items: torch.Tensor | None = None

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._items = None

    def collections(self) -> list:
        return [self.embeddings]

    def model_tensors(self) -> dict[str, torch.Tensor]:
        """``model.<key>``: the unsharded state dict of ``self.model`` (a collective on several ranks)."""
        return {f"model.{k}": v for k, v in unsharded(self.model.state_dict()).items()}

    def served_model(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """The JSON config of ``self.settings`` and the ``model.*`` tensors of the model as it is served: tables
        with a smaller inference form replaced by it (``served_form``; a collective on several ranks)."""
        settings, tensors = served_form(self.embeddings, self.settings, self.model_tensors(), "model.embeddings.")
        return to_config(settings), tensors

    def memory(self) -> dict[str, int]:
        return {table: size for c in self.collections() for table, size in c.memory().items()}

    def memory_parts(self) -> dict[str, int]:
        return {part: size for c in self.collections() for part, size in c.memory_parts().items()}

    def layout(self) -> dict[str, dict]:
        """Per table: its compression (``method``, ``budget``), ``bytes``, ``full_bytes`` (``CompressedEmbeddings.layout``)."""
        return {table: entry for c in self.collections() for table, entry in c.layout().items()}


# TorchRec's dense kernel (data-parallel tables) runs FBGEMM's dense_embedding_codegen_lookup_function, which has no
# kernel on the Autograd key, so torch's autograd fallback warns in backward that it "may lead to silently incorrect
# behavior". Harmless here: the op's CPU kernel wraps itself in an autograd Function (SplitLookupFunction_Dense_Op),
# so its output already carries FBGEMM's backward node and the fallback only hooks the warning onto it; the gradient
# is FBGEMM's (tests/test_table_optimizer.py::test_data_parallel_tables_train_like_a_plain_embedding_bag: losses and
# weights after two steps equal a plain nn.EmbeddingBag's on both ranks).
DENSE_KERNEL_WARNING = "fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel was not registered"


def backward(loss: torch.Tensor) -> None:
    """``loss.backward()`` without the dense kernel's harmless autograd-fallback warning (``DENSE_KERNEL_WARNING``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", DENSE_KERNEL_WARNING, UserWarning)
        loss.backward()


def optimise(losses: Iterable[tuple[torch.Tensor, int]], optimizer, embeddings, progress=None) -> dict[str, float]:
    """Steps ``optimizer`` on each (loss, rows) of ``losses`` (plus ``embeddings.auxiliary_loss()``, e.g. VQ's
    commitment); returns the row-weighted mean loss over every rank. ``losses`` is consumed lazily, so a
    generator builds each batch's loss after the previous step.
    """
    total, count = 0.0, 0
    for loss, rows in losses:
        if (auxiliary := embeddings.auxiliary_loss()) is not None:
            loss = loss + auxiliary
        backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        total, count = total + loss.item() * rows, count + rows
        if progress is not None:
            progress.update()
            progress.set_postfix(loss=f"{total / count:.4f}")
    total, count = all_sum([total, count])
    return {"loss": total / max(count, 1)}


class _RowWiseAdagradL2(RowWiseAdagrad):
    """TorchRec's RowWiseAdagrad with FBGEMM's L2 weight decay (``WeightDecayMode.L2``) for data-parallel tables:
    ``weight_decay * w`` joins the gradient of the rows the step touched (a nonzero gradient row) and the other
    rows stay as they are, as in the fused kernel, instead of every row of the dense gradient decaying."""

    def __init__(self, params, lr: float, weight_decay: float, eps: float):
        super().__init__(params, lr=lr, eps=eps)
        self.l2 = weight_decay

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    touched = parameter.grad.ne(0).any(dim=-1, keepdim=True)
                    parameter.grad.add_(torch.where(touched, parameter, 0), alpha=self.l2)
        return super().step(closure)


@dataclass
class TableOptimizer:
    """The fused optimizer FBGEMM applies to embedding rows in the backward pass.

    Args:
        name: sgd, adagrad, rowwise_adagrad (CPU and CUDA) or adam (CUDA only).
        lr: learning rate.
        weight_decay: on CUDA, rowwise_adagrad: L2 penalty (FBGEMM's ``WeightDecayMode.L2``: ``g + weight_decay *
            w`` on the rows a batch touches, the others untouched); adam: decoupled decay (as AdamW). Must be 0 for
            sgd and adagrad (FBGEMM's fused kernels for them have no weight decay) and on the CPU (FBGEMM's CPU
            kernels ignore it): a ConfigError says so instead of training without it.
        eps: numerical epsilon of the adaptive optimizers.

    Example:
        >>> TableOptimizer("rowwise_adagrad", lr=0.1)._kwargs()
        {'lr': 0.1, 'weight_decay': 0.0, 'eps': 1e-08}
    """

    name: str = "rowwise_adagrad"
    lr: float = 0.05
    weight_decay: float = 0.0
    eps: float = 1e-8

    def __post_init__(self):
        if not is_number(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"table_optimizer.weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if self.weight_decay and self.name in NO_WEIGHT_DECAY:
            raise ConfigError(f"table_optimizer.weight_decay={self.weight_decay} cannot be honoured with "
                              f"table_optimizer.name={self.name}: FBGEMM's fused {self.name} kernel "
                              f"({NO_WEIGHT_DECAY[self.name]}) has no weight decay and would ignore it; "
                              f"{WEIGHT_DECAY_ADVICE}, or on CUDA use name=rowwise_adagrad")

    def _kwargs(self) -> dict:
        if self.name not in TABLE_OPTIMIZERS:
            raise ConfigError(f"table_optimizer.name must be one of {sorted(TABLE_OPTIMIZERS)}, got {self.name!r}")
        if self.name == "adam" and not torch.cuda.is_available():
            raise ConfigError("table_optimizer.name=adam needs CUDA: FBGEMM's CPU kernels support sgd, adagrad "
                              "and rowwise_adagrad")
        if self.weight_decay and self.name in NO_CPU_WEIGHT_DECAY and not torch.cuda.is_available():
            raise ConfigError(f"table_optimizer.weight_decay={self.weight_decay} cannot be honoured with "
                              f"table_optimizer.name={self.name} on the CPU: FBGEMM's CPU {self.name} kernel "
                              f"({NO_CPU_WEIGHT_DECAY[self.name]}) ignores weight decay; {WEIGHT_DECAY_ADVICE}")
        kwargs = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.name != "sgd":
            kwargs["eps"] = self.eps
        if self.name == "rowwise_adagrad" and self.weight_decay:
            # FBGEMM's CUDA rowwise_adagrad kernel ignores weight_decay under its default WeightDecayMode.NONE;
            # TorchRec hands these kwargs to the kernel as fused params (RowWiseAdagrad takes and drops the mode)
            kwargs["weight_decay_mode"] = WeightDecayMode.L2
        return kwargs

    def apply(self, model: nn.Module) -> None:
        """Attaches the optimizer to the rows of every TorchRec table in ``model`` (not to dense parameters)."""
        kwargs = self._kwargs()
        tables = [p for m in model.modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))
                  for p in m.parameters()]
        apply_optimizer_in_backward(TABLE_OPTIMIZERS[self.name], tables, kwargs)

    def build(self, params) -> torch.optim.Optimizer:
        """The same optimizer as a plain torch optimizer over ``params`` (for data-parallel tables,
        which DMP runs with the dense kernel, outside FBGEMM's fused backward), with the fused kernel's weight
        decay: L2 on the touched rows for rowwise_adagrad, decoupled (AdamW) for adam."""
        kwargs = self._kwargs()
        if self.weight_decay and self.name == "rowwise_adagrad":
            return _RowWiseAdagradL2(params, lr=self.lr, weight_decay=self.weight_decay, eps=self.eps)
        if self.weight_decay and self.name == "adam":
            return torch.optim.AdamW(params, **kwargs)
        return TABLE_OPTIMIZERS[self.name](params, **kwargs)


@dataclass
class ShardingConfig:
    """How tables are placed over the ranks (``conf/sharding/``).

    Args:
        sharding_types: the types the planner may choose from, per table; ``default`` applies
            to tables not listed. Keys are logical table names (``item``: every plain table of
            its compression) or plain table names (``item__full``: that table only; wins over
            the logical name). Types: data_parallel, table_wise, column_wise,
            table_column_wise (pooled tables only), and on CUDA row_wise, table_row_wise,
            grid_shard. data_parallel is listed alone: it replicates the table on every rank and
            runs it with the dense kernel, outside FBGEMM's fused backward. Types a table's
            collection cannot use are dropped from the ``default`` list, and a table under ``default``
            whose width is not a multiple of 4 (which FBGEMM's fused kernels need) runs data_parallel.
        column_shard_dim: width of column-wise shards (TorchRec's ``min_partition``); None keeps
            TorchRec's default (128), so narrower tables stay one shard.

    Example:
        >>> ShardingConfig({"default": ["table_wise"], "item": ["column_wise"]}, column_shard_dim=32).column_shard_dim
        32
    """

    sharding_types: dict[str, list[str]] = field(
        default_factory=lambda: {"default": ["table_wise", "column_wise", "table_column_wise"]})
    column_shard_dim: int | None = None

    def __post_init__(self):
        self.sharding_types = {str(k): [v] if isinstance(v, str) else list(v) for k, v in self.sharding_types.items()}
        for key, types in self.sharding_types.items():
            where = f"sharding.sharding_types.{key}"
            if not types:
                raise ConfigError(f"{where} is empty; list at least one of {', '.join(SHARDING_TYPES)}")
            unknown = [t for t in types if t not in SHARDING_TYPES]
            if unknown:
                raise ConfigError(f"{where}: unknown sharding type(s) {unknown}; expected some of "
                                  f"{', '.join(SHARDING_TYPES)}")
            if "data_parallel" in types and len(types) > 1:
                raise ConfigError(f"{where}: data_parallel cannot be listed with other types {types}; it replicates "
                                  "the table and uses the dense kernel, so list it alone")
        if self.column_shard_dim is not None and (self.column_shard_dim < 4 or self.column_shard_dim % 4):
            raise ConfigError(f"sharding.column_shard_dim must be a multiple of 4 (FBGEMM's fused kernels) or null, "
                              f"got {self.column_shard_dim}")

    def types_for(self, table: str) -> tuple[str, list[str]]:
        """(config key, allowed types) of plain table ``table`` (``<logical>__<suffix>``)."""
        for key in (table, table.split("__")[0], "default"):
            if key in self.sharding_types:
                return key, self.sharding_types[key]
        return "default", ShardingConfig().sharding_types["default"]


def _tables(model: nn.Module) -> list[tuple[str, bool, list[str], int]]:
    """(name, pooled, feature names, dim) of every TorchRec table in ``model``."""
    found = []
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            found += [(c.name, True, list(c.feature_names), c.embedding_dim) for c in module.embedding_bag_configs()]
        elif isinstance(module, EmbeddingCollection):
            found += [(c.name, False, list(c.feature_names), c.embedding_dim) for c in module.embedding_configs()]
    return found


def _constraints(model: nn.Module, sharding: ShardingConfig,
                 device_type: str = "cpu") -> dict[str, ParameterConstraints]:
    """Per-table planner constraints; model-parallel tables keep the fused kernel (so the table
    optimizer runs in FBGEMM), data-parallel ones use the dense kernel."""
    tables = _tables(model)
    plain = sorted(t[0] for t in tables)
    logical = sorted({n.split("__")[0] for n in plain})
    unknown = sorted(set(sharding.sharding_types) - set(plain) - set(logical) - {"default"})
    if unknown:
        raise ConfigError(f"sharding.sharding_types names unknown tables {unknown}; tables are {logical} "
                          f"(plain: {plain})")
    supported = {True: EmbeddingBagCollectionSharder().sharding_types(device_type),
                 False: EmbeddingCollectionSharder().sharding_types(device_type)}
    constraints = {}
    for name, pooled, features, dim in tables:
        key, types = sharding.types_for(name)
        where = f"sharding.sharding_types.{key}"
        if device_type != "cuda" and (cuda_only := [t for t in types if t in CUDA_ONLY]):
            raise ConfigError(f"{where}: {', '.join(cuda_only)} needs CUDA (NCCL); on {device_type} (gloo) use "
                              "data_parallel, table_wise, column_wise or table_column_wise")
        collection = "pooled (EmbeddingBagCollection)" if pooled else "unpooled (EmbeddingCollection)"
        usable = [t for t in types if t in supported[pooled]]
        if not usable or (key != "default" and len(usable) < len(types)):
            raise ConfigError(f"{where}: table '{name}' is {collection} and cannot use "
                              f"{[t for t in types if t not in usable]}; it supports {', '.join(supported[pooled])}")
        if usable == ["data_parallel"] and not pooled and len(features) > 1:
            raise ConfigError(f"{where}: data_parallel fails in TorchRec 1.8 for an unpooled table read by several "
                              f"features (table '{name}', features {features}); use table_wise or column_wise")
        if dim % 4 and key == "default" and (pooled or len(features) == 1):
            usable = ["data_parallel"]  # FBGEMM's fused kernels need widths divisible by 4; the dense kernel any
        kernels = ["dense"] if usable == ["data_parallel"] else ["fused"]
        if kernels == ["fused"] and dim % 4:
            raise ConfigError(f"{where}: table '{name}' has dimension {dim}, but FBGEMM's fused kernels need a "
                              "multiple of 4 (per column shard too); use dimensions divisible by 4 or shard it "
                              "data_parallel")
        constraints[name] = ParameterConstraints(sharding_types=usable, compute_kernels=kernels,
                                                 min_partition=sharding.column_shard_dim)
    return constraints


def shard(model: nn.Module, sharding: ShardingConfig | None = None) -> DistributedModelParallel:
    """Plans and shards ``model``'s TorchRec tables over the process group with DMP.

    Example:
        >>> emb = CompressedEmbeddings(specs, device=torch.device("meta"))  # doctest: +SKIP
        >>> TableOptimizer("sgd", lr=0.1).apply(emb)                        # doctest: +SKIP
        >>> model = shard(emb, ShardingConfig({"default": ["column_wise"]}))  # doctest: +SKIP
    """
    init_process_group()
    dev = device()
    constraints = _constraints(model, sharding or ShardingConfig(), dev.type)
    sharders = [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]
    topology = Topology(world_size=dist.get_world_size(), compute_device=dev.type,
                        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())))
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints,
                                       storage_reservation=FixedPercentageStorageReservation(0.15))
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    return DistributedModelParallel(model, device=dev, plan=plan, sharders=sharders)


def sharding_types(model: DistributedModelParallel) -> dict[str, str]:
    """The sharding type the planner chose for each table: {plain table name: type}."""
    return {table: option.sharding_type for plan in model.plan.plan.values()
            for table, option in plan.items()}


def combined_optimizer(model: DistributedModelParallel, table_optimizer: TableOptimizer | None = None,
                       dense: type[torch.optim.Optimizer] = torch.optim.Adam, rows: Sequence[str] = (),
                       **dense_kwargs) -> CombinedOptimizer:
    """The tables' fused optimizer, ``table_optimizer`` for data-parallel tables, and ``dense``
    for every other parameter.

    Args:
        model: the sharded model.
        table_optimizer: the optimizer of data-parallel tables (the one given to
            ``TableOptimizer.apply``) and of the ``rows`` parameters; None trains them with ``dense``.
        dense: the optimizer class of the dense parameters.
        rows: names of dense parameters that hold per-id rows (e.g. MF's ``item_bias``), trained like tables.
        dense_kwargs: its arguments.
    """
    fused = set(model.fused_optimizer.params)
    replicated_tables = {t for t, kind in sharding_types(model).items() if kind == "data_parallel"}
    replicated, dense_params = {}, {}
    for name, parameter in model.named_parameters():
        table = TABLE_KEY.search(name)
        if name in fused or (table and table[1] not in replicated_tables):
            continue  # trained by FBGEMM, or the empty placeholder of a table this rank holds no shard of
        is_rows = table or name.rsplit(".", 1)[-1] in rows
        (replicated if is_rows and table_optimizer is not None else dense_params)[name] = parameter
    optimizers = [model.fused_optimizer]
    for params, make in ((replicated, table_optimizer.build if table_optimizer else None),
                         (dense_params, lambda ps: dense(ps, **dense_kwargs))):
        if params:
            wrapper = KeyedOptimizerWrapper(params, make)
            wrapper.init_state()  # creates the state entries, so a checkpoint can be loaded into them
            optimizers.append(wrapper)
    return CombinedOptimizer(optimizers)


def unsharded(state):
    """A state (nested dicts of tensors, ShardedTensors, DTensors) with every sharded tensor
    assembled into one full tensor, on every rank.

    A collective: every rank calls it. A sharded entry that only some ranks hold (e.g. optimizer
    state of a table-wise table) is assembled and returned on every rank. Each full tensor is
    built on every rank, so mind the memory of large tables.
    """
    flat = _flatten(state)
    sharded = {path: (tuple(v.size()), v.dtype) for path, v in flat.items() if isinstance(v, ShardedTensor)}
    multi = dist.is_initialized() and dist.get_world_size() > 1
    if multi:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sharded)
        sharded = {path: spec for rank_specs in gathered for path, spec in rank_specs.items()}
    result = {}
    for path in sorted(sharded, key=str):
        size, dtype = sharded[path]
        full = torch.zeros(size, dtype=dtype)
        if isinstance(value := flat.get(path), ShardedTensor):
            for shard_ in value.local_shards():
                full[_slices(shard_.metadata)] = shard_.tensor.detach().cpu()
        if multi:
            dist.all_reduce(full)  # shards do not overlap: the sum assembles the table
        result[path] = full
    for path, value in flat.items():
        if path not in result:
            if hasattr(value, "full_tensor"):  # DTensor
                value = value.full_tensor()
            result[path] = value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value
    return _unflatten(result)


def _flatten(state, prefix: tuple = ()) -> dict[tuple, object]:
    if isinstance(state, dict):
        return {path: v for k, value in state.items() for path, v in _flatten(value, (*prefix, k)).items()}
    return {prefix: state}


def _unflatten(flat: dict[tuple, object]):
    if () in flat:
        return flat[()]
    nested: dict = {}
    for path, value in flat.items():
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return nested


def load_unsharded(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copies full tensors (e.g. an unsharded model's ``state_dict()``) into ``model``'s state in
    place: each local shard of a sharded table receives its slice, other tensors are copied whole.

    Raises:
        ConfigError: a key of ``model``'s state is missing from ``state`` or shapes differ.
    """
    with torch.no_grad():
        for key, target in model.state_dict().items():
            if key not in state:
                raise ConfigError(f"load_unsharded: '{key}' is missing from the given state")
            source = state[key]
            if tuple(source.shape) != tuple(target.shape):
                raise ConfigError(f"load_unsharded: '{key}' has shape {tuple(source.shape)}, the model expects "
                                  f"{tuple(target.shape)}")
            if isinstance(target, ShardedTensor):
                for shard_ in target.local_shards():
                    shard_.tensor.copy_(source[_slices(shard_.metadata)])
            else:
                target.copy_(source)


def _slices(metadata) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(metadata.shard_offsets, metadata.shard_sizes))
