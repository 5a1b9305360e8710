"""Matrix factorization training (BPR, in-batch or sampled softmax, SimpleX's CCL) on sharded TorchRec tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torchrec import KeyedJaggedTensor
from tqdm.auto import tqdm

from recsys.data.batching import ParquetBatches, interactions_to_batch, jagged
from recsys.data.dataset import PreparedData
from recsys.data.schemas import ITEM, USER
from recsys.embeddings.collection import EmbeddingSettings
from recsys.embeddings.memory import tensor_bytes
from recsys.embeddings.spec import TableStats
from recsys.errors import ConfigError
from recsys.inference.package import stats_tensors
from recsys.models.mf import FAMILY, NEG_ITEM, MatrixFactorization, as_scored
from recsys.models.settings import check, is_int, is_number
from recsys.training.distributed import (ShardedTask, ShardingConfig, TableOptimizer, combined_optimizer, optimise,
                                         init_process_group, rank_and_world, rank_share, shard)
from recsys.training.loop import TrainerConfig
from recsys.training.losses import bpr_loss, cosine_contrastive_loss, in_batch_softmax_loss, sampled_softmax_loss
from recsys.training.sampling import NegativeSampler

FEATURES = [USER, ITEM, NEG_ITEM]
LOSSES = ("bpr", "softmax", "sampled_softmax", "simplex")


@dataclass
class Negatives:
    """Negative sampling of BPR, the sampled softmax and SimpleX (unused by the in-batch softmax).

    Args:
        distribution: ``uniform`` or ``popularity`` (probability ∝ count ** exponent).
        num: BPR: negatives per positive (each makes one BPR triple); ``sampled_softmax`` and ``simplex``: M, the
            negatives drawn per batch and shared by all its rows.
        exponent: popularity exponent.
    """

    distribution: Literal["uniform", "popularity"] = "uniform"
    num: int = 1
    exponent: float = 1.0


class MFRetrieval(ShardedTask):
    """Matrix factorization trained with one of ``LOSSES``; implements ``Trainable``.

    Losses: ``bpr`` (sampled negatives); ``softmax`` (in-batch negatives, logQ-corrected by popularity);
    ``sampled_softmax`` (each row's positive against M negatives drawn per batch from ``negatives`` and shared by
    the batch; positive and negatives logQ-corrected by that sampler's log-probabilities, as Jean et al. 2015 and
    TensorFlow's ``sampled_softmax_loss``; accidental hits masked); ``simplex`` (SimpleX's cosine contrastive
    loss over M shared negatives, ``cosine_contrastive_loss``). A ``simplex`` model ranks by cosine similarity:
    evaluation, the package (``similarity: cosine``) and serving all score unit-length user and item vectors.

    Args:
        data: a prepared interactions dataset.
        trainer: loop settings (batch size, seed).
        dim: embedding dimension D.
        loss: one of ``LOSSES``.
        negatives: negative sampling of ``bpr``, ``sampled_softmax`` and ``simplex``.
        table_optimizer: FBGEMM fused optimizer of the tables.
        temperature: temperature of both softmax losses.
        margin: ``simplex``: negatives with cosine below it cost nothing, in [-1, 1).
        negative_weight: ``simplex``: weight of the mean negative term, > 0.
        item_bias: learn a per-item bias added to the scores (``MatrixFactorization``), trained by
            ``table_optimizer``; not with ``simplex`` (cosine scores).
        embedding: how the user and item tables are stored (compression per table).
        sharding: table placement.

    Example:
        >>> task = MFRetrieval(PreparedData.open("data/prepared/synthetic"), TrainerConfig(), dim=32)  # doctest: +SKIP
        >>> task.train_epoch(0, None)["loss"]  # doctest: +SKIP
    """

    supports_distributed = True  # trainer.distributed=true: each rank trains on its share of the batches

    def __init__(self, data: PreparedData, trainer: TrainerConfig, dim: int = 64,
                 loss: Literal["bpr", "softmax", "sampled_softmax", "simplex"] = "bpr",
                 negatives: Negatives | None = None, table_optimizer: TableOptimizer | None = None,
                 temperature: float = 1.0, margin: float = 0.5, negative_weight: float = 10.0, item_bias: bool = False,
                 embedding: EmbeddingSettings | None = None, sharding: ShardingConfig | None = None):
        negatives = negatives or Negatives()
        check(loss in LOSSES, "loss", loss, f"one of {list(LOSSES)}")
        check(is_int(negatives.num), "negatives.num", negatives.num, "an integer >= 1")
        check(is_number(temperature) and temperature > 0, "temperature", temperature, "a number > 0")
        check(is_number(margin) and -1 <= margin < 1, "margin", margin, "a cosine in [-1, 1)")
        check(is_number(negative_weight) and negative_weight > 0, "negative_weight", negative_weight, "a number > 0")
        check(isinstance(item_bias, bool), "item_bias", item_bias, "true or false")
        if item_bias and loss == "simplex":
            raise ConfigError("item_bias does not apply to loss=simplex: it scores cosine similarities, which a bias "
                              "would shift out of [-1, 1]; set item_bias=false")
        if data.kind != "interactions":
            raise ConfigError(f"MF needs an interactions dataset; {data.root} holds {data.kind!r}")
        init_process_group(trainer.distributed)  # fails early when the launch does not match trainer.distributed
        self.data, self.trainer, self.loss, self.temperature = data, trainer, loss, temperature
        self.negatives, self.margin, self.negative_weight = negatives, margin, negative_weight
        self.similarity = "cosine" if loss == "simplex" else "dot"
        graph = data.graph("train")  # the training split, read once: counts come from its edges
        counts = np.bincount(graph.items, minlength=data.n_items)
        self.sampler = NegativeSampler(counts, self.negatives.distribution, self.negatives.exponent)
        self.popularity = NegativeSampler(counts, "popularity")
        torch.manual_seed(trainer.seed)
        stats = {USER: TableStats(np.bincount(graph.users, minlength=data.n_users), data.clusters(USER), graph, "user"),
                 ITEM: TableStats(counts, data.clusters(ITEM), graph, "item")}
        self.dim, self.settings, self.stats = dim, embedding or EmbeddingSettings(), stats
        model = MatrixFactorization.build(data.n_users, data.n_items, dim, self.settings, stats, torch.device("meta"),
                                          item_bias)
        self.embeddings, self.item_bias = model.embeddings, model.item_bias
        table_optimizer = table_optimizer or TableOptimizer()
        table_optimizer.apply(self.embeddings)
        self.model = shard(model, sharding)
        self.optimizer = combined_optimizer(self.model, table_optimizer, rows=["item_bias"])

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
            return bpr_loss(MatrixFactorization.score(out[USER], out[ITEM]) + self._bias(items),
                            MatrixFactorization.score(out[USER], out[NEG_ITEM]) + self._bias(negatives))
        if self.loss == "softmax":
            out = self.model(jagged(FEATURES[:2], [users, items]))
            return in_batch_softmax_loss(out[USER], out[ITEM], items, self._offset(self.popularity, items),
                                         self.temperature)
        negatives = self.sampler.sample(self.negatives.num, generator)
        user, positive, negative = self._shared_lookup(users, items, negatives)
        if self.loss == "sampled_softmax":
            return sampled_softmax_loss(user, positive, negative, items, negatives,  # logQ of the negatives' sampler
                                        (self._offset(self.sampler, items), self._offset(self.sampler, negatives)),
                                        self.temperature)
        return cosine_contrastive_loss(user, positive, negative, items, negatives, self.margin, self.negative_weight)

    def _bias(self, items: torch.Tensor) -> torch.Tensor | float:
        return 0.0 if self.item_bias is None else self.model.module.bias(items)

    def _offset(self, sampler: NegativeSampler, items: torch.Tensor) -> torch.Tensor:
        """What the softmax losses subtract from the logits ``u . v / T``: the sampler's log-probability, minus
        ``b / T`` with an item bias, so that the logits are ``(u . v + b) / T - log q``."""
        return sampler.log_probabilities[items] - self._bias(items) / self.temperature

    def _shared_lookup(self, users: torch.Tensor, items: torch.Tensor, negatives: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, D) users, (B, D) positives and (M, D) negatives from one forward: a KJT of stride max(B, M) whose
        shorter features end in empty bags (one lookup per step, as the fused optimizer and VQ's auxiliary loss
        expect)."""
        b, m = len(users), len(negatives)
        lengths = torch.zeros(3, max(b, m), dtype=torch.int32)
        lengths[:2, :b], lengths[2, :m] = 1, 1
        out = self.model(KeyedJaggedTensor.from_lengths_sync(FEATURES, torch.cat([users, items, negatives]),
                                                             lengths.flatten()))
        return out[USER][:b], out[ITEM][:b], out[NEG_ITEM][:m]

    def export(self) -> tuple[str, dict, dict[str, torch.Tensor]]:
        """Family, build arguments and tensors of a model package (see ``recsys.inference``)."""
        settings, tensors = self.served_model()
        build = {"dim": self.dim, "settings": settings, "similarity": self.similarity,
                 "item_bias": self.item_bias is not None}
        return FAMILY, build, {**tensors, **stats_tensors(self.stats, self.embeddings)}

    @torch.no_grad()
    def embed(self, feature: str, ids: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """(n,) ids of ``feature`` -> (n, D) embeddings, computed in chunks."""
        self.model.eval()
        parts = [self.model(jagged([feature], [ids[i:i + chunk]]))[feature] for i in range(0, len(ids), chunk)]
        return torch.cat(parts)

    @torch.no_grad()
    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        if self._items is None:
            self._items = as_scored(self.embed(ITEM, torch.arange(self.data.n_items)), self.similarity)
        return as_scored(self.embed(USER, users), self.similarity) @ self._items.T + self._bias(slice(None))

    def memory(self) -> dict[str, int]:
        """Bytes per table; the item bias counts with the item table."""
        return {t: b + (tensor_bytes(self.item_bias) if t == ITEM and self.item_bias is not None else 0)
                for t, b in super().memory().items()}

    def memory_parts(self) -> dict[str, int]:
        bias = {} if self.item_bias is None else {f"{ITEM}/parameter/item_bias": tensor_bytes(self.item_bias)}
        return super().memory_parts() | bias
