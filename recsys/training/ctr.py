"""Click-through-rate training (DLRM, DCN-V2, DeepFM) on sharded TorchRec tables, binary cross-entropy on logits."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn
from tqdm.auto import tqdm

from recsys.data.batching import Batch, CTRBatcher, ParquetBatches, jagged
from recsys.data.dataset import PreparedData
from recsys.data.schemas import CTRSchema
from recsys.embeddings.collection import CompressedEmbeddings, EmbeddingSettings
from recsys.embeddings.full import Full
from recsys.embeddings.memory import TABLE_KEY
from recsys.embeddings.spec import TableSpec, TableStats
from recsys.errors import ConfigError
from recsys.inference.package import to_config
from recsys.models.ctr import FAMILY
from recsys.models.ctr.fields import FIRST_ORDER_SUFFIX, FIRST_ORDER_WIDTH, field_specs
from recsys.models.settings import check, is_int, is_number
from recsys.training.distributed import (ShardedTask, ShardingConfig, TableOptimizer, all_sum, backward, combined_optimizer,
                                         device, init_process_group, rank_and_world, rank_share, shard)
from recsys.training.loop import TrainerConfig
from recsys.training.losses import binary_cross_entropy

DENSE_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
                    "adagrad": torch.optim.Adagrad}


@dataclass
class DenseOptimizer:
    """The optimizer of the dense parameters (MLPs, cross layers, combiners of compressed tables).

    Args:
        name: adam, adamw (decoupled weight decay), sgd or adagrad.
        lr: learning rate.
        weight_decay: L2 penalty (adamw: decoupled decay).
    """

    name: Literal["adam", "adamw", "sgd", "adagrad"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0

    def __post_init__(self):
        check(self.name in DENSE_OPTIMIZERS, "dense_optimizer.name", self.name, f"one of {sorted(DENSE_OPTIMIZERS)}")
        check(is_number(self.lr) and self.lr > 0, "dense_optimizer.lr", self.lr, "a number > 0")
        check(is_number(self.weight_decay) and self.weight_decay >= 0, "dense_optimizer.weight_decay",
              self.weight_decay, "a number >= 0")


@dataclass
class LRSchedule:
    """A factor on the learning rates at each training step (recomputed from the step, so resumes agree).

    The factor is a linear warmup (step + 1) / warmup_steps over the first ``warmup_steps`` steps,
    times ``constant``: 1; ``cosine``: min_factor + (1 - min_factor) (1 + cos(pi t)) / 2 with t
    going from 0 after the warmup to 1 at the last step of ``trainer.epochs``; ``step``:
    gamma ** (epoch // step_epochs). It multiplies the dense optimizer's learning rate and, with
    ``tables``, the tables' (TorchRec's fused optimizer hands its ``lr`` to FBGEMM at every
    ``zero_grad``/``step``; data-parallel tables' optimizer too).

    Args:
        kind: constant, cosine or step.
        warmup_steps: steps of linear warmup (0 = none).
        min_factor: the cosine's final factor.
        step_epochs: epochs between two decays of ``step``.
        gamma: the decay factor of ``step``.
        tables: also schedule the tables' learning rate.

    Example:
        >>> LRSchedule("cosine", warmup_steps=10).factor(step=4, total=110, steps_per_epoch=11)
        0.5
    """

    kind: Literal["constant", "cosine", "step"] = "constant"
    warmup_steps: int = 0
    min_factor: float = 0.0
    step_epochs: int = 1
    gamma: float = 0.5
    tables: bool = True

    def __post_init__(self):
        check(self.kind in ("constant", "cosine", "step"), "lr_schedule.kind", self.kind, "constant, cosine or step")
        check(is_int(self.warmup_steps, 0), "lr_schedule.warmup_steps", self.warmup_steps, "an integer >= 0")
        check(is_number(self.min_factor) and 0 <= self.min_factor <= 1, "lr_schedule.min_factor", self.min_factor,
              "a number in [0, 1]")
        check(is_int(self.step_epochs), "lr_schedule.step_epochs", self.step_epochs, "an integer >= 1")
        check(is_number(self.gamma) and 0 < self.gamma <= 1, "lr_schedule.gamma", self.gamma, "a number in (0, 1]")

    def factor(self, step: int, total: int, steps_per_epoch: int) -> float:
        """The factor at 0-based ``step`` of ``total`` training steps."""
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.kind == "cosine":
            t = min(1.0, max(0.0, (step - self.warmup_steps) / max(1, total - 1 - self.warmup_steps)))
            return warmup * (self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * t)))
        if self.kind == "step":
            return warmup * self.gamma ** (step // (steps_per_epoch * self.step_epochs))
        return warmup


def field_counts(path: str | Path, schema: CTRSchema, vocab_sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """Per-id training counts of every sparse field of a prepared split (multi-valued: every id of a cell).

    Streams the file by row group, so memory is bounded by one row group plus the counts.
    """
    counts = {f: np.zeros(vocab_sizes[f], dtype=np.int64) for f in schema.sparse_features}
    for rows in pq.ParquetFile(path).iter_batches(columns=list(schema.sparse_features)):
        for field in schema.sparse_features:
            column = rows.column(field)
            ids = pc.list_flatten(column) if field in schema.multi_valued else column
            counts[field] += np.bincount(ids.to_numpy(zero_copy_only=False), minlength=vocab_sizes[field])
    return counts


def _collection(specs: list[TableSpec], settings: EmbeddingSettings, counts: dict[str, np.ndarray],
                compress_min_rows: int, device: torch.device | None = None) -> CompressedEmbeddings:
    """The tables of ``specs`` on the meta device; tables under ``compress_min_rows`` rows stay full
    unless ``settings.tables`` names them."""
    specs = [replace(s, compression=Full()) if s.num_embeddings < compress_min_rows and s.name not in settings.tables
             else s for s in specs]
    stats = {s.name: TableStats(counts=counts[s.feature_names[0]]) for s in specs}
    return CompressedEmbeddings(specs, settings, stats, device=device)


def _first_order_settings(settings: EmbeddingSettings, first_order: str) -> EmbeddingSettings:
    """Full first-order tables, or the fields' compression (per-table overrides renamed to ``<field>_linear``)."""
    if first_order == "full":
        return EmbeddingSettings(init_scale=settings.init_scale)
    tables = {f"{k}{FIRST_ORDER_SUFFIX}": v for k, v in settings.tables.items()}
    return replace(settings, tables=tables)


def ctr_network(model: Callable[..., nn.Module], schema: CTRSchema, vocab_sizes: dict[str, int],
                counts: dict[str, np.ndarray], settings: EmbeddingSettings, dim: int, first_order: str = "none",
                multi_valued_pooling: str = "mean", compress_min_rows: int = 200, device: torch.device | None = None
                ) -> tuple[nn.Module, CompressedEmbeddings, CompressedEmbeddings | None]:
    """The network ``model(embeddings, n_dense=..., [first_order=...])`` with one table per sparse field (stored as
    ``settings`` says, tables under ``compress_min_rows`` kept full), its field collection and its first-order
    collection (or None). ``CTRTask`` trains it; a model package rebuilds it from the same arguments."""
    embeddings = _collection(field_specs(schema, vocab_sizes, dim, multi_valued_pooling), settings, counts,
                             compress_min_rows, device)
    first = None
    if first_order != "none":
        specs = field_specs(schema, vocab_sizes, FIRST_ORDER_WIDTH, multi_valued_pooling, FIRST_ORDER_SUFFIX)
        first = _collection(specs, _first_order_settings(settings, first_order), counts, compress_min_rows, device)
    extra = {"first_order": first} if "first_order" in inspect.signature(model).parameters else {}
    return model(embeddings, n_dense=len(schema.dense), **extra), embeddings, first


class CTRTask(ShardedTask):
    """A CTR model trained with binary cross-entropy on logits; implements ``Trainable`` (``predict``).

    Every sparse field gets one table of width D (``dim``), stored as ``embedding`` says and sharded
    as ``sharding`` says; FBGEMM's fused ``table_optimizer`` updates the rows, ``dense_optimizer``
    the rest, both scaled by ``lr_schedule``. Batches stream from the train split (shuffle buffer,
    background prefetch); on several ranks each rank trains on a disjoint share of them.

    Args:
        data: a prepared CTR dataset.
        trainer: loop settings (batch size, seed, epochs for the schedule).
        model: the network factory, called as ``model(embeddings, n_dense=...)`` (plus
            ``first_order=`` for models that take it, e.g. DeepFM): a ``_partial_`` module from the yaml.
        dim: embedding dimension D (FBGEMM's fused kernels need a multiple of 4).
        table_optimizer: FBGEMM fused optimizer of the tables.
        dense_optimizer: optimizer of the dense parameters.
        lr_schedule: learning-rate factor per step.
        first_order: first-order tables (FIRST_ORDER_WIDTH wide, one per field) for models that use
            them: ``full`` (stored in full), ``compressed`` (stored as ``embedding`` says: methods that keep
            the width, i.e. the hashing family, quotient_remainder, compositional), or ``none``.
        multi_valued_pooling: ``mean`` or ``sum`` over the ids of a multi-valued cell.
        compress_min_rows: tables with fewer rows stay full whatever ``embedding.default`` says (as DLRM's
            ``--qr-threshold``); 0 compresses every table. Tables named in ``embedding.tables`` follow it.
        embedding_l2: weight of the penalty sum_f mean_b ||e_f(b)||^2 on each training batch's looked-up
            field embeddings (the batch's rows only: FBGEMM's fused kernels see nothing else).
        embedding: how the tables are stored (compression per table).
        sharding: table placement.

    Example:
        >>> task = CTRTask(PreparedData.open("data/prepared/frappe"), TrainerConfig(),  # doctest: +SKIP
        ...                partial(DeepFM, deep=[400, 400]), first_order="full")
        >>> task.train_epoch(0, None)["loss"]  # doctest: +SKIP
    """

    supports_distributed = True  # trainer.distributed=true: each rank trains on its share of the batches

    def __init__(self, data: PreparedData, trainer: TrainerConfig, model: Callable[..., nn.Module], dim: int = 16,
                 table_optimizer: TableOptimizer | None = None, dense_optimizer: DenseOptimizer | None = None,
                 lr_schedule: LRSchedule | None = None, first_order: Literal["none", "full", "compressed"] = "none",
                 multi_valued_pooling: Literal["mean", "sum"] = "mean", compress_min_rows: int = 200,
                 embedding_l2: float = 0.0, embedding: EmbeddingSettings | None = None,
                 sharding: ShardingConfig | None = None):
        if data.kind != "ctr":
            raise ConfigError(f"CTR models need a CTR dataset; {data.root} holds {data.kind!r}")
        check(is_int(dim), "dim", dim, "an integer >= 1")
        check(first_order in ("none", "full", "compressed"), "first_order", first_order, "none, full or compressed")
        check(is_int(compress_min_rows, 0), "compress_min_rows", compress_min_rows, "an integer >= 0")
        check(is_number(embedding_l2) and embedding_l2 >= 0, "embedding_l2", embedding_l2, "a number >= 0")
        schema, settings = data.ctr_schema, embedding or EmbeddingSettings()
        if not schema.sparse_features:
            raise ConfigError(f"{data.root} has no sparse features; the CTR models embed at least one")
        takes_first_order = "first_order" in inspect.signature(model).parameters
        if first_order != "none" and not takes_first_order:
            raise ConfigError(f"model.first_order={first_order!r} is invalid: the model takes no first-order tables; "
                              "use none")
        init_process_group(trainer.distributed)  # fails early when the launch does not match trainer.distributed
        self.data, self.trainer, self.schedule = data, trainer, lr_schedule or LRSchedule()
        self.embedding_l2, self._looked_up = float(embedding_l2), None
        self.to_batch = CTRBatcher(schema)
        self.counts = field_counts(data.path("train"), schema, data.vocab_sizes)
        torch.manual_seed(trainer.seed)
        self.build = {"dim": dim, "first_order": first_order, "multi_valued_pooling": multi_valued_pooling,
                      "compress_min_rows": compress_min_rows}
        self.network_factory, self.settings = model, settings
        network, self.embeddings, self.first_order = ctr_network(model, schema, data.vocab_sizes, self.counts, settings,
                                                                 **self.build, device=torch.device("meta"))
        if self.embedding_l2:
            self.embeddings.register_forward_hook(self._keep_lookups)
        table_optimizer = table_optimizer or TableOptimizer()
        table_optimizer.apply(network)
        self.model = shard(network, sharding)
        dense = dense_optimizer or DenseOptimizer()
        self.optimizer = combined_optimizer(self.model, table_optimizer, DENSE_OPTIMIZERS[dense.name], lr=dense.lr,
                                            weight_decay=dense.weight_decay)
        self._groups = [(group, group["lr"], table) for _, optimizer in self.optimizer.optimizers
                        for table in [optimizer is self.model.fused_optimizer
                                      or all(TABLE_KEY.search(name) for name in optimizer.params)]
                        for group in optimizer.param_groups]

    def _keep_lookups(self, module: nn.Module, inputs, output: dict[str, torch.Tensor]) -> None:
        """Keeps the field embeddings of a training forward for the L2 penalty."""
        if module.training:
            self._looked_up = output

    def _penalty(self) -> torch.Tensor | None:
        """embedding_l2 * sum_f mean_b ||e_f(b)||^2 of the last training forward, or None."""
        if not self.embedding_l2 or self._looked_up is None:
            return None
        looked_up, self._looked_up = self._looked_up, None
        return self.embedding_l2 * sum(v.pow(2).sum(1).mean() for v in looked_up.values())

    def _set_lr(self, step: int, total: int, steps_per_epoch: int) -> None:
        factor = self.schedule.factor(step, total, steps_per_epoch)
        for group, base, table in self._groups:
            group["lr"] = base * factor if self.schedule.tables or not table else base

    def train_epoch(self, epoch: int, progress: tqdm | None) -> dict[str, float]:
        self.model.train()
        seed = self.trainer.epoch_seed(epoch)
        rank, world = rank_and_world()
        torch.manual_seed(seed + rank * 1_000_000_007)  # dropout masks: per epoch and rank, the same on a resume
        batches = ParquetBatches(self.data.path("train"), self.to_batch, self.trainer.batch_size,
                                 self.trainer.shuffle_buffer, seed, self.trainer.prefetch)
        steps = len(batches) // world
        if steps == 0:
            raise ConfigError(f"the training split has {len(batches)} batches of trainer.batch_size="
                              f"{self.trainer.batch_size}, fewer than the {world} ranks; lower trainer.batch_size")
        if progress is not None:
            progress.reset(total=steps)
        total, count = 0.0, 0
        for step, batch in enumerate(rank_share(batches, len(batches))):
            self._set_lr(epoch * steps + step, self.trainer.epochs * steps, steps)
            total, count = total + self.train_step(batch) * len(batch), count + len(batch)
            if progress is not None:
                progress.update()
                progress.set_postfix(loss=f"{total / count:.4f}")
        total, count = all_sum([total, count])
        return {"loss": total / max(count, 1)}

    def train_step(self, batch: Batch) -> float:
        """One optimizer step on a Batch (at the learning rates last set); returns its cross-entropy."""
        self.model.train()
        self.optimizer.zero_grad()  # also hands the scheduled lr to FBGEMM before this step's backward
        batch = batch.to(device())
        loss = binary_cross_entropy(self.model(batch.sparse, batch.dense), batch.labels)
        value = loss.item()
        for extra in (self._penalty(), *(c.auxiliary_loss() for c in self.collections())):
            if extra is not None:
                loss = loss + extra
        backward(loss)
        self.optimizer.step()
        return value

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        """(B,) logits of a Batch, in evaluation mode (no dropout)."""
        self.model.eval()
        batch = batch.to(device())
        return self.model(batch.sparse, batch.dense)

    def predict(self, batch: Batch) -> torch.Tensor:
        """(B,) click probabilities sigmoid(logits) of a Batch."""
        return torch.sigmoid(self.logits(batch))

    @torch.no_grad()
    def embed(self, feature: str, ids: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """(n,) ids of sparse field ``feature`` -> its (n, D) embeddings, in chunks (e.g. to export a vq_e2e table)."""
        self.model.eval()
        ids = ids.cpu()
        return torch.cat([self.embeddings(jagged([feature], [ids[i:i + chunk]]).to(device()))[feature]
                          for i in range(0, len(ids), chunk)])

    def export(self) -> tuple[str, dict, dict[str, torch.Tensor]]:
        """Family, build arguments and tensors of a model package (see ``recsys.inference``)."""
        settings, tensors = self.served_model()
        build = {**self.build, "model": to_config(self.network_factory), "settings": settings}
        counts = {f"stats.{f}.counts": torch.from_numpy(c.astype(np.int64)) for f, c in self.counts.items()}
        return FAMILY, build, {**tensors, **counts}

    def collections(self) -> list[CompressedEmbeddings]:
        return [c for c in (self.embeddings, self.first_order) if c is not None]
