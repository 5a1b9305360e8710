"""Requests -> model calls -> response bodies. Raw ids become indices here (unknown ids become -1, never an error),
and candidate filters become item-index arrays; seen-item filtering and top-K happen in the ``Recommender``."""

from __future__ import annotations

import numpy as np
import pandas as pd

from recsys.errors import DataError
from recsys.inference.scorers import CTRScorer, Recommender
from serving.errors import NotFound
from serving.model_source import LoadedModel


def user_indices(model: Recommender, raw: list) -> np.ndarray:
    return model.user_index(raw) if raw else np.empty(0, dtype=np.int64)


def item_indices(model: Recommender, raw: list | None) -> np.ndarray:
    return model.item_index(raw) if raw else np.empty(0, dtype=np.int64)


def _known(items: np.ndarray) -> np.ndarray:
    return items[items > 0]


def recommend(served: LoadedModel, queries: list) -> list[dict]:
    """Answers /recommend queries (``RecommendQuery`` objects) in order; queries sharing ``k``, ``exclude_seen`` and
    the filters go through the model in one call."""
    model: Recommender = served.model
    groups: dict[tuple, list[int]] = {}
    for position, q in enumerate(queries):
        key = (q.k, q.exclude_seen, _key(q.allowed_items), _key(q.excluded_items))
        groups.setdefault(key, []).append(position)
    out: list[dict | None] = [None] * len(queries)
    for (k, exclude_seen, allowed, excluded), positions in groups.items():
        group = [queries[p] for p in positions]
        users = user_indices(model, [q.user_id for q in group])
        histories = [None if q.history is None else _known(item_indices(model, q.history)) for q in group]
        found = model.recommend(users, k, histories, exclude_seen=exclude_seen,
                                allowed=None if allowed is None else _known(item_indices(model, list(allowed))),
                                excluded=None if excluded is None else _known(item_indices(model, list(excluded))))
        for position, q, r in zip(positions, group, found):
            out[position] = {"user_id": q.user_id, "items": r.items.tolist(), "scores": r.scores.tolist(),
                             "source": r.source, "fallback": r.source != "model", "model_version": served.version}
    return out


def _key(values: list | None) -> tuple | None:
    return None if values is None else tuple(values)


def similar(served: LoadedModel, item_id, k: int) -> dict:
    """The ``k`` items most similar to ``item_id``; NotFound when the model does not know it."""
    model: Recommender = served.model
    index = int(item_indices(model, [item_id])[0])
    if index <= 0:
        raise NotFound(f"item {item_id!r} is not in the model's vocabulary ({model.n_items - 1} items)")
    items, scores = model.similar(index, k)
    return {"item_id": item_id, "items": items.tolist(), "scores": scores.tolist(), "model_version": served.version}


def score(served: LoadedModel, rows: list[dict]) -> dict:
    """Click probabilities of raw CTR rows. DataError names the row and column of a value the model cannot read."""
    model: CTRScorer = served.model
    frame = ctr_frame(model, rows)
    probabilities = model.predict(frame)
    bad = np.flatnonzero(~np.isfinite(probabilities))
    if len(bad):
        raise DataError(f"rows {bad[:10].tolist()} give a non-finite probability (dense values out of range?)")
    return {"probabilities": probabilities.tolist(), "model_version": served.version}


def ctr_frame(model: CTRScorer, rows: list[dict]) -> pd.DataFrame:
    """JSON rows -> the raw frame ``CTRScorer.predict`` reads: dense columns float (None = missing), id columns as
    object columns in the vocabulary's type (so 64-bit ids never pass through float)."""
    columns, schema = model.columns, model.schema
    for number, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise DataError(f"row {number} lacks columns {missing}; the model reads {columns}")
    frame = {}
    for name in schema.dense:
        cells = [row[name] for row in rows]
        wrong = [i for i, c in enumerate(cells) if isinstance(c, (list, bool, str))]
        if wrong:
            raise DataError(f"column '{name}' is dense: rows {wrong[:10]} hold {type(cells[wrong[0]]).__name__} "
                            f"values, expected a number or null")
        frame[name] = np.array([np.nan if c is None else c for c in cells], dtype=np.float64)
    for name in schema.sparse:
        cells = [row[name] for row in rows]
        wrong = [i for i, c in enumerate(cells) if isinstance(c, list)]
        if wrong:
            raise DataError(f"column '{name}' holds one id per row: rows {wrong[:10]} hold a list")
        frame[name] = pd.Series(cells, dtype=object)  # ids compared in the vocabulary's type by the scorer
    for name in schema.multi_valued:
        cells = [row[name] for row in rows]
        wrong = [i for i, c in enumerate(cells) if not isinstance(c, list)]
        if wrong:
            raise DataError(f"column '{name}' is multi-valued: rows {wrong[:10]} do not hold a list of ids")
        frame[name] = pd.Series(cells, dtype=object)
    return pd.DataFrame(frame)
