"""Full-ranking evaluation: every user is ranked against all items, training items excluded.

Users are scored in batches; each batch becomes a dense ``(B, N)`` score matrix, its excluded
cells (the user's training items and ``exclude_items``) are set to ``-inf``, one ``torch.topk``
with ``K = max(ks)`` is taken, ties are broken as set by ``tie_break`` (see below), and every
metric for every cut-off is read from that single top-K list.

Definitions (``hits`` = relevant items in the top-k, ``|test|`` = the user's test items; each
metric is averaged over the users with at least one test item):

- ``recall@k = hits / |test|``: the definition in the code behind LightGCN's tables (He et al.
  2020), in BARS and in RecBole, i.e. the one most published top-k tables use.
- ``recall_capped@k = hits / min(k, |test|)``: the definition of the Mult-VAE (Liang et al. 2018)
  and EASE (Steck 2019) papers; it reaches 1 whenever the list is all hits. The two agree for
  users with at most k test items; compare a run with a published number under the same name.
- ``ndcg@k``: binary relevance, ``DCG = sum 1 / log2(rank + 1)`` over hits (1-based ranks),
  ``IDCG`` over ``min(k, |test|)`` items (as in LightGCN, BARS, RecBole and Mult-VAE).
- ``hitrate@k = [hits > 0]``; ``mrr@k = 1 / rank of the first hit`` (0 if none).
- ``coverage@k``: distinct items in any evaluated user's top-k / (N - excluded items).
- ``tied@k``: share of the filled top-k slots, pooled over the evaluated users, whose item was
  picked by a tie at the cut: the item's score equals the score of an eligible item left outside
  the top-k. 0 for tie-free scores; 1 for a constant scorer (when more than k items are
  eligible). A high value means the list, and every metric above, is decided by ``tie_break``.

Ties: ``torch.topk`` resolves them toward low indices, and vocabulary indices are ordered by
decreasing frequency, so a collapsed model (all scores equal) would be credited with
popularity's recall. ``tie_break="random"`` (the default) ranks tied items by a pseudo-random
key of ``(seed, user, item)``: a keyed bijective 32-bit hash, so keys never collide within a
user, the result is deterministic for a seed, does not depend on the batch size or on the order
of item indices, and the draws are independent across users (their average concentrates on the
expected value of a random choice). A constant scorer thus gets about the recall of a random
list. Pessimistic tie-breaking (relevant items last) was not chosen: it scores legitimately
tied models (integer counts, binary codes) below their expected value. ``tie_break="index"``
ranks lower item indices first (the former behaviour, made explicit).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from recsys.errors import ConfigError, DataError

METRICS = ("recall", "recall_capped", "ndcg", "hitrate", "mrr", "coverage", "tied")
TIE_BREAKS = ("random", "index")
METRIC_DEFINITIONS = (
    "recall@k = hits / |test items| (LightGCN, BARS, RecBole tables); "
    "recall_capped@k = hits / min(k, |test items|) (Mult-VAE, EASE papers); "
    "ndcg@k with IDCG over min(k, |test items|); ties in scores broken at random (seeded) unless "
    "tie_break='index'; tied@k = share of top-k slots decided by a tie at the cut")
"""One line naming the definitions, for reports that print or store metrics (benchmarks)."""

_M32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # odd multiplier < 2**31: products of 32-bit values stay below 2**63
_LOWEST = torch.iinfo(torch.int64).min


def ranking_metric_names(ks: Sequence[int]) -> list[str]:
    """Names of the metrics returned by :func:`evaluate_ranking`, in order.

    Args:
        ks: the cut-offs.

    Returns:
        ``["recall@k", "recall_capped@k", "ndcg@k", "hitrate@k", "mrr@k", "coverage@k",
        "tied@k", ...]`` for each k (duplicates dropped, order kept), followed by ``"n_users"``.

    Example:
        >>> ranking_metric_names([5])  # doctest: +NORMALIZE_WHITESPACE
        ['recall@5', 'recall_capped@5', 'ndcg@5', 'hitrate@5', 'mrr@5', 'coverage@5', 'tied@5',
         'n_users']
    """
    return [f"{m}@{k}" for k in _check_ks(ks) for m in METRICS] + ["n_users"]


def top_k(scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the ``k`` highest scores of each row, excluded cells ranked last.

    Ties are broken however ``torch.topk`` breaks them (in practice toward low indices);
    :func:`evaluate_ranking` does not rely on that and breaks ties itself (``tie_break``). If a
    row has fewer than ``k`` non-excluded cells the tail of its list holds excluded (``-inf``)
    cells; callers that care must check them.

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
    tie_break: str = "random",
    seed: int = 0,
) -> dict[str, float]:
    """Full-ranking top-k metrics, averaged over the users that have at least one test item.

    For each evaluated user all N items are scored; the user's training items and
    ``exclude_items`` get ``-inf``, and so never count as recommended (if fewer than k items are
    left, the list is shorter). Items the scorer itself scores ``-inf`` are treated the same way.
    Test items are taken as given: one that is also a training or excluded item counts in
    ``|test|`` but can never be hit. The metrics (``recall@k`` = hits / |test| as in LightGCN,
    BARS and RecBole; ``recall_capped@k`` = hits / min(k, |test|) as in Mult-VAE and EASE; NDCG
    with IDCG over min(k, |test|); ``tied@k``) and the tie-breaking are defined in the module
    docstring.

    Args:
        score_users: maps int64 user indices ``(B,)`` to scores ``(B, N)`` over all items.
        train: users x items sparse matrix; nonzero = seen in training (never ranked).
        test: users x items sparse matrix, same shape; nonzero = relevant held-out item.
        ks: positive cut-offs.
        batch_size: users scored per call of ``score_users``.
        exclude_items: item indices never ranked for anyone (e.g. the OOV index 0).
        tie_break: ``"random"``: equal scores are ordered by a seeded pseudo-random key per
            (user, item); ``"index"``: lower item index first.
        seed: seed of the random tie-breaking, in ``[0, 2**32)``.

    Returns:
        ``{"recall@k", "recall_capped@k", "ndcg@k", "hitrate@k", "mrr@k", "coverage@k",
        "tied@k"}`` for each k, and ``"n_users"`` (number of users evaluated).

    Raises:
        ConfigError: bad ``ks``, ``batch_size``, ``exclude_items``, ``tie_break``, ``seed``,
            matrix shapes, or scorer output.
        DataError: ``test`` has no nonzero entry, so there is no user to evaluate.

    Example:
        >>> train = sp.csr_matrix(np.array([[1, 0, 0, 0]]))
        >>> test = sp.csr_matrix(np.array([[0, 1, 1, 1]]))
        >>> scorer = lambda users: torch.tensor([[4.0, 3.0, 2.0, 1.0]]).expand(len(users), -1)
        >>> metrics = evaluate_ranking(scorer, train, test, ks=[2])
        >>> metrics["recall@2"], metrics["recall_capped@2"], metrics["tied@2"]
        (0.6666666666666666, 1.0, 0.0)
    """
    ks = _check_ks(ks)
    batch_size = _check_int(batch_size, "batch_size")
    check_tie_break(tie_break, seed)
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
    keys = _TieKeys(tie_break, int(seed), n_items)

    discounts = 1.0 / torch.log2(torch.arange(2, kmax + 2, dtype=torch.float64))
    idcg = torch.cumsum(discounts, 0)  # idcg[r - 1] = ideal DCG of r relevant items
    reciprocal_ranks = 1.0 / torch.arange(1, kmax + 1, dtype=torch.float64)
    sums = {f"{m}@{k}": 0.0 for k in ks for m in METRICS if m != "coverage"}
    filled = {k: 0 for k in ks}  # filled top-k slots (denominator of tied@k)
    covered = {k: torch.zeros(n_items, dtype=torch.bool) for k in ks}

    for start in range(0, len(users), batch_size):
        batch = users[start:start + batch_size]
        scores = score_users(torch.from_numpy(batch))
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (len(batch), n_items):
            found = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ConfigError(f"score_users must return a tensor of shape (B, N) = "
                              f"({len(batch)}, {n_items}), found {found}")
        scores = scores.detach().cpu()
        if not scores.is_floating_point():
            scores = scores.float()
        if torch.isnan(scores).any():
            raise ConfigError(f"score_users returned NaN scores for users in {batch[0]}..{batch[-1]}")
        scores = scores.masked_fill(_dense_rows(train, batch) | excluded, -torch.inf)
        idx, vals, n_cut = _ranked(scores, kmax, torch.from_numpy(batch), keys)
        valid = vals != -torch.inf
        hits = (_dense_rows(test, batch).gather(1, idx) & valid).double()
        n_test = torch.from_numpy(test[batch].getnnz(axis=1))
        for k in ks:
            h = hits[:, :k]
            r = n_test.clamp(max=min(k, kmax))
            n_hits = h.sum(1)
            sums[f"recall@{k}"] += float((n_hits / n_test).sum())
            sums[f"recall_capped@{k}"] += float((n_hits / n_test.clamp(max=k)).sum())
            sums[f"ndcg@{k}"] += float(((h * discounts[:k]).sum(1) / idcg[r - 1]).sum())
            sums[f"hitrate@{k}"] += float((n_hits > 0).sum())
            sums[f"mrr@{k}"] += float((h * reciprocal_ranks[:k]).amax(1).sum())
            covered[k][idx[:, :k][valid[:, :k]]] = True
            sums[f"tied@{k}"] += float(_tied_slots(vals, n_cut, min(k, kmax)).sum())
            filled[k] += int(valid[:, :k].sum())

    out: dict[str, float] = {}
    for k in ks:
        for m in METRICS:
            name = f"{m}@{k}"
            if m == "coverage":
                out[name] = int(covered[k].sum()) / n_rankable if n_rankable else 0.0
            elif m == "tied":
                out[name] = sums[name] / filled[k] if filled[k] else 0.0
            else:
                out[name] = sums[name] / len(users)
    out["n_users"] = len(users)
    return out


def check_tie_break(tie_break: str, seed: int, names: tuple[str, str] = ("tie_break", "seed")) -> None:
    """ConfigError unless ``tie_break`` is one of TIE_BREAKS and ``seed`` an integer in [0, 2**32); ``names``
    are what the message calls them (e.g. ``trainer.eval_tie_break``)."""
    if tie_break not in TIE_BREAKS:
        raise ConfigError(f"{names[0]} must be one of {', '.join(map(repr, TIE_BREAKS))}, found {tie_break!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= _M32:
        raise ConfigError(f"{names[1]} must be an integer in [0, 2**32), found {seed!r}")


class _TieKeys:
    """Tie-break keys, ``(B, M)`` int64, higher first: ``-item`` (``index``) or a keyed hash.

    For ``random`` the key of (user u, item i) is ``g(((h(i) ^ a_u) * m_u) mod 2**32)``: ``h`` is a
    seeded bijective 32-bit mixer (computed once per item), ``a_u`` and the odd ``m_u`` are hashes
    of (seed, u), and ``g(x) = x ^ (x >> 16)``. Every step is a bijection of ``[0, 2**32)``, so no
    two items of a user share a key, and each user and seed gets its own pseudo-random order at a
    cost of five integer operations per (user, item).
    """

    def __init__(self, tie_break: str, seed: int, n_items: int) -> None:
        self.random = tie_break == "random"
        self.seed = seed
        items = torch.arange(n_items, dtype=torch.int64)
        self.item_keys = _mix32(items ^ _mix32_int(seed ^ 0x5BD1E995)) if self.random else -items

    def __call__(self, users: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """Keys of ``items`` ``(B, M)`` (default: all N items) of ``users`` ``(B,)``."""
        keys = self.item_keys[None] if items is None else self.item_keys[items]
        if not self.random:
            return keys.expand(len(users), -1).clone()
        u = _mix32((users.to(torch.int64) & _M32) ^ _mix32_int(self.seed ^ 0x27D4EB2F))
        add, mul = u[:, None], ((_mix32(u ^ 0x165667B1) & 0x7FFFFFFF) | 1)[:, None]
        x = (keys ^ add).mul_(mul).bitwise_and_(_M32)  # mul < 2**31: the product stays below 2**63
        return x.bitwise_xor_(x >> 16)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of ``[0, 2**32)`` with good avalanche (xor-shift-multiply), on int64 tensors."""
    x = (((x >> 16) ^ x) * _MIX) & _M32
    x = (((x >> 16) ^ x) * _MIX) & _M32
    return (x >> 16) ^ x


