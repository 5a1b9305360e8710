"""The training loop shared by every recommender: epochs, evaluation, checkpoints, resume."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.distributed as dist
import tqdm.auto as tqdm_auto
from tqdm.auto import tqdm

from recsys.data.batching import Batch, CTRBatcher, ParquetBatches
from recsys.data.dataset import PreparedData
from recsys.data.vocab import OOV
from recsys.evaluation import check_tie_break, ctr_metrics, evaluate_ranking
from recsys.training import checkpoint
from recsys.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)
MINIMISED = ("logloss", "loss")  # early-stopping metrics where lower is better
BEST = "best"  # sub-directory of checkpoint_dir holding the best epoch's state (early stopping)


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
        eval_tie_break: how the ranking evaluation orders equal scores: ``random`` (seeded by ``eval_seed``;
            a collapsed model gets a random list's recall) or ``index`` (lower item index first, which
            flatters ties: indices are ordered by frequency). See :mod:`recsys.evaluation.ranking`.
        eval_seed: seed of the random tie-breaking, in [0, 2**32); independent of ``seed``.
        eval_every: evaluate on the validation split every this many epochs (0 = never).
        checkpoint_dir: where per-epoch checkpoints go.
        resume: continue from the last checkpoint in checkpoint_dir.
        keep_checkpoints: how many epoch checkpoints to keep.
        progress: show a progress bar per epoch and log one line per finished epoch (on rank 0 only). Where
            stderr is not a terminal (a CI or nohup log), only the line: a bar there prints thousands of lines.
        distributed: train on several ranks started by ``torchrun`` (each rank reads a disjoint
            share of the batches; the tables are sharded over the ranks by DMP).
        early_stopping: a validation metric (e.g. ``auc``, ``logloss``, ``recall@20``, ``recall_capped@20``) to stop
            on, or None. Needs ``eval_every >= 1`` and a ``valid`` split; ``logloss``/``loss`` are minimised, others maximised.
            Training stops after ``patience`` evaluations without improvement and the best epoch's state is
            restored before the test evaluation.
        patience: evaluations without improvement before early stopping.
    """

    epochs: int = 10
    batch_size: int = 1024
    seed: int = 0
    shuffle_buffer: int = 1_000_000
    prefetch: int = 2
    eval_ks: list[int] = field(default_factory=lambda: [20, 50])
    eval_batch_size: int = 1024
    eval_tie_break: str = "random"
    eval_seed: int = 0
    eval_every: int = 0
    checkpoint_dir: str = "checkpoints"
    resume: bool = False
    keep_checkpoints: int = 2
    progress: bool = True
    distributed: bool = False
    early_stopping: str | None = None
    patience: int = 2

    def __post_init__(self):
        if self.epochs < 0 or self.batch_size < 1:
            raise ConfigError(f"trainer.epochs must be >= 0 and trainer.batch_size >= 1; got {self.epochs}, {self.batch_size}")
        check_tie_break(self.eval_tie_break, self.eval_seed, ("trainer.eval_tie_break", "trainer.eval_seed"))
        if self.early_stopping is not None and (self.eval_every < 1 or self.patience < 1):
            raise ConfigError(f"trainer.early_stopping={self.early_stopping!r} needs trainer.eval_every >= 1 and "
                              f"trainer.patience >= 1; got {self.eval_every}, {self.patience}")

    def improved(self, value: float, best: float | None) -> bool:
        """Whether ``value`` of the early-stopping metric beats ``best``."""
        if best is None:
            return True
        return value < best if self.early_stopping in MINIMISED else value > best

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
        """(B,) user indices -> (B, N) scores over all items (ranking models; CTR models have ``predict``)."""

    def predict(self, batch: Batch) -> torch.Tensor:
        """A Batch of CTR rows -> (B,) click probabilities (CTR models; ranking models have ``score_users``)."""

    def memory(self) -> dict[str, int]:
        """Bytes of each table of the model, from the real tensors."""


