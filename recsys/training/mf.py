"""Two-tower retrieval training (BPR or in-batch sampled softmax) on sharded TorchRec tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from recsys.data.batching import ParquetBatches, interactions_to_batch, jagged
from recsys.data.dataset import PreparedData
from recsys.data.schemas import ITEM, USER
from recsys.embeddings.collection import EmbeddingSettings
from recsys.embeddings.spec import TableStats
from recsys.errors import ConfigError
from recsys.inference.package import stats_tensors
from recsys.models.mf import FAMILY, NEG_ITEM, MatrixFactorization
from recsys.training.distributed import (ShardedTask, ShardingConfig, TableOptimizer, combined_optimizer, optimise,
                                         init_process_group, rank_and_world, rank_share, shard)
from recsys.training.loop import TrainerConfig
from recsys.training.losses import bpr_loss, in_batch_softmax_loss
from recsys.training.sampling import NegativeSampler

FEATURES = [USER, ITEM, NEG_ITEM]


@dataclass
class Negatives:
    """Negative sampling of BPR.

    Args:
        distribution: ``uniform`` or ``popularity``.
        num: negatives per positive (each makes one BPR triple).
        exponent: popularity exponent.
    """

    distribution: Literal["uniform", "popularity"] = "uniform"
    num: int = 1
    exponent: float = 1.0


class MFRetrieval(ShardedTask):
    """Matrix factorization trained with BPR or in-batch softmax; implements ``Trainable``.

    Args:
        data: a prepared interactions dataset.
        trainer: loop settings (batch size, seed).
        dim: embedding dimension D.
        loss: ``bpr`` (sampled negatives) or ``softmax`` (in-batch negatives, logQ-corrected).
        negatives: BPR negative sampling.
        table_optimizer: FBGEMM fused optimizer of the tables.
        temperature: softmax temperature.
        embedding: how the user and item tables are stored (compression per table).
        sharding: table placement.

    Example:
        >>> task = MFRetrieval(PreparedData.open("data/prepared/synthetic"), TrainerConfig(), dim=32)  # doctest: +SKIP
        >>> task.train_epoch(0, None)["loss"]  # doctest: +SKIP
    """

    supports_distributed = True  # trainer.distributed=true: each rank trains on its share of the batches

    def __init__(self, data: PreparedData, trainer: TrainerConfig, dim: int = 64,
                 loss: Literal["bpr", "softmax"] = "bpr", negatives: Negatives | None = None,
                 table_optimizer: TableOptimizer | None = None, temperature: float = 1.0,
                 embedding: EmbeddingSettings | None = None, sharding: ShardingConfig | None = None):
        if loss not in ("bpr", "softmax"):
            raise ConfigError(f"model.loss must be 'bpr' or 'softmax', got {loss!r}")
        if data.kind != "interactions":
            raise ConfigError(f"MF needs an interactions dataset; {data.root} holds {data.kind!r}")
        init_process_group(trainer.distributed)  # fails early when the launch does not match trainer.distributed
        self.data, self.trainer, self.loss, self.temperature = data, trainer, loss, temperature
        self.negatives = negatives or Negatives()
        graph = data.graph("train")  # the training split, read once: counts come from its edges
        counts = np.bincount(graph.items, minlength=data.n_items)
        self.sampler = NegativeSampler(counts, self.negatives.distribution, self.negatives.exponent)
        self.popularity = NegativeSampler(counts, "popularity")
        torch.manual_seed(trainer.seed)
        stats = {USER: TableStats(np.bincount(graph.users, minlength=data.n_users), data.clusters(USER), graph, "user"),
                 ITEM: TableStats(counts, data.clusters(ITEM), graph, "item")}
        self.dim, self.settings, self.stats = dim, embedding or EmbeddingSettings(), stats
        model = MatrixFactorization.build(data.n_users, data.n_items, dim, self.settings, stats, torch.device("meta"))
        self.embeddings = model.embeddings
        table_optimizer = table_optimizer or TableOptimizer()
        table_optimizer.apply(self.embeddings)
        self.model = shard(model, sharding)
        self.optimizer = combined_optimizer(self.model, table_optimizer)

    def train_epoch(self, epoch: int, progress: tqdm | None) -> dict[str, float]:
        self.model.train()
        self._items = None
        seed = self.trainer.epoch_seed(epoch)
        rank, world = rank_and_world()
        generator = torch.Generator().manual_seed(seed + rank * 1_000_000_007)  # ranks sample different negatives
        batches = ParquetBatches(self.data.path("train"), interactions_to_batch, self.trainer.batch_size,
                                 self.trainer.shuffle_buffer, seed, self.trainer.prefetch)
        if len(batches) < world:
            raise ConfigError(f"the training split has {len(batches)} batches of trainer.batch_size="
                              f"{self.trainer.batch_size}, fewer than the {world} ranks; lower trainer.batch_size")
        if progress is not None:
            progress.reset(total=len(batches) // world)
        losses = ((self._loss(batch.sparse[USER].values(), batch.sparse[ITEM].values(), generator), len(batch))
                  for batch in rank_share(batches, len(batches)))
        return optimise(losses, self.optimizer, self.embeddings, progress)

    def _loss(self, users: torch.Tensor, items: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.loss == "bpr":
            users, items = users.repeat(self.negatives.num), items.repeat(self.negatives.num)
            negatives = self.sampler.sample(len(users), generator)
            out = self.model(jagged(FEATURES, [users, items, negatives]))
            return bpr_loss(MatrixFactorization.score(out[USER], out[ITEM]),
                            MatrixFactorization.score(out[USER], out[NEG_ITEM]))
        out = self.model(jagged(FEATURES[:2], [users, items]))
        return in_batch_softmax_loss(out[USER], out[ITEM], items, self.popularity.log_probabilities[items],
                                     self.temperature)

    def export(self) -> tuple[str, dict, dict[str, torch.Tensor]]:
        """Family, build arguments and tensors of a model package (see ``recsys.inference``)."""
        settings, tensors = self.served_model()
        return FAMILY, {"dim": self.dim, "settings": settings}, {**tensors, **stats_tensors(self.stats, self.embeddings)}

    @torch.no_grad()
    def embed(self, feature: str, ids: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """(n,) ids of ``feature`` -> (n, D) embeddings, computed in chunks."""
        self.model.eval()
        parts = [self.model(jagged([feature], [ids[i:i + chunk]]))[feature] for i in range(0, len(ids), chunk)]
        return torch.cat(parts)

    @torch.no_grad()
    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        if self._items is None:
            self._items = self.embed(ITEM, torch.arange(self.data.n_items))
        return self.embed(USER, users) @ self._items.T