def _mix32_int(x: int) -> int:
    return int(_mix32(torch.tensor([x & _M32], dtype=torch.int64))[0])


def _ranked(scores: torch.Tensor, k: int, users: torch.Tensor,
            keys: _TieKeys) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``k`` of each row of ``scores`` (excluded cells already ``-inf``), ties by key.

    ``torch.topk`` (of ``k + 1``, to see whether the cut splits a tie) gives the values and every
    item above the cut value ``c`` (the k-th value). Where more eligible items score ``c`` than
    the list has slots for them (the common tie-free case costs nothing more), those slots get the
    best-keyed items scoring ``c``; then each list is ordered by (value, key), both descending.
    The result depends only on the scores and the keys, never on ``torch.topk``'s own order.

    Returns:
        ``(B, k)`` item indices and their ``(B, k)`` scores (descending), and ``(B,)`` the number
        of eligible items scoring the cut value (``-inf`` cut: those in the list).
    """
    vals, idx = torch.topk(scores, min(k + 1, scores.shape[1]), dim=1)  # one more: is it tied?
    cut = vals[:, k - 1:k]
    tied = (vals[:, k:] == cut).any(1) & (cut[:, 0] != -torch.inf)  # the cut goes through a tie
    vals, idx = vals[:, :k], idx[:, :k].contiguous()
    in_list = (vals == cut).sum(1)
    n_cut = in_list.clone()
    rows = torch.nonzero(tied).squeeze(1)
    if len(rows):  # fill the tied slots with the best-keyed items scoring the cut value
        at_cut = scores[rows] == cut[rows]
        n_cut[rows] = at_cut.sum(1)
        tied_keys = keys(users[rows]).masked_fill_(~at_cut, _LOWEST)
        slots = in_list[rows]
        chosen = torch.topk(tied_keys, int(slots.max()), dim=1).indices
        first = k - slots  # first tied slot of each row
        pos = torch.arange(k)[None]
        offset = (pos - first[:, None]).clamp(min=0, max=chosen.shape[1] - 1)
        idx[rows] = torch.where(pos >= first[:, None], chosen.gather(1, offset), idx[rows])
    order = torch.argsort(keys(users, idx), dim=1, descending=True)
    idx = idx.gather(1, order)
    order = torch.sort(vals.gather(1, order), dim=1, descending=True, stable=True).indices
    return idx.gather(1, order), vals, n_cut


def _tied_slots(vals: torch.Tensor, n_cut: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the top-``k`` slots holding the k-th value when an eligible item outside the
    top-k has it too (else 0). ``vals``: the ``(B, K)`` descending top-K scores, ``K >= k``;
    ``n_cut``: eligible items scoring ``vals[:, -1]`` (see :func:`_ranked`)."""
    value = vals[:, k - 1:k]
    in_top = (vals[:, :k] == value).sum(1)
    # items above the K-th value are all in the top-K list; those at it number n_cut
    total = torch.where(value[:, 0] == vals[:, -1], n_cut, (vals == value).sum(1))
    return torch.where((value[:, 0] != -torch.inf) & (total > in_top), in_top, 0)


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