def evaluate(model: Trainable | Callable, data: PreparedData, split: str, ks, batch_size: int = 1024,
             tie_break: str = "random", seed: int = 0) -> dict[str, float]:
    """Metrics on ``split``: full ranking excluding OOV and the items of ``data.seen(split)`` (the earlier splits, or
    train only for LightGCN-style splits; ties in scores broken by ``tie_break`` and ``seed``, see
    :func:`recsys.evaluation.evaluate_ranking`), or AUC and log loss of ``model.predict`` (CTR data)."""
    if data.kind == "ctr":
        return evaluate_ctr(model, data, split, batch_size)
    seen = data.seen(split)
    score = model.score_users if hasattr(model, "score_users") else model
    with torch.no_grad():
        return evaluate_ranking(score, seen, data.matrix(split), ks=ks, batch_size=batch_size, exclude_items=[OOV],
                                tie_break=tie_break, seed=seed)


def evaluate_ctr(model: Trainable, data: PreparedData, split: str, batch_size: int = 1024) -> dict[str, float]:
    """AUC and log loss of ``model.predict`` over every row of ``split`` (read in file order).

    On several ranks every rank scores every batch (sharded lookups are collectives), so all get the same metrics.
    """
    batches = ParquetBatches(data.path(split), CTRBatcher(data.ctr_schema), batch_size, shuffle_buffer=0, seed=0)
    labels, probabilities = [], []
    with torch.no_grad():
        for batch in batches:
            labels.append(batch.labels)
            probabilities.append(model.predict(batch).float())
    return ctr_metrics(torch.cat(labels), torch.cat(probabilities))


