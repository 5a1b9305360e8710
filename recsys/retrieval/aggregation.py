"""Multi-interest retrieval and ComiRec's controllable aggregation (Cen et al., KDD 2020, Section 3.5).

Shape letters: B users, K interests, D dimension, C candidates per user, N items returned per user.
The relevance of item i to user u is f(u, i) = max_k e_i . v_u^k; the aggregation greedily builds
the set S maximising Q(u, S) = sum_{i in S} f(u, i) + lambda sum_{i in S} sum_{j in S} g(i, j), with
g(i, j) = 1 when i and j belong to different categories. lambda = 0 returns the top N by f.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recsys.errors import ConfigError
from recsys.retrieval.index import ItemIndex


@dataclass
class Candidates:
    """Items per user with their relevance f(u, i), best first.

    Args:
        ids: (B, C) int64 item ids; -1 where a user has fewer items.
        scores: (B, C) float32 f(u, i); -inf where ``ids`` is -1.
    """

    ids: np.ndarray
    scores: np.ndarray


def multi_interest_retrieve(interests, index: ItemIndex, n: int) -> Candidates:
    """The union of each interest's top-``n`` items, scored by f(u, i) = max_k e_i . v_u^k.

    The union holds every item of the top ``n`` by f over the whole index (an item's best interest
    ranks it at least as high as f does), so ``aggregate(..., diversity=0)`` on it equals the
    brute-force top ``n``.

    Args:
        interests: (B, K, D) interest vectors of B users (numpy or a CPU torch tensor).
        index: the item index.
        n: items retrieved per interest.

    Returns:
        Candidates of width C = K * min(n, len(index)), duplicates dropped (-1), sorted by f.

    Example:
        >>> index = ItemIndex(np.eye(3, dtype=np.float32))
        >>> multi_interest_retrieve(np.array([[[1.0, 0, 0], [0, 0, 2.0]]]), index, 1).ids
        array([[2, 0]])
    """
    interests = np.asarray(interests, dtype=np.float32)
    if interests.ndim != 3:
        raise ConfigError(f"multi_interest_retrieve: interests have shape {interests.shape}, expected (B, K, D)")
    users, k, dim = interests.shape
    _, ids = index.search(interests.reshape(users * k, dim), n)
    ids = np.sort(ids.reshape(users, -1), axis=1)
    ids[:, 1:][ids[:, 1:] == ids[:, :-1]] = -1  # duplicates (and repeated -1) keep their first copy
    scores = np.einsum("bkd,bcd->bkc", interests, index.vectors_of(ids)).max(1)
    scores[ids < 0] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")
    return Candidates(np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1).astype(np.float32))


def aggregate(candidates: Candidates, n: int, diversity: float = 0.0,
              categories: np.ndarray | None = None) -> Candidates:
    """ComiRec's greedy controllable aggregation (the paper's Algorithm 1), vectorised over users.

    Step t adds the unchosen candidate maximising f(u, i) + lambda * sum_{j in S} g(i, j) to S.
    With lambda = 0 this is the top ``n`` by f; larger lambda trades relevance for category diversity.

    Args:
        candidates: (B, C) candidates with their f(u, i), e.g. from ``multi_interest_retrieve``.
        n: items to return per user.
        diversity: lambda >= 0.
        categories: (n_items,) category of each item id; needed when lambda > 0.

    Returns:
        Candidates of width min(n, C) in the order chosen (ids -1 where a user ran out of items).

    Example:
        >>> c = Candidates(np.array([[1, 2, 3]]), np.array([[0.9, 0.8, 0.5]], dtype=np.float32))
        >>> aggregate(c, 2, diversity=0.5, categories=np.array([0, 7, 7, 8])).ids
        array([[1, 3]])
    """
    if not (np.isfinite(diversity) and diversity >= 0):
        raise ConfigError(f"aggregate: diversity={diversity!r} is invalid: expected a number >= 0")
    if n < 1:
        raise ConfigError(f"aggregate: n={n} is invalid: expected an integer >= 1")
    ids, scores = candidates.ids, candidates.scores
    n = min(n, ids.shape[1])
    if diversity == 0:
        order = np.argsort(-scores, axis=1, kind="stable")[:, :n]
        return Candidates(np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1))
    if categories is None:
        raise ConfigError("aggregate: diversity > 0 needs the item categories")
    _, category = np.unique(np.asarray(categories)[np.maximum(ids, 0)], return_inverse=True)
    category = category.reshape(ids.shape)
    rows = np.arange(len(ids))
    counts = np.zeros((len(ids), category.max() + 1), dtype=np.int64)  # chosen items per category
    available = scores > -np.inf
    out_ids, out_scores = np.full((len(ids), n), -1), np.full((len(ids), n), -np.inf, dtype=np.float32)
    for step in range(n):
        different = step - np.take_along_axis(counts, category, 1)  # sum_{j in S} g(i, j)
        gain = np.where(available, scores + diversity * different, -np.inf)
        pick = gain.argmax(1)
        found = available[rows, pick]
        out_ids[found, step], out_scores[found, step] = ids[rows, pick][found], scores[rows, pick][found]
        available[rows, pick] = False
        np.add.at(counts, (rows[found], category[rows, pick][found]), 1)
    return Candidates(out_ids, out_scores)


def diversity(ids: np.ndarray, categories: np.ndarray) -> np.ndarray:
    """The paper's Diversity@N per user: the share of pairs of recommended items in different categories.

    Args:
        ids: (B, N) recommended item ids (-1 entries are ignored).
        categories: (n_items,) category of each item id.

    Returns:
        (B,) float64 in [0, 1]; 0 for users with fewer than two items.

    Example:
        >>> diversity(np.array([[1, 2, 3], [1, 2, -1]]), np.array([0, 5, 5, 6]))
        array([0.66666667, 0.        ])
    """
    ids = np.asarray(ids, dtype=np.int64)
    category = np.asarray(categories)[np.maximum(ids, 0)]
    valid = ids >= 0
    pairs = valid[:, :, None] & valid[:, None, :]
    different = ((category[:, :, None] != category[:, None, :]) & pairs).sum((1, 2))
    total = pairs.sum((1, 2)) - valid.sum(1)
    return np.where(total > 0, different / np.maximum(total, 1), 0.0)

