"""DataFrame in, DataFrame out: the one prediction format shared by the pyfunc model and batch scoring."""

from __future__ import annotations

import numpy as np
import pandas as pd

from recsys.errors import DataError
from recsys.inference.scorers import CTRScorer, Recommender

USER_ID, HISTORY_ID = "user_id", "history"
DEFAULT_K = 10


def predict_frame(model: Recommender | CTRScorer, frame: pd.DataFrame, params: dict) -> pd.DataFrame:
    """Ranking: ``user_id`` (+ optional ``history``) -> ``items``, ``scores``, ``source`` per row, with params ``k``
    and ``exclude_seen``; CTR: raw feature columns -> ``probability``."""
    if isinstance(model, CTRScorer):
        return pd.DataFrame({"probability": model.predict(frame)}, index=frame.index)
    if USER_ID not in frame.columns:
        raise DataError(f"ranking input needs a '{USER_ID}' column; got {list(frame.columns)}")
    k = int(params.get("k", DEFAULT_K))
    if k < 1:
        raise DataError(f"k must be >= 1, got {k}")
    users = model.user_index(frame[USER_ID].tolist())
    histories = None
    if HISTORY_ID in frame.columns:
        histories = [None if not isinstance(h, (list, tuple, np.ndarray)) or len(h) == 0
                     else model.item_index(list(h)) for h in frame[HISTORY_ID]]
    found = model.recommend(users, k, histories, exclude_seen=bool(params.get("exclude_seen", True)))
    return pd.DataFrame({"items": [r.items.tolist() for r in found], "scores": [r.scores.tolist() for r in found],
                         "source": [r.source for r in found]}, index=frame.index)
