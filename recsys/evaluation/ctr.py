"""Click-through-rate metrics: ROC AUC and log loss of predicted click probabilities."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import log_loss, roc_auc_score

EPS = 1e-7


def ctr_metrics(labels: np.ndarray | torch.Tensor,
                probabilities: np.ndarray | torch.Tensor) -> dict[str, float]:
    """AUC and log loss of predicted click probabilities.

    Args:
        labels: ``(B,)`` binary labels in {0, 1} (any shape of B elements is flattened).
        probabilities: ``(B,)`` predicted P(label = 1) in [0, 1] (apply a sigmoid to logits);
            clipped to ``[1e-7, 1 - 1e-7]`` for the log loss.

    Returns:
        ``{"auc": ..., "logloss": ...}`` (``sklearn.metrics.roc_auc_score``, ``log_loss``).

    Raises:
        ValueError: lengths differ, inputs are empty, labels are not in {0, 1},
            probabilities are outside [0, 1] or NaN, or labels hold only one class.

    Example:
        >>> ctr_metrics([0, 1, 1, 0], [0.1, 0.8, 0.4, 0.3])["auc"]
        1.0
    """
    y, p = _flat(labels, np.float64), _flat(probabilities, np.float64)
    if y.size != p.size:
        raise ValueError(f"labels has {y.size} elements but probabilities has {p.size}")
    if y.size == 0:
        raise ValueError("ctr_metrics needs at least one example, found 0")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"labels must be 0 or 1, found {np.unique(y[~np.isin(y, (0.0, 1.0))])[:5]}")
    if not (np.all(p >= 0.0) and np.all(p <= 1.0)):  # also catches NaN
        raise ValueError(f"probabilities must lie in [0, 1] (pass sigmoid(logits)), found min "
                         f"{np.nanmin(p):.4g}, max {np.nanmax(p):.4g}, NaN: {bool(np.isnan(p).any())}")
    classes = np.unique(y)
    if classes.size == 1:
        raise ValueError(f"AUC is undefined: labels contain only class {int(classes[0])}")
    return {
        "auc": float(roc_auc_score(y, p)),
        "logloss": float(log_loss(y, np.clip(p, EPS, 1.0 - EPS), labels=[0, 1])),
    }


class ClickRate:
    """The CTR baseline: every row gets the training click rate (AUC 0.5; its log loss is the label entropy).

    Args:
        rate: the click probability predicted for every row, in (0, 1).

    Example:
        >>> ClickRate(0.25).predict(type("Batch", (), {"labels": torch.zeros(3)})())
        tensor([0.2500, 0.2500, 0.2500])
    """

    def __init__(self, rate: float):
        if not 0.0 < rate < 1.0:
            raise ValueError(f"ClickRate needs a rate in (0, 1), found {rate}")
        self.rate = float(rate)

    @classmethod
    def of_split(cls, path) -> ClickRate:
        """The click rate of a prepared CTR split (its ``label`` column)."""
        import pyarrow.parquet as pq

        labels = pq.read_table(path, columns=["label"])["label"].to_numpy()
        return cls(float(labels.mean()) if labels.size else 0.5)

    def predict(self, batch) -> torch.Tensor:
        return torch.full((len(batch.labels),), self.rate)


def _flat(x: np.ndarray | torch.Tensor, dtype: type) -> np.ndarray:
    """``x`` (array, tensor or sequence) as a flat numpy array of ``dtype``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=dtype).ravel()
