"""ComiRec training (Cen et al., KDD 2020): next-item samples, hard interest readout, shared sampled softmax."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torchrec import KeyedJaggedTensor
from tqdm.auto import tqdm

from recsys.data.dataset import PreparedData
from recsys.data.schemas import ITEM
from recsys.embeddings.collection import EmbeddingSettings
from recsys.embeddings.spec import TableStats
from recsys.errors import ConfigError
from recsys.inference.package import stats_tensors, to_config
from recsys.models.multi_interest import FAMILY, HISTORY, NEG_ITEM, DynamicRouting, MultiInterest, SelfAttention
from recsys.models.settings import check, is_int, is_number
from recsys.training.distributed import (ShardedTask, ShardingConfig, TableOptimizer, combined_optimizer, optimise,
                                         init_process_group, rank_and_world, rank_share, shard)
from recsys.training.loop import TrainerConfig
from recsys.training.losses import sampled_softmax_loss
from recsys.training.sampling import NegativeSampler


@dataclass
class SharedNegatives:
    """Negatives of the sampled softmax: ``num`` items drawn per batch and shared by all its rows.

    Args:
        distribution: ``uniform`` or ``popularity`` (logQ-corrected in the loss).
        num: negatives per batch (M).
        exponent: popularity exponent.
    """

    distribution: Literal["uniform", "popularity"] = "uniform"
    num: int = 1000
    exponent: float = 1.0

    def __post_init__(self):
        check(self.distribution in ("uniform", "popularity"), "negatives.distribution", self.distribution,
              "'uniform' or 'popularity'")
        check(is_int(self.num), "negatives.num", self.num, "an integer >= 1")
        check(is_number(self.exponent) and self.exponent >= 0, "negatives.exponent", self.exponent, "a number >= 0")


def recent_histories(indptr: np.ndarray, items: np.ndarray, users: np.ndarray, ends: np.ndarray,
                     max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """The up-to-``max_length`` items before position ``ends[b]`` of user ``users[b]``, most recent first.

    Args:
        indptr: (n_users + 1,) CSR offsets of the time-ordered ``items`` (``PreparedData.sequences``).
        items: every user's items in time order.
        users: (B,) user indices.
        ends: (B,) positions within each user's sequence; items before it form the history.
        max_length: longest history kept.

    Returns:
        (values, lengths): the histories concatenated (most recent first) and their (B,) lengths.

    Example:
        >>> recent_histories(np.array([0, 4]), np.array([5, 6, 7, 8]), np.array([0]), np.array([3]), 2)
        (array([7, 6]), array([2]))
    """
    lengths = np.minimum(ends, max_length).astype(np.int64)
    latest = indptr[users] + ends - 1
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return items[np.repeat(latest, lengths) - within], lengths


class ComiRec(ShardedTask):
    """ComiRec-DR / ComiRec-SA trained on next-item samples; implements ``Trainable``.

    Each (user, position t >= 1) of the time-ordered training sequences is a sample: the
    history is the up-to-``max_length`` items before t, the target is the item at t. The interest
    with the largest inner product with the target is read out (hard readout) and trained with a
    sampled softmax over negatives shared by the batch. One item table (any compression) embeds
    histories, targets and negatives; FBGEMM's fused optimizer trains it, Adam the extractor.
    A user's score of item i is max_k v_k . e_i, the ranking of the paper's aggregation at lambda 0.

    Args:
        data: a prepared interactions dataset (with timestamps for a meaningful order).
        trainer: loop settings (batch size, seed).
        extractor: ``DynamicRouting`` (ComiRec-DR) or ``SelfAttention`` (ComiRec-SA) settings.
        dim: embedding dimension D.
        max_length: longest history L.
        negatives: the shared sampled negatives.
        temperature: softmax temperature.
        dense_lr: Adam learning rate of the dense parameters (the extractor, a compression's combiner).
        table_optimizer: FBGEMM fused optimizer of the item table.
        embedding: how the item table is stored (compression).
        sharding: table placement.

    Example:
        >>> data = PreparedData.open("data/prepared/ml100k")  # doctest: +SKIP
        >>> task = ComiRec(data, TrainerConfig(), DynamicRouting())  # doctest: +SKIP
        >>> task.train_epoch(0, None)["loss"]  # doctest: +SKIP
    """

    supports_distributed = True  # trainer.distributed=true: each rank trains on its share of the batches

    def __init__(self, data: PreparedData, trainer: TrainerConfig, extractor: DynamicRouting | SelfAttention,
                 dim: int = 64, max_length: int = 50, negatives: SharedNegatives | None = None,
                 temperature: float = 1.0, dense_lr: float = 3e-5, table_optimizer: TableOptimizer | None = None,
                 embedding: EmbeddingSettings | None = None, sharding: ShardingConfig | None = None):
        if data.kind != "interactions":
            raise ConfigError(f"ComiRec needs an interactions dataset; {data.root} holds {data.kind!r}")
        check(isinstance(extractor, (DynamicRouting, SelfAttention)), "extractor", extractor,
              "DynamicRouting or SelfAttention settings")
        check(is_int(dim, 4) and dim % 4 == 0, "dim", dim, "a multiple of 4 (FBGEMM's fused kernels)")
        check(is_int(max_length), "max_length", max_length, "an integer >= 1")
        check(is_number(temperature) and temperature > 0, "temperature", temperature, "a number > 0")
        check(is_number(dense_lr) and dense_lr > 0, "dense_lr", dense_lr, "a number > 0")
        init_process_group(trainer.distributed)
        self.data, self.trainer, self.max_length, self.temperature = data, trainer, max_length, temperature
        self.negatives = negatives or SharedNegatives()
        self.indptr, self.items = data.sequences("train")
        counts = np.bincount(self.items, minlength=data.n_items)
        self.sampler = NegativeSampler(counts, self.negatives.distribution, self.negatives.exponent)
        per_user = np.maximum(np.diff(self.indptr) - 1, 0)  # positions 1..n-1 of each sequence are targets
        self.sample_users = np.repeat(np.arange(data.n_users), per_user)
        self.sample_ends = np.arange(per_user.sum()) - np.repeat(np.cumsum(per_user) - per_user, per_user) + 1
        torch.manual_seed(trainer.seed)
        self.stats = {ITEM: TableStats(counts, data.clusters(ITEM), data.graph("train"), "item")}
        self.settings, self.extractor, self.dim = embedding or EmbeddingSettings(), extractor, dim
        model = MultiInterest.build(data.n_items, dim, max_length, extractor, self.settings, self.stats,
                                    torch.device("meta"))
        self.embeddings = model.embeddings
        table_optimizer = table_optimizer or TableOptimizer()
        table_optimizer.apply(self.embeddings)
        self.model = shard(model, sharding)
        self.optimizer = combined_optimizer(self.model, table_optimizer, lr=dense_lr)

    def train_epoch(self, epoch: int, progress: tqdm | None) -> dict[str, float]:
        self.model.train()
        self._items = None
        seed = self.trainer.epoch_seed(epoch)
        rank, world = rank_and_world()
        order = torch.randperm(len(self.sample_users), generator=torch.Generator().manual_seed(seed)).numpy()
        batches = np.array_split(order, range(self.trainer.batch_size, len(order), self.trainer.batch_size))
        if len(batches) < world or len(order) == 0:
            raise ConfigError(f"the training sequences give {len(order)} samples, {len(batches)} batches of "
                              f"trainer.batch_size={self.trainer.batch_size}, fewer than the {world} ranks")
        generator = torch.Generator().manual_seed(seed + rank * 1_000_000_007)  # ranks sample different negatives
        if progress is not None:
            progress.reset(total=len(batches) // world)
        losses = ((self._loss(self.sample_users[batch], self.sample_ends[batch], generator), len(batch))
                  for batch in rank_share(batches, len(batches)))
        return optimise(losses, self.optimizer, self.embeddings, progress)

    def _loss(self, users: np.ndarray, ends: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        history, lengths = recent_histories(self.indptr, self.items, users, ends, self.max_length)
        targets = torch.from_numpy(self.items[self.indptr[users] + ends])
        negatives = self.sampler.sample(self.negatives.num, generator)
        negative_lengths = torch.zeros(len(users), dtype=torch.int64)
        negative_lengths[0] = len(negatives)  # all negatives in row 0: one lookup, shared by the batch
        features = KeyedJaggedTensor.from_lengths_sync(
            [HISTORY, ITEM, NEG_ITEM], torch.cat([torch.from_numpy(history), targets, negatives]),
            torch.cat([torch.from_numpy(lengths), torch.ones(len(users), dtype=torch.int64), negative_lengths]).int())
        interests, vectors = self.model(features)
        positives = vectors[ITEM]
        with torch.no_grad():
            chosen = torch.einsum("bkd,bd->bk", interests, positives).argmax(1)
        selected = interests[torch.arange(len(users)), chosen]
        log_q = self.sampler.log_probabilities
        return sampled_softmax_loss(selected, positives, vectors[NEG_ITEM], targets, negatives,
                                    (log_q[targets], log_q[negatives]), self.temperature)

    def export(self) -> tuple[str, dict, dict[str, torch.Tensor]]:
        """Family, build arguments and tensors of a model package (see ``recsys.inference``)."""
        settings, tensors = self.served_model()
        build = {"dim": self.dim, "max_length": self.max_length, "extractor": to_config(self.extractor),
                 "settings": settings}
        return FAMILY, build, {**tensors, **stats_tensors(self.stats, self.embeddings)}

    @torch.no_grad()
    def item_vectors(self, chunk: int = 65536) -> torch.Tensor:
        """(N, D) vectors of every item index (row 0 = OOV), cached until the next training step or load."""
        if self._items is None:
            self.model.eval()
            parts = []
            for start in range(0, self.data.n_items, chunk):
                ids = torch.arange(start, min(start + chunk, self.data.n_items))
                features = KeyedJaggedTensor.from_lengths_sync([ITEM], ids, torch.ones(len(ids), dtype=torch.int32))
                parts.append(self.model(features)[1][ITEM])
            self._items = torch.cat(parts)
        return self._items

    @torch.no_grad()
    def interests(self, users: torch.Tensor) -> torch.Tensor:
        """(B,) user indices -> (B, K, D) interests from each user's last ``max_length`` training items."""
        self.model.eval()
        users = users.cpu().numpy()
        history, lengths = recent_histories(self.indptr, self.items, users, np.diff(self.indptr)[users],
                                            self.max_length)
        features = KeyedJaggedTensor.from_lengths_sync([HISTORY], torch.from_numpy(history),
                                                       torch.from_numpy(lengths).int())
        return self.model(features)[0]

    @torch.no_grad()
    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        """(B,) user indices -> (B, N) scores max_k v_k . e_i."""
        items, interests = self.item_vectors(), self.interests(users)
        scores = interests[:, 0] @ items.T
        for k in range(1, interests.shape[1]):
            scores = torch.maximum(scores, interests[:, k] @ items.T)
        return scores
