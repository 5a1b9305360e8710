"""Full-ranking evaluation: every user is ranked against all items, training items excluded.

Users are scored in batches; each batch becomes a dense ``(B, N)`` score matrix, its excluded
cells (the user's training items and ``exclude_items``) are set to ``-inf``, one ``torch.topk``
with ``K = max(ks)`` is taken, and every metric for every cut-off is read from that single
top-K list.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from recsys.errors import ConfigError, DataError

METRICS = ("recall", "ndcg", "hitrate", "mrr", "coverage")


def ranking_metric_names(ks: Sequence[int]) -> list[str]:
    """Names of the metrics returned by :func:`evaluate_ranking`, in order.

    Args:
        ks: the cut-offs.

    Returns:
        ``["recall@k", "ndcg@k", "hitrate@k", "mrr@k", "coverage@k", ...]`` for each k (duplicates
        dropped, order kept), followed by ``"n_users"``.

    Example:
        >>> ranking_metric_names([5])
        ['recall@5', 'ndcg@5', 'hitrate@5', 'mrr@5', 'coverage@5', 'n_users']
    """
    return [f"{m}@{k}" for k in _check_ks(ks) for m in METRICS] + ["n_users"]


def top_k(scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the ``k`` highest scores of each row, excluded cells ranked last.

    Ties are broken however ``torch.topk`` breaks them (unspecified, but deterministic on a given
    device). If a row has fewer than ``k`` non-excluded cells the tail of its list holds excluded
    (``-inf``) cells; callers that care must check them (see :func:`evaluate_ranking`).

    Args:
        scores: ``(B, N)`` scores; not modified (``expand``-ed views and integer tensors are fine).
        k: number of indices per row, ``1 <= k <= N``.
        exclude: optional boolean mask broadcastable to ``scores``; ``True`` cells get ``-inf``.

    Returns:
        ``(B, k)`` int64 column indices, best first.

    Example:
        >>> top_k(torch.tensor([[0.1, 0.9, 0.5]]), 2, torch.tensor([False, True, False]))
        tensor([[2, 0]])
    """
    if scores.dim() != 2:
        raise ConfigError(f"top_k: scores must be 2-D (B, N), found shape {tuple(scores.shape)}")
    if not 1 <= k <= scores.shape[1]:
        raise ConfigError(f"top_k: k must be in [1, {scores.shape[1]}] (number of items), found {k}")
    if not scores.is_floating_point():
        scores = scores.float()
    if exclude is not None:
        scores = scores.masked_fill(exclude.to(device=scores.device, dtype=torch.bool), -torch.inf)
    return torch.topk(scores, k, dim=1).indices


