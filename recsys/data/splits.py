"""Deterministic train/test splits of an interactions frame (columns ``user``, ``item``, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from recsys.data.schemas import TIMESTAMP, USER
from recsys.errors import ConfigError, DataError

Method = Literal["random_holdout", "leave_last_out", "time_split"]


@dataclass(frozen=True)
class SplitConfig:
    """How to split interactions into train and test (and optionally validation).

    Args:
        method: ``random_holdout`` (per user, a random ``test_fraction`` of their rows),
            ``leave_last_out`` (per user, the last ``n_last`` rows by timestamp) or
            ``time_split`` (globally, the latest ``test_fraction`` of rows by timestamp).
        test_fraction: share of rows held out (random_holdout, time_split).
        n_last: rows held out per user (leave_last_out).
        valid_fraction: if > 0, the same method is applied again to the training part to
            carve out a validation set of this share (n_last rows for leave_last_out).
        seed: seed of the random holdout.

    Example:
        >>> SplitConfig(method="random_holdout", test_fraction=0.2, seed=0).method
        'random_holdout'
    """

    method: Method = "random_holdout"
    test_fraction: float = 0.2
    n_last: int = 1
    valid_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.method not in ("random_holdout", "leave_last_out", "time_split"):
            raise ConfigError(f"split.method must be random_holdout, leave_last_out or time_split, got {self.method!r}")
        for name in ("test_fraction", "valid_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"split.{name} must be in [0, 1), got {value}")
        if self.n_last < 1:
            raise ConfigError(f"split.n_last must be >= 1, got {self.n_last}")


def split(frame: pd.DataFrame, cfg: SplitConfig) -> dict[str, pd.DataFrame]:
    """Splits ``frame`` into ``train``, ``test`` and (if ``valid_fraction`` > 0) ``valid``."""
    train, test = _split_once(frame, cfg, cfg.test_fraction, cfg.seed)
    parts = {"train": train, "test": test}
    if cfg.valid_fraction > 0:
        parts["train"], parts["valid"] = _split_once(train, cfg, cfg.valid_fraction, cfg.seed + 1)
    return parts


def _split_once(frame: pd.DataFrame, cfg: SplitConfig, fraction: float, seed: int):
    if cfg.method == "random_holdout":
        held = _random_holdout(frame, fraction, seed)
    else:
        if TIMESTAMP not in frame:
            raise DataError(f"split.method={cfg.method} needs a '{TIMESTAMP}' column; the data has {list(frame.columns)}")
        held = _leave_last_out(frame, cfg.n_last) if cfg.method == "leave_last_out" else _time_split(frame, fraction)
    return frame[~held].reset_index(drop=True), frame[held].reset_index(drop=True)


def _random_holdout(frame: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """Per user, holds out round(fraction * n_user) rows chosen uniformly at random."""
    keys = np.random.default_rng(seed).random(len(frame))
    order = pd.Series(keys, index=frame.index).groupby(frame[USER]).rank(method="first").to_numpy()
    sizes = frame.groupby(USER)[USER].transform("size").to_numpy()
    return order <= np.floor(fraction * sizes + 0.5)


def _leave_last_out(frame: pd.DataFrame, n_last: int) -> np.ndarray:
    """Per user, holds out the n_last latest rows (ties: later rows in the file are later)."""
    position = np.arange(len(frame))
    ordered = frame.assign(_pos=position).sort_values([USER, TIMESTAMP, "_pos"], kind="stable")
    from_end = ordered.groupby(USER).cumcount(ascending=False).to_numpy()
    held = np.zeros(len(frame), dtype=bool)
    held[ordered["_pos"].to_numpy()] = from_end < n_last
    return held


def _time_split(frame: pd.DataFrame, fraction: float) -> np.ndarray:
    """Holds out the latest ``fraction`` of rows globally; rows at the cut timestamp go to test."""
    cutoff = np.quantile(frame[TIMESTAMP].to_numpy(), 1.0 - fraction, method="lower") if len(frame) else 0
    held = frame[TIMESTAMP].to_numpy() > cutoff
    if fraction > 0 and not held.any():
        held = frame[TIMESTAMP].to_numpy() >= cutoff
    return held
