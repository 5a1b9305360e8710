"""Negative item samplers."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from recsys.errors import ConfigError


class NegativeSampler:
    """Draws item indices 1..N-1 (never the OOV index 0), uniformly or by popularity.

    Args:
        item_counts: (N,) training interactions per item index (index 0 = OOV is never drawn).
        distribution: ``uniform`` or ``popularity`` (probability ∝ count ** exponent).
        exponent: popularity exponent (0.75 as in word2vec dampens the head).

    Example:
        >>> s = NegativeSampler(np.array([0, 5, 1]), "popularity")
        >>> s.sample(4, torch.Generator().manual_seed(0)).min().item() >= 1
        True
    """

    def __init__(self, item_counts: np.ndarray, distribution: Literal["uniform", "popularity"] = "uniform",
                 exponent: float = 1.0):
        if distribution not in ("uniform", "popularity"):
            raise ConfigError(f"negatives.distribution must be 'uniform' or 'popularity', got {distribution!r}")
        counts = torch.as_tensor(np.asarray(item_counts), dtype=torch.float64)
        if len(counts) < 2:
            raise ConfigError("negative sampling needs at least one item besides OOV")
        weights = counts.clamp(min=0) ** exponent if distribution == "popularity" else torch.ones_like(counts)
        weights[0] = 0.0
        if weights.sum() <= 0:
            raise ConfigError("popularity sampling needs positive item counts")
        self.distribution = distribution
        self.probabilities = (weights / weights.sum()).float()
        self.log_probabilities = self.probabilities.clamp(min=1e-30).log()

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n,) int64 item indices."""
        if self.distribution == "uniform":
            return torch.randint(1, len(self.probabilities), (n,), generator=generator)
        return torch.multinomial(self.probabilities, n, replacement=True, generator=generator)
