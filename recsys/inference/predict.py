"""DataFrame in, DataFrame out: the one prediction format shared by the pyfunc model and batch scoring."""

from __future__ import annotations

import pandas as pd

from recsys.inference.scorers import HISTORY_ID, USER_ID, CTRScorer, Recommender

__all__ = ["HISTORY_ID", "USER_ID", "predict_frame"]


def predict_frame(model: Recommender | CTRScorer, frame: pd.DataFrame, params: dict) -> pd.DataFrame:
    """Ranking: ``user_id`` (+ optional ``history``) -> ``items``, ``scores``, ``source`` per row, with params ``k``
    and ``exclude_seen``; CTR: raw feature columns -> ``probability`` (each scorer's ``predict_frame``)."""
    return model.predict_frame(frame, params)
