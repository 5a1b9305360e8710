"""Tests of recsys.evaluation: ranking metrics vs a brute-force reference and hand-computed examples
(both recall definitions, NDCG, tied@k), tie-breaking, popularity, CTR metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recsys.errors import ConfigError, DataError
from recsys.evaluation import (PopularityScorer, ctr_metrics, evaluate_ranking,
                               ranking_metric_names, top_k)
from recsys.evaluation.ranking import _ranked, _TieKeys


def reference(scores, train, test, ks, exclude=()):
    """Pure-Python metrics: loops over users and sorted lists (scores must have no ties)."""
    n_users, n_items = scores.shape
    out, covered, evaluated = {}, {k: set() for k in ks}, 0
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "recall_capped", "ndcg", "hitrate", "mrr")}
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
            sums[f"recall@{k}"] += len(ranks) / len(relevant)
            sums[f"recall_capped@{k}"] += len(ranks) / r
            sums[f"ndcg@{k}"] += (sum(1 / math.log2(x + 1) for x in ranks)
                                  / sum(1 / math.log2(x + 1) for x in range(1, r + 1)))
            sums[f"hitrate@{k}"] += float(bool(ranks))
            sums[f"mrr@{k}"] += 1 / ranks[0] if ranks else 0.0
    for k in ks:
        for m in ("recall", "recall_capped", "ndcg", "hitrate", "mrr"):
            out[f"{m}@{k}"] = sums[f"{m}@{k}"] / evaluated
        out[f"coverage@{k}"] = len(covered[k]) / (n_items - len(set(exclude)))
        out[f"tied@{k}"] = 0.0  # no ties
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
    # k=3: [1, 2, 3], hit at rank 2: recall = 1/2 = 1/min(3, 2) = 0.5; DCG = 1/log2(3) = 0.6309298;
    #      IDCG = 1 + 1/log2(3) = 1.6309298; ndcg = 0.3868528; mrr = 0.5; coverage 3/4.
    # k=5: same 3-item list (item 4 is excluded yet counts in |test|): same values.
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    train = sp.csr_matrix(np.array([[1, 0, 0, 0, 0]]))
    test = sp.csr_matrix(np.array([[0, 0, 1, 0, 1]]))
    got = evaluate_ranking(scorer_of(scores), train, test, ks=(1, 3, 5), exclude_items=(4,))
    assert got["recall@1"] == got["ndcg@1"] == got["hitrate@1"] == got["mrr@1"] == 0.0
    assert got["coverage@1"] == 0.25
    for k in (3, 5):
        assert got[f"recall@{k}"] == got[f"recall_capped@{k}"] == pytest.approx(0.5)
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


def test_both_recall_definitions_and_ndcg_idcg_by_hand():
    # 50 items ranked 0, 1, 2, ... for both users (score 50 - i); nothing trained or excluded.
    # User A: |test| = 3, test = {0, 2, 40}.
    #   k=2: top [0, 1], 1 hit: recall 1/3, capped 1/min(2, 3) = 1/2;
    #        NDCG = 1 / (1 + 1/log2 3) (IDCG over min(2, 3) = 2 items).
    #   k=20: hits at ranks 1 and 3: recall 2/3, capped 2/min(20, 3) = 2/3;
    #        NDCG = (1 + 1/log2 4) / (1 + 1/log2 3 + 1/log2 4) (IDCG over 3 items).
    # User B: |test| = 30, test = {0..11} + {25..42}.
    #   k=2: 2 hits: recall 2/30, capped 2/2 = 1; NDCG 1.
    #   k=20: 12 hits (ranks 1..12): recall 12/30, capped 12/min(20, 30) = 12/20;
    #        NDCG = sum_{r<=12} 1/log2(r+1) / sum_{r<=20} 1/log2(r+1) (IDCG over 20, not 30).
    n_items = 50
    test = np.zeros((2, n_items))
    test[0, [0, 2, 40]] = 1
    test[1, list(range(12)) + list(range(25, 43))] = 1
    assert test.sum(1).tolist() == [3, 30]
    scores = np.tile(np.arange(n_items, 0, -1, dtype=np.float32), (2, 1))
    got = evaluate_ranking(scorer_of(scores), sp.csr_matrix((2, n_items)), sp.csr_matrix(test), ks=(2, 20))

    def dcg(ranks):
        return sum(1 / math.log2(r + 1) for r in ranks)

    assert got["recall@2"] == pytest.approx((1 / 3 + 2 / 30) / 2)  # 0.2
    assert got["recall_capped@2"] == pytest.approx((1 / 2 + 1) / 2)  # 0.75
    assert got["recall@20"] == pytest.approx((2 / 3 + 12 / 30) / 2)  # 0.5333
    assert got["recall_capped@20"] == pytest.approx((2 / 3 + 12 / 20) / 2)  # 0.6333
    ndcg_a2 = 1 / (1 + 1 / math.log2(3))
    ndcg_a20 = dcg([1, 3]) / dcg([1, 2, 3])
    ndcg_b20 = dcg(range(1, 13)) / dcg(range(1, 21))
    assert got["ndcg@2"] == pytest.approx((ndcg_a2 + 1.0) / 2, abs=1e-12)
    assert got["ndcg@20"] == pytest.approx((ndcg_a20 + ndcg_b20) / 2, abs=1e-12)
    assert ndcg_b20 != pytest.approx(dcg(range(1, 13)) / dcg(range(1, 31)))  # the two IDCGs differ
    assert got["tied@2"] == got["tied@20"] == 0.0 and got["n_users"] == 2


def test_tied_share_by_hand():
    # U0 scores [5, 3, 3, 3, 1, 1]; U1 the same with item 5 trained (5 eligible items);
    # U2 [4, 4, 2, 2, 2, 0]. Tied slots (top-k slots whose score an eligible item outside has):
    #   k=2: U0 1 (a 3; two 3s outside), U1 1, U2 0 (both 4s inside)  -> 2 / (2+2+2) = 1/3
    #   k=4: U0 0 (all three 3s inside), U1 0, U2 2 (two of three 2s)  -> 2 / (4+4+4) = 1/6
    #   k=5: U0 1 (one of two 1s), U1 0 (its only 1 is inside), U2 0   -> 1 / (5+5+5) = 1/15
    #   k=6: nothing outside anyone's list (U1's list has 5 filled slots)  -> 0 / (6+5+6) = 0
    scores = np.array([[5, 3, 3, 3, 1, 1], [5, 3, 3, 3, 1, 1], [4, 4, 2, 2, 2, 0]], dtype=np.float32)
    train = sp.csr_matrix(np.array([[0] * 6, [0, 0, 0, 0, 0, 1], [0] * 6]))
    test = sp.csr_matrix(np.array([[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]]))
    for tie_break in ("random", "index"):
        got = evaluate_ranking(scorer_of(scores), train, test, ks=(2, 4, 5, 6), tie_break=tie_break)
        assert got["tied@2"] == pytest.approx(1 / 3) and got["tied@4"] == pytest.approx(1 / 6)
        assert got["tied@5"] == pytest.approx(1 / 15) and got["tied@6"] == 0.0
    # a constant scorer: every slot is decided by a tie
    const = evaluate_ranking(lambda u: torch.zeros(len(u), 6), train, test, ks=(2, 5))
    assert const["tied@2"] == 1.0 and const["tied@5"] == pytest.approx(10 / 15)  # U1 has no 6th item


@pytest.mark.parametrize("tie_break", ["random", "index"])
@pytest.mark.parametrize("seed", range(4))
def test_ranked_lists_equal_a_full_sort_by_score_then_key(tie_break, seed):
    # integer scores with many ties, excluded cells and -inf scores, some rows with < k eligible items
    rng = np.random.default_rng(seed)
    n_users, n_items, k = 40, 30, 8
    scores = torch.from_numpy(rng.integers(0, 4, (n_users, n_items)).astype(np.float32))
    scores[rng.random((n_users, n_items)) < 0.2] = -torch.inf
    scores[:3, 5:] = -torch.inf  # rows 0-2: 5 eligible items at most
    users = torch.from_numpy(rng.choice(10_000, n_users, replace=False))
    keys = _TieKeys(tie_break, seed, n_items)
    idx, vals, _ = _ranked(scores, k, users, keys)
    all_keys = keys(users)
    for u in range(n_users):
        eligible = [i for i in range(n_items) if scores[u, i] > -torch.inf]
        want = sorted(eligible, key=lambda i: (-scores[u, i].item(), -all_keys[u, i].item()))[:k]
        assert idx[u, :len(want)].tolist() == want
        assert vals[u].tolist() == sorted(scores[u].tolist(), reverse=True)[:k]
    if tie_break == "index":  # ties go to the lower index
        assert (all_keys == -torch.arange(n_items)).all()


def _skewed_test(n_users, n_items, per_user, seed=0):
    """Test items drawn with probability ~ 1/(i+1): low indices are the popular ones, as in a vocabulary."""
    rng = np.random.default_rng(seed)
    p = 1 / np.arange(1, n_items + 1)
    test = np.zeros((n_users, n_items))
    for u in range(n_users):
        test[u, rng.choice(n_items, per_user, replace=False, p=p / p.sum())] = 1
    return sp.csr_matrix(test)


def test_constant_scorer_gets_random_recall_not_popularity():
    # Every user: 5 test items out of 200, none trained: a random top-10 has E[recall] = 10 / 200.
    # The per-user sd of recall is ~0.097, so the mean over 3000 users has sd ~0.0018.
    n_users, n_items = 3000, 200
    test = _skewed_test(n_users, n_items, 5)
    train = sp.csr_matrix((n_users, n_items))
    const = lambda u: torch.zeros(len(u), n_items)  # noqa: E731
    got = evaluate_ranking(const, train, test, ks=(10,))
    assert got["recall@10"] == pytest.approx(10 / n_items, abs=0.01)
    assert got["hitrate@10"] == pytest.approx(1 - math.comb(195, 10) / math.comb(200, 10), abs=0.03)
    assert got["tied@10"] == 1.0 and got["coverage@10"] == 1.0  # each user gets other items
    by_index = evaluate_ranking(const, train, test, ks=(10,), tie_break="index")
    assert by_index["recall@10"] > 0.3 and by_index["coverage@10"] == 10 / n_items  # the old flattery


def test_tie_breaking_is_seeded_and_does_not_favour_low_indices():
    n_users, n_items = 2000, 100
    const = lambda u: torch.zeros(len(u), n_items)  # noqa: E731
    train = sp.csr_matrix((n_users, n_items))
    low = sp.csr_matrix(np.tile(np.arange(n_items) < 5, (n_users, 1)).astype(np.float32))  # items 0-4
    high = sp.csr_matrix(low.toarray()[:, ::-1])  # items 95-99: the same data, item order reversed
    a = evaluate_ranking(const, train, low, ks=(10,), seed=3)
    assert a == evaluate_ranking(const, train, low, ks=(10,), seed=3)  # same seed, same result
    assert_same(evaluate_ranking(const, train, low, ks=(10,), seed=3, batch_size=7), a)  # any batch size
    assert a != evaluate_ranking(const, train, low, ks=(10,), seed=4)
    b = evaluate_ranking(const, train, high, ks=(10,), seed=3)
    for got in (a, b):  # E[recall@10] = 10 / 100 either way; sd of the mean ~0.0027
        assert got["recall@10"] == pytest.approx(0.1, abs=0.015)
    assert evaluate_ranking(const, train, low, ks=(10,), tie_break="index")["recall@10"] == 1.0
    assert evaluate_ranking(const, train, high, ks=(10,), tie_break="index")["recall@10"] == 0.0


def test_tie_break_does_not_change_tie_free_results():
    scores, train, test = random_data(5, n_users=30, n_items=20)
    want = reference(scores, train, test, (3, 7))
    for tie_break, seed in (("random", 0), ("random", 99), ("index", 0)):
        got = evaluate_ranking(scorer_of(scores), train, test, ks=(3, 7), tie_break=tie_break, seed=seed)
        assert_same(got, want)


def test_validation_errors():
    scores, train, test = random_data(0)
    scorer = scorer_of(scores)
    with pytest.raises(ConfigError, match=r"^train and test must have the same shape \(users, items\): "
                                          r"train is \(7, 12\), test is \(7, 11\)$"):
        evaluate_ranking(scorer, train, test[:, :11])
    with pytest.raises(ConfigError, match=r"^ks must be a non-empty sequence of positive integers, found \(\)$"):
        evaluate_ranking(scorer, train, test, ks=())
    for ks, found in (((0,), "0"), ((2.5,), "2.5"), ((True,), "True")):
        with pytest.raises(ConfigError, match=rf"^ks element of \[{found}\] must be a positive integer, "
                                              rf"found {found}$"):
            evaluate_ranking(scorer, train, test, ks=ks)
    with pytest.raises(ConfigError, match=r"^score_users must return a tensor of shape \(B, N\) = "
                                          r"\(6, 12\), found \(6, 11\)$"):
        evaluate_ranking(lambda u: torch.from_numpy(scores)[u][:, :11], train, test)
    with pytest.raises(ConfigError, match=r"^exclude_items must be item indices in \[0, 12\), "
                                          r"found values in \[0, 12\]$"):
        evaluate_ranking(scorer, train, test, exclude_items=(0, 12))
    with pytest.raises(ConfigError, match="^batch_size must be a positive integer, found 0$"):
        evaluate_ranking(scorer, train, test, batch_size=0)
    with pytest.raises(ConfigError, match="^train must be a scipy sparse matrix .users x items., found ndarray$"):
        evaluate_ranking(scorer, train.toarray(), test)
    with pytest.raises(DataError, match=r"^test matrix \(7, 12\) has no nonzero entry: no user to evaluate$"):
        evaluate_ranking(scorer, train, sp.csr_matrix(test.shape))
    with pytest.raises(ConfigError, match="^tie_break must be one of 'random', 'index', found 'pessimistic'$"):
        evaluate_ranking(scorer, train, test, tie_break="pessimistic")
    for seed in (-1, 2**32, 1.5, True):
        with pytest.raises(ConfigError, match=rf"^seed must be an integer in \[0, 2\*\*32\), found {seed}$"):
            evaluate_ranking(scorer, train, test, seed=seed)
    nan = scores.copy()
    nan[2, 3] = np.nan
    with pytest.raises(ConfigError, match=r"^score_users returned NaN scores for users in 0\.\.6$"):
        evaluate_ranking(scorer_of(nan), train, test)


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


def test_trainer_config_rejects_bad_evaluation_settings():
    from recsys.training.loop import TrainerConfig

    assert TrainerConfig().eval_tie_break == "random" and TrainerConfig(eval_seed=2**32 - 1).eval_seed == 2**32 - 1
    with pytest.raises(ConfigError, match="^trainer.eval_tie_break must be one of 'random', 'index', found 'low'$"):
        TrainerConfig(eval_tie_break="low")
    with pytest.raises(ConfigError, match=r"^trainer.eval_seed must be an integer in \[0, 2\*\*32\), found -3$"):
        TrainerConfig(eval_seed=-3)
