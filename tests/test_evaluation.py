"""Tests of recsys.evaluation: ranking metrics vs a brute-force reference, popularity, CTR metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recsys.errors import ConfigError, DataError
from recsys.evaluation import (PopularityScorer, ctr_metrics, evaluate_ranking,
                               ranking_metric_names, top_k)


def reference(scores, train, test, ks, exclude=()):
    """Pure-Python metrics: loops over users and sorted lists (scores must have no ties)."""
    n_users, n_items = scores.shape
    out, covered, evaluated = {}, {k: set() for k in ks}, 0
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg", "hitrate", "mrr")}
    for u in range(n_users):
        relevant = set(test[u].nonzero()[1].tolist())
        if not relevant:
            continue
        evaluated += 1
        seen = set(train[u].nonzero()[1].tolist()) | set(exclude)
        ranked = sorted((i for i in range(n_items) if i not in seen), key=lambda i: -scores[u, i])
        for k in ks:
            top = ranked[:k]
            covered[k].update(top)
            ranks = [r + 1 for r, i in enumerate(top) if i in relevant]
            r = min(k, len(relevant))
            sums[f"recall@{k}"] += len(ranks) / r
            sums[f"ndcg@{k}"] += (sum(1 / math.log2(x + 1) for x in ranks)
                                  / sum(1 / math.log2(x + 1) for x in range(1, r + 1)))
            sums[f"hitrate@{k}"] += float(bool(ranks))
            sums[f"mrr@{k}"] += 1 / ranks[0] if ranks else 0.0
    for k in ks:
        for m in ("recall", "ndcg", "hitrate", "mrr"):
            out[f"{m}@{k}"] = sums[f"{m}@{k}"] / evaluated
        out[f"coverage@{k}"] = len(covered[k]) / (n_items - len(set(exclude)))
    out["n_users"] = evaluated
    return out


def random_data(seed, n_users=7, n_items=12):
    """Random tie-free scores and disjoint train/test matrices; user 3 has no test item."""
    rng = np.random.default_rng(seed)
    scores = rng.permutation(n_users * n_items).reshape(n_users, n_items).astype(np.float32)
    state = rng.choice(3, size=(n_users, n_items), p=[0.5, 0.3, 0.2])  # 0 none, 1 train, 2 test
    state[np.arange(n_users), rng.integers(0, n_items, n_users)] = 2  # every user has a test item
    state[3][state[3] == 2] = 0  # ... except user 3
    train = sp.csr_matrix((state == 1).astype(np.float32))
    test = sp.csr_matrix((state == 2).astype(np.float32))
    return scores, train, test


def scorer_of(scores):
    table = torch.from_numpy(np.asarray(scores))
    return lambda users: table[users]


def assert_same(got, want):
    assert list(got) == list(want)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("exclude", [(), (0,), (0, 5)])
def test_matches_brute_force_reference(seed, exclude):
    scores, train, test = random_data(seed)
    ks = (1, 3, 5)
    got = evaluate_ranking(scorer_of(scores), train, test, ks=ks, exclude_items=exclude)
    assert_same(got, reference(scores, train, test, ks, exclude))
    assert got["n_users"] == 6  # user 3 has no test item and is skipped
    assert list(got) == ranking_metric_names(ks)


def test_k_larger_than_rankable_items_gives_short_lists():
    scores, train, test = random_data(7, n_users=5, n_items=6)
    got = evaluate_ranking(scorer_of(scores), train, test, ks=(4, 6, 50), exclude_items=(1,))
    assert_same(got, reference(scores, train, test, (4, 6, 50), (1,)))


def test_hand_computed_example():
    # One user, 5 items scored 0.9 > 0.8 > ... > 0.5 (ranking 0, 1, 2, 3, 4).
    # Train item 0 and excluded item 4 are removed: the ranked list is [1, 2, 3]. Test = {2, 4}.
    # k=1: [1], no hit -> all 0; coverage 1/4 (4 rankable items: 1, 2, 3 and train item 0).
    # k=3: [1, 2, 3], hit at rank 2: recall = 1/min(3, 2) = 0.5; DCG = 1/log2(3) = 0.6309298;
    #      IDCG = 1 + 1/log2(3) = 1.6309298; ndcg = 0.3868528; mrr = 0.5; coverage 3/4.
    # k=5: same 3-item list (item 4 is excluded yet counts in |test|): same values.
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    train = sp.csr_matrix(np.array([[1, 0, 0, 0, 0]]))
    test = sp.csr_matrix(np.array([[0, 0, 1, 0, 1]]))
    got = evaluate_ranking(scorer_of(scores), train, test, ks=(1, 3, 5), exclude_items=(4,))
    assert got["recall@1"] == got["ndcg@1"] == got["hitrate@1"] == got["mrr@1"] == 0.0
    assert got["coverage@1"] == 0.25
    for k in (3, 5):
        assert got[f"recall@{k}"] == pytest.approx(0.5)
        assert got[f"ndcg@{k}"] == pytest.approx(0.3868528, abs=1e-7)
        assert got[f"hitrate@{k}"] == 1.0
        assert got[f"mrr@{k}"] == pytest.approx(0.5)
        assert got[f"coverage@{k}"] == pytest.approx(0.75)
    assert got["n_users"] == 1


def test_batch_size_does_not_change_results():
    scores, train, test = random_data(11, n_users=23, n_items=15)
    calls = []

    def scorer(users):
        calls.append(len(users))
        return torch.from_numpy(scores)[users]

    whole = evaluate_ranking(scorer, train, test, ks=(2, 5), batch_size=1024)
    batched = evaluate_ranking(scorer, train, test, ks=(2, 5), batch_size=4)
    assert_same(batched, whole)
    assert max(calls[1:]) == 4 and len(calls) > 2


def test_training_items_never_ranked():
    scores, train, test = random_data(3)
    boosted = scores + 1000.0 * train.toarray()  # training items get the highest scores
    got = evaluate_ranking(scorer_of(boosted), train, test, ks=(1, 3, 5))
    assert_same(got, reference(scores, train, test, (1, 3, 5)))
    seen = train.toarray() > 0
    idx = top_k(torch.from_numpy(boosted), 3, torch.from_numpy(seen)).numpy()
    for u in range(len(seen)):  # the first min(3, unseen items) positions hold no training item
        assert not seen[u, idx[u, :min(3, (~seen[u]).sum())]].any()


def test_coverage_with_constant_ranking():
    n_items = 10
    fixed = torch.arange(n_items, 0, -1, dtype=torch.float32)  # always ranks 0, 1, 2, ...
    train = sp.csr_matrix((4, n_items))
    test = sp.csr_matrix(np.eye(4, n_items))
    scorer = lambda users: fixed.expand(len(users), -1)  # noqa: E731
    got = evaluate_ranking(scorer, train, test, ks=(1, 3))
    assert got["coverage@1"] == pytest.approx(1 / 10) and got["coverage@3"] == pytest.approx(3 / 10)
    got = evaluate_ranking(scorer, train, test, ks=(1, 3), exclude_items=(0,))
    assert got["coverage@1"] == pytest.approx(1 / 9) and got["coverage@3"] == pytest.approx(3 / 9)


def test_popularity_scorer():
    # Item j is seen by users 0..j-1, so counts are 0, 1, ..., 5 (no ties).
    n_users, n_items = 8, 6
    dense = np.array([[u < j for j in range(n_items)] for u in range(n_users)], dtype=np.float32)
    train = sp.csr_matrix(dense * 3.0)  # values are ignored, only nonzeros count
    scorer = PopularityScorer(train)
    assert torch.equal(scorer.counts, torch.from_numpy(dense.sum(0)))
    out = scorer(torch.tensor([0, 5, 7]))
    assert out.shape == (3, n_items) and torch.equal(out[1], scorer.counts)
    rng = np.random.default_rng(0)
    test = np.zeros_like(dense)
    for u in range(n_users):
        test[u, rng.choice(np.flatnonzero(dense[u] == 0))] = 1
    test = sp.csr_matrix(test)
    scores = np.broadcast_to(dense.sum(0), (n_users, n_items))
    got = evaluate_ranking(scorer, train, test, ks=(1, 2, 3), batch_size=3)
    assert_same(got, reference(scores, train, test, (1, 2, 3)))
    assert got["hitrate@1"] > 0  # user 0 has seen items 1..5: its only unseen item 0 ranks first


def test_validation_errors():
    scores, train, test = random_data(0)
    scorer = scorer_of(scores)
    with pytest.raises(ConfigError, match=r"train is \(7, 12\), test is \(7, 11\)"):
        evaluate_ranking(scorer, train, test[:, :11])
    for ks in ((), (0,), (2.5,), (True,)):
        with pytest.raises(ConfigError, match="ks"):
            evaluate_ranking(scorer, train, test, ks=ks)
    with pytest.raises(ConfigError, match=r"\(6, 12\), found \(6, 11\)"):
        evaluate_ranking(lambda u: torch.from_numpy(scores)[u][:, :11], train, test)
    with pytest.raises(ConfigError, match="exclude_items"):
        evaluate_ranking(scorer, train, test, exclude_items=(12,))
    with pytest.raises(ConfigError, match="batch_size"):
        evaluate_ranking(scorer, train, test, batch_size=0)
    with pytest.raises(ConfigError, match="sparse"):
        evaluate_ranking(scorer, train.toarray(), test)
    with pytest.raises(DataError, match="no user"):
        evaluate_ranking(scorer, train, sp.csr_matrix(test.shape))


def brute_force_auc(y, p):
    pos, neg = p[y == 1], p[y == 0]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(4))
def test_ctr_metrics_vs_brute_force(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 40)
    y[:2] = (0, 1)
    p = np.round(rng.random(40), 1)  # rounded: ties occur
    p[2:4] = (0.0, 1.0)  # clipped to [1e-7, 1 - 1e-7] for the log loss
    q = np.clip(p, 1e-7, 1 - 1e-7)
    logloss = -np.mean([math.log(b) if a else math.log(1 - b) for a, b in zip(y, q)])
    for got in (ctr_metrics(y, p), ctr_metrics(torch.from_numpy(y), torch.from_numpy(p).float())):
        assert got["auc"] == pytest.approx(brute_force_auc(y, p), abs=1e-12)
        assert got["logloss"] == pytest.approx(logloss, rel=1e-5)


def test_ctr_metrics_errors():
    with pytest.raises(ValueError, match="AUC is undefined: labels contain only class 1"):
        ctr_metrics(np.ones(5), np.full(5, 0.3))
    with pytest.raises(ValueError, match="only class 0"):
        ctr_metrics(torch.zeros(3), torch.rand(3))
    with pytest.raises(ValueError, match="4 elements but probabilities has 3"):
        ctr_metrics([0, 1, 0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ctr_metrics([0, 1], [-2.0, 3.0])
