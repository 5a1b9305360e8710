"""The training loop shared by every recommender: epochs, evaluation, checkpoints, resume."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from recsys.data.dataset import PreparedData
from recsys.data.vocab import OOV
from recsys.evaluation import evaluate_ranking
from recsys.training import checkpoint
from recsys.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class TrainerConfig:
    """Settings of the loop.

    Args:
        epochs: passes over the training split (ALS: alternating sweeps).
        batch_size: rows per training batch (B).
        seed: seed of initialisation, shuffling and sampling (epoch e uses a seed derived from both).
        shuffle_buffer: rows pooled for shuffling by the streaming loader.
        prefetch: batches prepared ahead in a background thread.
        eval_ks: cut-offs K of the ranking metrics.
        eval_batch_size: users scored at once during evaluation.
        eval_every: evaluate on the validation split every this many epochs (0 = never).
        checkpoint_dir: where per-epoch checkpoints go.
        resume: continue from the last checkpoint in checkpoint_dir.
        keep_checkpoints: how many epoch checkpoints to keep.
        progress: show a progress bar per epoch (on rank 0 only).
        distributed: train on several ranks started by ``torchrun`` (each rank reads a disjoint
            share of the batches; the tables are sharded over the ranks by DMP).
    """

    epochs: int = 10
    batch_size: int = 1024
    seed: int = 0
    shuffle_buffer: int = 1_000_000
    prefetch: int = 2
    eval_ks: list[int] = field(default_factory=lambda: [20, 50])
    eval_batch_size: int = 1024
    eval_every: int = 0
    checkpoint_dir: str = "checkpoints"
    resume: bool = False
    keep_checkpoints: int = 2
    progress: bool = True
    distributed: bool = False

    def __post_init__(self):
        if self.epochs < 0 or self.batch_size < 1:
            raise ConfigError(f"trainer.epochs must be >= 0 and trainer.batch_size >= 1; got {self.epochs}, {self.batch_size}")

    def epoch_seed(self, epoch: int) -> int:
        return self.seed * 1_000_003 + epoch


class Trainable(Protocol):
    """What the loop needs from a model and its training procedure."""

    def train_epoch(self, epoch: int, progress: tqdm | None) -> dict[str, float]:
        """One pass over the training data; returns epoch metrics (e.g. mean loss)."""

    def state(self) -> dict:
        """Everything a checkpoint must hold, as tensors (loaded in place by DCP)."""

    def load_state(self, state: dict) -> None:
        """Applies a state loaded into ``self.state()``'s structure."""

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        """(B,) user indices -> (B, N) scores over all items."""

    def memory(self) -> dict[str, int]:
        """Bytes of each table of the model, from the real tensors."""


def evaluate(model: Trainable | Callable, data: PreparedData, split: str, ks, batch_size: int = 1024) -> dict[str, float]:
    """Full-ranking metrics on ``split``, excluding items of the earlier splits and OOV."""
    seen = data.matrix("train")
    if split == "test" and "valid" in data.splits:
        seen = (seen + data.matrix("valid")).tocsr()
    score = model.score_users if hasattr(model, "score_users") else model
    with torch.no_grad():
        return evaluate_ranking(score, seen, data.matrix(split), ks=ks, batch_size=batch_size, exclude_items=[OOV])


def fit(model: Trainable, data: PreparedData, cfg: TrainerConfig,
        log: Callable[[dict[str, float], int], None] = lambda metrics, step: None) -> dict[str, float]:
    """Trains for ``cfg.epochs`` (resuming if asked), checkpoints each epoch, returns test metrics.

    Example:
        >>> metrics = fit(task, PreparedData.open("data/prepared/ml100k"), TrainerConfig(epochs=5))  # doctest: +SKIP
    """
    if cfg.distributed and not getattr(model, "supports_distributed", False):
        raise ConfigError(f"{type(model).__name__} does not train on several ranks; drop trainer.distributed=true")
    directory = Path(cfg.checkpoint_dir)
    start = 0
    if not cfg.resume:
        checkpoint.clear(directory)
    elif info := checkpoint.latest(directory):
        state = model.state()
        checkpoint.load(info["path"], state)
        model.load_state(state)
        start = info["epoch"] + 1
        logger.info("resumed from %s (epoch %d of %d done)", info["path"], start, cfg.epochs)
    else:
        logger.warning("trainer.resume=true but %s holds no checkpoint: training from the start", directory)
    quiet = not cfg.progress or (dist.is_initialized() and dist.get_rank() != 0)
    # On several ranks every rank evaluates (sharded lookups are collectives) and gets the same metrics.
    for epoch in range(start, cfg.epochs):
        began = time.perf_counter()
        with tqdm(desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=quiet, leave=False) as bar:
            metrics = dict(model.train_epoch(epoch, bar))
        metrics["epoch_seconds"] = time.perf_counter() - began
        if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and "valid" in data.splits:
            valid = evaluate(model, data, "valid", cfg.eval_ks, cfg.eval_batch_size)
            metrics |= {f"valid_{k}": v for k, v in valid.items()}
        log(metrics, epoch)
        checkpoint.save(directory, epoch, model.state(), keep=cfg.keep_checkpoints)
    return evaluate(model, data, "test", cfg.eval_ks, cfg.eval_batch_size)