def evaluate_ranking(
    score_users: Callable[[torch.Tensor], torch.Tensor],
    train: sp.spmatrix | sp.sparray,
    test: sp.spmatrix | sp.sparray,
    ks: Sequence[int] = (20,),
    batch_size: int = 1024,
    exclude_items: Sequence[int] = (),
) -> dict[str, float]:
    """Full-ranking top-k metrics, averaged over the users that have at least one test item.

    For each evaluated user all N items are scored; the user's training items and
    ``exclude_items`` get ``-inf``, and so never count as recommended (if fewer than k items are
    left, the list is shorter). Items the scorer itself scores ``-inf`` are treated the same way.
    Ties are broken by ``torch.topk`` (unspecified order). Test items are taken as given: one that
    is also a training or excluded item counts in ``|test|`` but can never be hit.

    With ``hits`` = relevant items in the top-k and ``r`` = min(k, |test|):
    ``recall@k = hits / r``; ``ndcg@k = DCG / IDCG`` with binary relevance,
    ``DCG = sum 1 / log2(rank + 1)`` (1-based ranks) and IDCG over ``r`` items;
    ``hitrate@k = [hits > 0]``; ``mrr@k = 1 / rank of the first hit`` (0 if none);
    ``coverage@k`` = distinct items in any evaluated user's top-k / (N - excluded items).

    Args:
        score_users: maps int64 user indices ``(B,)`` to scores ``(B, N)`` over all items.
        train: users x items sparse matrix; nonzero = seen in training (never ranked).
        test: users x items sparse matrix, same shape; nonzero = relevant held-out item.
        ks: positive cut-offs.
        batch_size: users scored per call of ``score_users``.
        exclude_items: item indices never ranked for anyone (e.g. the OOV index 0).

    Returns:
        ``{"recall@k", "ndcg@k", "hitrate@k", "mrr@k", "coverage@k"}`` for each k, and
        ``"n_users"`` (number of users evaluated).

    Raises:
        ConfigError: bad ``ks``, ``batch_size``, ``exclude_items``, matrix shapes, or scorer output.
        DataError: ``test`` has no nonzero entry, so there is no user to evaluate.

    Example:
        >>> train = sp.csr_matrix(np.array([[1, 0, 0, 0]]))
        >>> test = sp.csr_matrix(np.array([[0, 0, 1, 0]]))
        >>> scorer = lambda users: torch.tensor([[4.0, 3.0, 2.0, 1.0]]).expand(len(users), -1)
        >>> evaluate_ranking(scorer, train, test, ks=[1, 2])["recall@2"]
        1.0
    """
    ks = _check_ks(ks)
    batch_size = _check_int(batch_size, "batch_size")
    train, test = _as_csr(train, "train"), _as_csr(test, "test")
    if train.shape != test.shape:
        raise ConfigError(f"train and test must have the same shape (users, items): "
                          f"train is {train.shape}, test is {test.shape}")
    n_items = train.shape[1]
    excluded = torch.zeros(n_items, dtype=torch.bool)
    if len(exclude_items):
        ex = torch.as_tensor(np.asarray(exclude_items, dtype=np.int64))
        if ex.min() < 0 or ex.max() >= n_items:
            raise ConfigError(f"exclude_items must be item indices in [0, {n_items}), "
                              f"found values in [{int(ex.min())}, {int(ex.max())}]")
        excluded[ex] = True
    n_rankable = n_items - int(excluded.sum())
    users = np.flatnonzero(test.getnnz(axis=1) > 0)
    if len(users) == 0:
        raise DataError(f"test matrix {test.shape} has no nonzero entry: no user to evaluate")
    kmax = min(max(ks), n_items)

    discounts = 1.0 / torch.log2(torch.arange(2, kmax + 2, dtype=torch.float64))
    idcg = torch.cumsum(discounts, 0)  # idcg[r - 1] = ideal DCG of r relevant items
    reciprocal_ranks = 1.0 / torch.arange(1, kmax + 1, dtype=torch.float64)
    sums = {f"{m}@{k}": 0.0 for k in ks for m in METRICS[:-1]}
    covered = {k: torch.zeros(n_items, dtype=torch.bool) for k in ks}

    for start in range(0, len(users), batch_size):
        batch = users[start:start + batch_size]
        scores = score_users(torch.from_numpy(batch))
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (len(batch), n_items):
            found = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ConfigError(f"score_users must return a tensor of shape (B, N) = "
                              f"({len(batch)}, {n_items}), found {found}")
        scores = scores.detach().cpu()
        if scores.is_floating_point() and torch.isnan(scores).any():
            raise ConfigError(f"score_users returned NaN scores for users in {batch[0]}..{batch[-1]}")
        mask = _dense_rows(train, batch) | excluded
        idx = top_k(scores, kmax, mask)
        valid = ~mask.gather(1, idx) & (scores.gather(1, idx) != -torch.inf)
        hits = (_dense_rows(test, batch).gather(1, idx) & valid).double()
        n_test = torch.from_numpy(test[batch].getnnz(axis=1))
        for k in ks:
            h = hits[:, :k]
            r = n_test.clamp(max=min(k, kmax))
            n_hits = h.sum(1)
            sums[f"recall@{k}"] += float((n_hits / n_test.clamp(max=k)).sum())
            sums[f"ndcg@{k}"] += float(((h * discounts[:k]).sum(1) / idcg[r - 1]).sum())
            sums[f"hitrate@{k}"] += float((n_hits > 0).sum())
            sums[f"mrr@{k}"] += float((h * reciprocal_ranks[:k]).amax(1).sum())
            covered[k][idx[:, :k][valid[:, :k]]] = True

    out: dict[str, float] = {}
    for k in ks:
        for m in METRICS[:-1]:
            out[f"{m}@{k}"] = sums[f"{m}@{k}"] / len(users)
        out[f"coverage@{k}"] = int(covered[k].sum()) / n_rankable if n_rankable else 0.0
    out["n_users"] = len(users)
    return out


def _dense_rows(m: sp.csr_matrix, rows: np.ndarray) -> torch.Tensor:
    """Boolean ``(len(rows), N)`` mask of the nonzero cells of ``rows`` of a canonical CSR matrix."""
    sub = m[rows]
    mask = torch.zeros(sub.shape, dtype=torch.bool)
    r = np.repeat(np.arange(len(rows)), np.diff(sub.indptr))
    mask[torch.from_numpy(r), torch.from_numpy(sub.indices.astype(np.int64))] = True
    return mask


def _as_csr(m: object, name: str) -> sp.csr_matrix:
    """``m`` as a CSR matrix without duplicates or explicit zeros (copied only if needed)."""
    if not sp.issparse(m):
        raise ConfigError(f"{name} must be a scipy sparse matrix (users x items), "
                          f"found {type(m).__name__}")
    m = sp.csr_matrix(m)
    if not m.has_canonical_format or (m.data == 0).any():
        m = m.copy()
        m.sum_duplicates()
        m.eliminate_zeros()
    return m


def _check_int(value: object, name: str) -> int:
    """``value`` as a positive int, or ConfigError."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ConfigError(f"{name} must be a positive integer, found {value!r}") from None
    if value < 1:
        raise ConfigError(f"{name} must be a positive integer, found {value}")
    return value


def _check_ks(ks: Sequence[int]) -> list[int]:
    """``ks`` as a non-empty list of distinct positive ints (order kept), or ConfigError."""
    if isinstance(ks, (int, np.integer)) or not len(ks):
        raise ConfigError(f"ks must be a non-empty sequence of positive integers, found {ks!r}")
    return list(dict.fromkeys(_check_int(k, f"ks element of {list(ks)!r}") for k in ks))
