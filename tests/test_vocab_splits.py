import numpy as np
import pandas as pd
import pytest

from recsys.data.splits import SplitConfig, split
from recsys.data.vocab import OOV, Vocabulary
from recsys.errors import ConfigError, DataError


def test_vocab_orders_by_frequency_and_maps_rare_ids_to_oov(tmp_path):
    values = pd.Series([5, 7, 7, 9, 9, 9, 11])
    vocab = Vocabulary.build(values, min_count=2, name="item")
    assert vocab.ids.tolist() == [9, 7]
    assert len(vocab) == 3  # OOV + 2
    assert vocab.index_counts().tolist() == [2, 3, 2]  # 5 and 11 fell below min_count
    assert vocab.lookup([9, 7, 5, 123]).tolist() == [1, 2, OOV, OOV]
    assert vocab.lookup([9, 123], missing="negative").tolist() == [1, -1]
    with pytest.raises(DataError, match=r"vocabulary 'item': 1 unknown ids, e.g. \[123\]"):
        vocab.lookup([9, 123], missing="error")
    assert vocab.raw([2, 1]).tolist() == [7, 9]
    vocab.save(tmp_path / "v.parquet")
    loaded = Vocabulary.load(tmp_path / "v.parquet")
    assert loaded.ids.tolist() == [9, 7] and loaded.index_counts().tolist() == [2, 3, 2] and loaded.name == "item"


def test_vocab_ties_broken_by_raw_id_and_string_ids():
    vocab = Vocabulary.build(pd.Series(["b", "a", "c", "a", "b"]))
    assert vocab.ids.tolist() == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="min_count must be >= 1"):
        Vocabulary.build(pd.Series([1]), min_count=0)


def _frame(n_users=50, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(3, 30, n_users)
    users = np.repeat(np.arange(1, n_users + 1), sizes)
    return pd.DataFrame({"user": users, "item": rng.integers(1, 500, len(users)),
                         "timestamp": rng.integers(0, 10_000, len(users))})


def _pairs(frame):
    return set(zip(frame["user"], frame["item"], frame["timestamp"]))


def test_random_holdout_is_per_user_deterministic_and_disjoint():
    frame = _frame()
    parts = split(frame, SplitConfig("random_holdout", test_fraction=0.2, seed=1))
    assert len(parts["train"]) + len(parts["test"]) == len(frame)
    assert not _pairs(parts["train"]) & _pairs(parts["test"])
    held = parts["test"].groupby("user").size()
    sizes = frame.groupby("user").size()
    assert (held == np.floor(0.2 * sizes[held.index] + 0.5)).all()
    again = split(frame, SplitConfig("random_holdout", test_fraction=0.2, seed=1))
    pd.testing.assert_frame_equal(parts["test"], again["test"])
    other = split(frame, SplitConfig("random_holdout", test_fraction=0.2, seed=2))
    assert not parts["test"].equals(other["test"])


def test_leave_last_out_holds_out_each_users_latest_rows():
    frame = _frame()
    parts = split(frame, SplitConfig("leave_last_out", n_last=2))
    assert (parts["test"].groupby("user").size() == 2).all()
    last_train = parts["train"].groupby("user")["timestamp"].max()
    first_test = parts["test"].groupby("user")["timestamp"].min()
    assert (last_train <= first_test[last_train.index]).all()


def test_time_split_has_no_future_in_train_and_valid_split():
    frame = _frame()
    parts = split(frame, SplitConfig("time_split", test_fraction=0.25, valid_fraction=0.1))
    assert parts["train"]["timestamp"].max() <= parts["valid"]["timestamp"].min()
    assert parts["valid"]["timestamp"].max() <= parts["test"]["timestamp"].min()
    assert abs(len(parts["test"]) / len(frame) - 0.25) < 0.02
    assert sum(map(len, parts.values())) == len(frame)


def test_split_errors():
    with pytest.raises(ConfigError, match="split.method must be"):
        SplitConfig(method="bogus")
    with pytest.raises(ConfigError, match=r"split.test_fraction must be in \[0, 1\), got 1.5"):
        SplitConfig(test_fraction=1.5)
    with pytest.raises(DataError, match="needs a 'timestamp' column"):
        split(pd.DataFrame({"user": [1], "item": [2]}), SplitConfig("leave_last_out"))


def test_integer_ids_look_up_as_a_hash_index_does():
    """Integer vocabularies search a sorted copy (no hash table); the answers equal pandas' hash index."""
    rng = np.random.default_rng(3)
    ids = np.unique(rng.integers(-(2**62), 2**62, size=5000))
    rng.shuffle(ids)
    vocab = Vocabulary(ids, None, name="item")
    values = np.concatenate([ids[::7], rng.integers(-(2**62), 2**62, size=500), [0, -1, 2**63 - 1, -(2**63)]])
    expected = pd.Index(ids).get_indexer(values)
    expected = np.where(expected < 0, -1, expected + 1)
    assert vocab.lookup(values, missing="negative").tolist() == expected.tolist()
    assert vocab.lookup(pd.Series(values), missing="negative").tolist() == expected.tolist()
    assert vocab.lookup(values.astype(object), missing="negative").tolist() == expected.tolist()  # hashed once
    assert vocab.lookup(np.array([ids[3], 5], dtype=object)).tolist() == [4, vocab.lookup([5])[0]]