def fit(model: Trainable, data: PreparedData, cfg: TrainerConfig,
        log: Callable[[dict[str, float], int], None] = lambda metrics, step: None,
        meta: dict | None = None, final_split: str = "test") -> dict[str, float]:
    """Trains for ``cfg.epochs`` (resuming if asked), checkpoints each epoch, returns ``final_split``'s metrics.

    Args:
        model: what is trained.
        data: the prepared dataset.
        cfg: the loop's settings.
        log: called with each epoch's metrics and the epoch index (e.g. ``Run.log_metrics``).
        meta: JSON-serialisable entries stored with every checkpoint (e.g. the MLflow run id), read back by
            ``checkpoint.latest(cfg.checkpoint_dir)["meta"]``.
        final_split: the split evaluated at the end: ``test``, or ``valid`` when tuning (the test split is then
            never read).

    Example:
        >>> metrics = fit(task, PreparedData.open("data/prepared/ml100k"), TrainerConfig(epochs=5))  # doctest: +SKIP
    """
    if cfg.distributed and not getattr(model, "supports_distributed", False):
        raise ConfigError(f"{type(model).__name__} does not train on several ranks; drop trainer.distributed=true")
    if cfg.early_stopping is not None and "valid" not in data.splits:
        raise ConfigError(f"trainer.early_stopping={cfg.early_stopping!r} needs a validation split; {data.root} has "
                          f"{data.splits} (set data.split.valid_fraction or data.ctr.valid_fraction)")
    directory = Path(cfg.checkpoint_dir)
    start, progress = 0, {"best": None, "best_epoch": None, "stale": 0}  # early-stopping progress
    if not cfg.resume:
        checkpoint.clear(directory)
        checkpoint.clear(directory / BEST)
    elif info := _resume(model, directory):
        start = info["epoch"] + 1
        progress |= info["meta"].get("early_stopping", {})
        logger.info("resumed from %s (epoch %d of %d done)", info["path"], start, cfg.epochs)
    else:
        logger.warning("trainer.resume=true but %s holds no checkpoint: training from the start", directory)
    report = cfg.progress and (not dist.is_initialized() or dist.get_rank() == 0)
    quiet = not report or not progress_redraws()
    # On several ranks every rank evaluates (sharded lookups are collectives) and gets the same metrics.
    for epoch in range(start, cfg.epochs):
        if progress["stale"] >= cfg.patience and cfg.early_stopping is not None:
            break  # a resumed run that had already stopped
        began = time.perf_counter()
        with tqdm(desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=quiet, leave=False) as bar:
            metrics = dict(model.train_epoch(epoch, bar))
        metrics["epoch_seconds"] = time.perf_counter() - began
        if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and "valid" in data.splits:
            valid = evaluate(model, data, "valid", cfg.eval_ks, cfg.eval_batch_size, cfg.eval_tie_break, cfg.eval_seed)
            metrics |= {f"valid_{k}": v for k, v in valid.items()}
            if cfg.early_stopping is not None:
                _track(model, cfg, directory / BEST, epoch, valid, progress)
        if report:
            logger.info("epoch %d/%d: %s", epoch + 1, cfg.epochs, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        log(metrics, epoch)
        checkpoint.save(directory, epoch, model.state(), meta={**(meta or {}), "early_stopping": progress},
                        keep=cfg.keep_checkpoints)
        if cfg.early_stopping is not None and progress["stale"] >= cfg.patience:
            logger.info("early stopping after epoch %d: valid %s did not improve on %.5f (epoch %d) for %d evaluations",
                        epoch + 1, cfg.early_stopping, progress["best"], progress["best_epoch"] + 1, cfg.patience)
            break
    if progress["best_epoch"] is not None and (info := checkpoint.latest(directory / BEST)):
        _restore(model, info["path"])  # the best validation epoch, not the last one
        log({f"best_valid_{cfg.early_stopping}": progress["best"], "best_epoch": progress["best_epoch"]},
            progress["best_epoch"])
    return evaluate(model, data, final_split, cfg.eval_ks, cfg.eval_batch_size, cfg.eval_tie_break, cfg.eval_seed)


def progress_redraws() -> bool:
    """Whether a tqdm bar redraws in place: stderr is a terminal, or tqdm draws notebook widgets. Elsewhere (a CI or
    nohup log) each redraw is a new line, so callers log one line per step of work instead."""
    if tqdm_auto.notebook_tqdm is not tqdm_auto.std_tqdm:
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def _resume(model: Trainable, directory: Path) -> dict | None:
    """Loads the newest checkpoint of ``directory`` that loads into ``model``; returns its info, or None when the
    directory holds none. One that fails to load (e.g. a missing shard) is skipped with a warning and the next older
    one is tried; on several ranks DCP raises a load failure on every rank, so all ranks skip the same ones.

    Raises:
        CheckpointError: there are checkpoints, but none loads (naming the directory).
    """
    failures = []
    for info in checkpoint.candidates(directory):
        try:
            _restore(model, info["path"])
        except CheckpointError as error:
            failures.append(str(error))
            logger.warning("skipping checkpoint %s (epoch %d): %s; trying the next older one", info["path"],
                           info["epoch"], error)
            continue
        return info
    if failures:
        raise CheckpointError(f"{directory} holds no checkpoint that loads: {'; '.join(failures)}")
    return None


def _restore(model: Trainable, path: Path) -> None:
    state = model.state()
    checkpoint.load(path, state)
    model.load_state(state)


def _track(model: Trainable, cfg: TrainerConfig, best_dir: Path, epoch: int, valid: dict, progress: dict) -> None:
    """Updates the early-stopping ``progress`` with this epoch's validation metrics; saves a new best state."""
    if cfg.early_stopping not in valid:
        raise ConfigError(f"trainer.early_stopping={cfg.early_stopping!r} is not a validation metric; "
                          f"choose one of {sorted(valid)}")
    value = float(valid[cfg.early_stopping])
    if cfg.improved(value, progress["best"]):
        progress |= {"best": value, "best_epoch": epoch, "stale": 0}
        checkpoint.save(best_dir, epoch, model.state(), keep=1)
    else:
        progress["stale"] += 1
