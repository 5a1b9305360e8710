"""Given train/valid/test files (``data.source.splits``): published splits are prepared as they are."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf.errors import MissingMandatoryValue

from recsys.data.dataset import PreparedData
from recsys.data.prepare import CTRSettings, InteractionFilters, SourceConfig, prepare_ctr, prepare_interactions
from recsys.data.splits import SplitConfig
from recsys.errors import ConfigError, DataError
from recsys.training.loop import evaluate
from tests.conftest import shared_file


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def lightgcn_files(root) -> dict[str, str]:
    """A LightGCN split: a blank line, a bad token ('x', train line 4), a user without items (train line 5);
    test has a user (4) and an item (20) that train never has, and the pair (1, 12) of valid."""
    return {"train": str(write(root / "train.txt", "0 10 11 12\n1 11 13\n\n2 10 x 14\n3\n")),
            "valid": str(write(root / "valid.txt", "0 13\n1 12\n")),
            "test": str(write(root / "test.txt", "0 20\n1 10 12\n4 11\n"))}


def raw_pairs(data: PreparedData, split: str) -> set[tuple[str, str]]:
    table = pq.read_table(data.path(split))
    users = data.vocab("user").raw(table["user"].to_numpy())
    items = data.vocab("item").raw(table["item"].to_numpy())
    return set(zip(users.tolist(), items.tolist()))


# ---------------------------------------------------------------------------------- interactions


def test_lightgcn_given_split_keeps_every_split_and_one_vocabulary(tmp_path):
    files = lightgcn_files(tmp_path)
    manifest = prepare_interactions(SourceConfig("lightgcn", splits=files), tmp_path / "p", InteractionFilters(),
                                    SplitConfig(), max_bad_fraction=0.2)
    data = PreparedData.open(tmp_path / "p")
    assert data.splits == ["train", "valid", "test"]
    assert raw_pairs(data, "train") == {("0", "10"), ("0", "11"), ("0", "12"), ("1", "11"), ("1", "13"),
                                        ("2", "10"), ("2", "14")}
    assert raw_pairs(data, "valid") == {("0", "13"), ("1", "12")}
    assert raw_pairs(data, "test") == {("0", "20"), ("1", "10"), ("1", "12"), ("4", "11")}
    # one vocabulary over all splits: test-only user 4 and item 20 have indices; user 3 (no items) has none
    assert sorted(data.vocab("user").ids.tolist()) == ["0", "1", "2", "4"] and data.n_users == 5
    assert sorted(data.vocab("item").ids.tolist()) == ["10", "11", "12", "13", "14", "20"] and data.n_items == 7
    assert data.vocab("item").lookup(["20"]).tolist()[0] > 0
    rows = manifest["rows"]
    assert (rows["read"], rows["bad"], rows["train"], rows["valid"], rows["test"]) == (14, 1, 7, 2, 4)
    assert rows["by_split"]["train"] == {"read": 8, "bad": 1, "duplicates": 0, "below_min_count": 0,
                                         "below_min_user_interactions": 0, "kept": 7}
    assert rows["by_split"]["test"]["read"] == rows["by_split"]["test"]["kept"] == 4
    assert (rows["test_users_without_train"], rows["test_items_without_train"], rows["test_pairs_seen"]) == (1, 1, 1)
    assert (rows["valid_users_without_train"], rows["valid_items_without_train"], rows["valid_pairs_seen"]) == (0, 0, 0)
    assert manifest["split"] == {"method": "given", "files": {k: str(tmp_path / v) for k, v in
                                                              {"train": "train.txt", "valid": "valid.txt",
                                                               "test": "test.txt"}.items()}}
    assert manifest["sources"] == list(manifest["split"]["files"].values())
    bad = [json.loads(line) for line in (tmp_path / "p" / "quarantine.jsonl").read_text().splitlines()]
    assert bad == [{"source": files["train"], "line": 4, "reason": "item_id is not an integer id: 'x'", "text": "2 x"}]


def test_a_test_user_without_training_rows_is_evaluated(tmp_path):
    """Evaluation ranks every test user, with or without training rows (as LightGCN does); items of the
    user's train and valid rows are excluded from the test ranking."""
    prepare_interactions(SourceConfig("lightgcn", splits=lightgcn_files(tmp_path)), tmp_path / "p",
                         InteractionFilters(), SplitConfig(), max_bad_fraction=0.2)
    data = PreparedData.open(tmp_path / "p")
    preference = {"20": 6.0, "10": 5.0, "12": 4.0, "11": 3.0, "13": 2.0, "14": 1.0}  # distinct: no ties
    item_scores = torch.zeros(data.n_items)
    for raw, score in preference.items():
        item_scores[int(data.vocab("item").lookup([raw])[0])] = score
    metrics = evaluate(lambda users: item_scores.expand(len(users), -1), data, "test", ks=[1])
    # top-1 after excluding train + valid items: user 0 -> 20 (hit), user 1 -> 20 (miss: 10, 12), user 4 -> 20 (miss)
    assert metrics["n_users"] == 3 and metrics["hitrate@1"] == pytest.approx(1 / 3)


def _parquet(path, rows):
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"]).astype(
        {"rating": "float32", "timestamp": "int64"})
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
    return str(path)


def test_parquet_given_split_filters_are_counted_per_split(tmp_path):
    files = {"train": _parquet(tmp_path / "train.parquet", [(1, 100, 5, 1), (1, 101, 2, 2), (1, 100, 4, 3),
                                                             (2, 100, 5, 4), (3, 102, 5, 5)]),
             "valid": _parquet(tmp_path / "valid.parquet", [(1, 102, 5, 6), (2, 101, 1, 7)]),
             "test": _parquet(tmp_path / "test.parquet", [(1, 101, 5, 8), (1, 101, 5, 9), (2, 102, 4, 10),
                                                           (4, 100, 5, 11), (2, 100, 5, 12)])}
    filters = InteractionFilters(min_rating=4, min_user_interactions=2, dedupe=True)
    manifest = prepare_interactions(SourceConfig("parquet", splits=files), tmp_path / "p", filters, SplitConfig())
    by_split = manifest["rows"]["by_split"]
    # rating < 4: train (1, 101), valid (2, 101); duplicates within a split: train (1, 100), test (1, 101);
    # a user's rows over all splits: user 3 (1 row, train) and user 4 (1 row, test) are below 2
    assert by_split["train"] == {"read": 5, "bad": 0, "below_min_rating": 1, "duplicates": 1, "below_min_count": 0,
                                 "below_min_user_interactions": 1, "kept": 2}
    assert by_split["valid"] == {"read": 2, "bad": 0, "below_min_rating": 1, "duplicates": 0, "below_min_count": 0,
                                 "below_min_user_interactions": 0, "kept": 1}
    assert by_split["test"] == {"read": 5, "bad": 0, "below_min_rating": 0, "duplicates": 1, "below_min_count": 0,
                                "below_min_user_interactions": 1, "kept": 3}
    rows = manifest["rows"]
    assert (rows["below_min_rating"], rows["duplicates"], rows["below_min_user_interactions"]) == (2, 2, 2)
    # (2, 100) is in train and in test: kept in both (the published split is not altered), counted as seen
    assert (rows["test_pairs_seen"], rows["test_items_without_train"], rows["valid_items_without_train"]) == (1, 2, 1)
    data = PreparedData.open(tmp_path / "p")
    assert raw_pairs(data, "train") == {(1, 100), (2, 100)} and raw_pairs(data, "test") == {(1, 101), (2, 102), (2, 100)}
    test = pq.read_table(data.path("test")).to_pandas()
    assert test.columns.tolist() == ["user", "item", "rating", "timestamp"]
    assert sorted(test["timestamp"].tolist()) == [9, 10, 12]  # dedupe keeps the latest row


def test_split_files_with_different_columns_are_refused(tmp_path):
    files = {"train": _parquet(tmp_path / "train.parquet", [(1, 100, 5, 1)]),
             "test": str(tmp_path / "test.parquet")}
    pq.write_table(pa.table({"user_id": [1], "item_id": [101]}), files["test"])
    with pytest.raises(DataError, match=r"data\.source\.splits\.test: .*test\.parquet: columns \{'user_id': 'int64', "
                                        r"'item_id': 'int64'\} differ from the train file's"):
        prepare_interactions(SourceConfig("parquet", splits=files), tmp_path / "p", InteractionFilters(), SplitConfig())


def test_each_split_must_stay_within_the_bad_fraction(tmp_path):
    """A bad row in a small test file alters the published split: it fails even when the total share is low."""
    files = {"train": str(write(tmp_path / "train.txt", "".join(f"{u} 1 2 3 4 5\n" for u in range(40)))),
             "test": str(write(tmp_path / "test.txt", "0 6\n1 7 y\n"))}
    with pytest.raises(DataError, match=re.escape(f"data.source.splits.test: {files['test']}: 1 of 3 rows are bad "
                                                  "(fraction 0.3333), above max_bad_fraction=0.05")):
        prepare_interactions(SourceConfig("lightgcn", splits=files), tmp_path / "p", InteractionFilters(),
                             SplitConfig(), max_bad_fraction=0.05)


def test_an_empty_split_after_filtering_is_an_error(tmp_path):
    files = {"train": _parquet(tmp_path / "train.parquet", [(1, 100, 5, 1)]),
             "test": _parquet(tmp_path / "test.parquet", [(1, 101, 1, 2)])}
    with pytest.raises(DataError, match=r"data\.source\.splits\.test: .*test\.parquet: no interactions left after "
                                        r"filtering .*'below_min_rating': 1"):
        prepare_interactions(SourceConfig("parquet", splits=files), tmp_path / "p", InteractionFilters(min_rating=4),
                             SplitConfig())


# ---------------------------------------------------------------------------------- bad configs


def test_split_files_must_exist(tmp_path):
    files = {"train": str(write(tmp_path / "train.txt", "0 1\n")), "test": str(tmp_path / "nope.txt")}
    with pytest.raises(DataError, match=re.escape(f"data.source.splits.test: {tmp_path / 'nope.txt'}: file not found")):
        prepare_interactions(SourceConfig("lightgcn", splits=files), tmp_path / "p", InteractionFilters(), SplitConfig())
    assert not (tmp_path / "p" / "quarantine.jsonl").exists()  # nothing was read


@pytest.mark.parametrize(("splits", "message"), [
    ({"train": "a", "dev": "b", "test": "c"}, "data.source.splits: unknown split(s) dev; expected train, test and "
                                              "optionally valid"),
    ({"train": "a", "valid": "b"}, "data.source.splits needs a test file; found {'train': 'a', 'valid': 'b'}"),
    ({"valid": "b", "test": None}, "data.source.splits needs a train and a test file"),
    (["train.txt", "test.txt"], "data.source.splits must map train/valid/test to files"),
])
def test_bad_splits_keys(splits, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        SourceConfig("lightgcn", splits=splits)


def test_neither_path_nor_splits_names_both():
    with pytest.raises(ConfigError, match=r"set data\.source\.path .* or data\.source\.splits"):
        SourceConfig("movielens")
    with pytest.raises(ConfigError, match="synthetic data is generated as one file"):
        SourceConfig("synthetic", splits={"train": "a", "test": "b"})


def test_unknown_format_with_given_splits(tmp_path):
    files = {"train": str(write(tmp_path / "train.txt", "0 1\n")), "test": str(write(tmp_path / "test.txt", "0 2\n"))}
    with pytest.raises(DataError, match="unknown format 'csv' for data.source.splits; expected one of movielens"):
        prepare_interactions(SourceConfig("csv", splits=files), tmp_path / "p", InteractionFilters(), SplitConfig())


def test_a_later_prepare_without_valid_removes_the_old_valid_file(tmp_path):
    files = lightgcn_files(tmp_path)
    prepare_interactions(SourceConfig("lightgcn", splits=files), tmp_path / "p", InteractionFilters(), SplitConfig(),
                         max_bad_fraction=0.2)
    del files["valid"]
    manifest = prepare_interactions(SourceConfig("lightgcn", splits=files), tmp_path / "p", InteractionFilters(),
                                    SplitConfig(), max_bad_fraction=0.2)
    assert PreparedData.open(tmp_path / "p").splits == ["train", "test"]
    assert "valid" not in manifest["rows"] and "valid_users_without_train" not in manifest["rows"]
    assert manifest["rows"]["test_pairs_seen"] == 0  # (1, 12) was in valid, which is gone


# ---------------------------------------------------------------------------------- CTR


def test_libfm_given_split_for_ctr(tmp_path):
    files = {"train": str(write(tmp_path / "train.libfm", "1 0:1 5:1\n-1 1:1 5:1\n1 0:1 6:1\n")),
             "valid": str(write(tmp_path / "valid.libfm", "1 1:1 6:1\n")),
             "test": str(write(tmp_path / "test.libfm", "-1 2:1 7:1\n1 0:1 5:1\n"))}
    source = SourceConfig("libfm", options={"field_names": ["user", "item"]}, splits=files)
    manifest = prepare_ctr(source, tmp_path / "p", CTRSettings(dense_transform="none", valid_fraction=0.5, seed=1))
    rows = manifest["rows"]
    assert (rows["read"], rows["train"], rows["valid"], rows["test"]) == (6, 3, 1, 2)
    assert rows["by_split"] == {"train": {"read": 3, "bad": 0, "kept": 3}, "valid": {"read": 1, "bad": 0, "kept": 1},
                                "test": {"read": 2, "bad": 0, "kept": 2}}
    assert manifest["split"]["method"] == "given" and manifest["vocab_sizes"] == {"user": 4, "item": 4}
    data = PreparedData.open(tmp_path / "p")
    test = pq.read_table(data.path("test")).to_pandas()
    assert test["label"].tolist() == [0, 1]  # file order, labels -1 -> 0
    assert data.vocab("user").raw(test["user"].to_numpy()).tolist() == [2, 0]  # id 2 occurs only in test
    assert data.vocab("item").raw(test["item"].to_numpy()).tolist() == [7, 5]
    assert data.vocab("user").counts[data.vocab("user").lookup([0])[0] - 1] == 3  # counted over all files


def test_ctr_dense_statistics_come_from_the_train_file_only(tmp_path):
    train = pd.DataFrame({"label": np.array([1, 0, 1, 0], np.int8), "d": np.array([1, 2, 3, 6], np.float32),
                          "s": [5, 6, 5, 7]})
    test = pd.DataFrame({"label": np.array([1, 0], np.int8), "d": np.array([100, 2], np.float32), "s": [8, 5]})
    files = {}
    for name, frame in (("train", train), ("test", test)):
        files[name] = str(tmp_path / f"{name}.parquet")
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), files[name])
    manifest = prepare_ctr(SourceConfig("parquet", splits=files), tmp_path / "p", CTRSettings(dense_transform="standard"))
    mean, std = 3.0, float(np.std([1, 2, 3, 6]))
    assert manifest["dense_stats"]["d"]["mean"] == pytest.approx(mean)
    assert manifest["dense_stats"]["d"]["std"] == pytest.approx(std) and manifest["dense_stats"]["d"]["count"] == 4
    data = PreparedData.open(tmp_path / "p")
    assert data.splits == ["train", "test"]
    np.testing.assert_allclose(pq.read_table(data.path("test"))["d"].to_numpy(), [(100 - mean) / std, (2 - mean) / std],
                               rtol=1e-6)


def test_ctr_split_quality_and_missing_file(tmp_path):
    files = {"train": str(write(tmp_path / "train.libfm", "1 0:1 5:1\n" * 30)),
             "test": str(write(tmp_path / "test.libfm", "1 0:1 5:1\n1 a:1 5:1\n-1 1:1 6:1\n"))}
    source = SourceConfig("libfm", options={"field_names": ["user", "item"]}, splits=files)
    with pytest.raises(DataError, match=re.escape(f"data.source.splits.test: {files['test']}: 1 of 3 rows are bad")):
        prepare_ctr(source, tmp_path / "p", CTRSettings(dense_transform="none"), max_bad_fraction=0.05)
    manifest = prepare_ctr(source, tmp_path / "p", CTRSettings(dense_transform="none"), max_bad_fraction=0.5)
    assert manifest["rows"]["by_split"]["test"] == {"read": 3, "bad": 1, "kept": 2}
    bad = json.loads((tmp_path / "p" / "quarantine.jsonl").read_text())
    assert (bad["source"], bad["line"], bad["reason"]) == (files["test"], 2, "user is not idx:val: 'a:1'")
    missing = SourceConfig("libfm", splits={"train": files["train"], "valid": str(tmp_path / "v.libfm"),
                                            "test": files["test"]})
    with pytest.raises(DataError, match=re.escape(f"data.source.splits.valid: {tmp_path / 'v.libfm'}: file not found")):
        prepare_ctr(missing, tmp_path / "p", CTRSettings())


# ---------------------------------------------------------------------------------- configs and pipeline


def test_pipeline_prepares_given_splits_from_the_config(compose_config, tmp_path):
    from pipelines.prepare import ensure_prepared

    files = lightgcn_files(tmp_path)
    cfg = compose_config("prepare", ("data=ml1m_lightgcn", f"data.source.splits.train={files['train']}",
                                     f"data.source.splits.test={files['test']}", "data.source.splits.valid=null",
                                     "data.max_bad_fraction=0.2"))
    data = ensure_prepared(cfg.data)
    assert data.splits == ["train", "test"] and data.manifest["rows"]["test"] == 4
    assert data.manifest["split"]["files"] == {"train": files["train"], "test": files["test"]}


def test_frappe_given_config_needs_its_valid_and_test_files(compose_config, tmp_path):
    from pipelines.prepare import ensure_prepared

    cfg = compose_config("prepare", ("data=frappe_given",))
    assert cfg.data.kind == "ctr" and cfg.data.source.format == "libfm"
    with pytest.raises(MissingMandatoryValue, match=r"data\.source\.splits\.valid"):
        ensure_prepared(cfg.data)
    libfm = "".join(f"{i % 2} {i % 3}:1 {3 + i % 4}:1 7:1 8:1 9:1 10:1 11:1 12:1 13:1 {14 + i % 2}:1\n" for i in range(20))
    files = {name: str(write(tmp_path / f"{name}.libfm", libfm)) for name in ("train", "valid", "test")}
    cfg = compose_config("prepare", ("data=frappe_given", *(f"data.source.splits.{k}={v}" for k, v in files.items())))
    data = ensure_prepared(cfg.data)
    assert data.manifest["rows"]["by_split"]["test"] == {"read": 20, "bad": 0, "kept": 20}
    assert data.ctr_schema.sparse[:2] == ("user", "item")


def test_ml1m_lightgcn_counts(compose_config):
    """The published ML-1M LightGCN split comes out as published: 590,733 / 80,897 / 164,848 interactions,
    6,039 users x 3,628 items (vocabularies have one more index: OOV)."""
    from pipelines.prepare import ensure_prepared

    shared_file("ml-1m-lightgcn/train.txt")
    data = ensure_prepared(compose_config("prepare", ("data=ml1m_lightgcn",)).data)
    rows = data.manifest["rows"]
    assert (rows["train"], rows["valid"], rows["test"]) == (590_733, 80_897, 164_848)
    assert rows["read"] == 590_733 + 80_897 + 164_848 and rows["bad"] == 0
    assert data.vocab_sizes == {"user": 6_039 + 1, "item": 3_628 + 1}
    assert (rows["test_users_without_train"], rows["test_pairs_seen"], rows["valid_pairs_seen"]) == (0, 0, 0)
    assert rows["valid_items_without_train"] == 19 and rows["test_items_without_train"] == 31
    assert all(split["kept"] == split["read"] for split in rows["by_split"].values())
    train = data.matrix("train")
    assert train.nnz == 590_733 and train[:, 0].nnz == 0  # no row at OOV


def test_ml1m_lightgcn_popularity_matches_the_published_protocol(compose_config):
    """Test rankings leave out training items only (data.ranking_excludes: [train]), as the published tables do:
    popularity's Recall@20 (hits / |test|) and NDCG@20 match ../shared/data/README.md (0.118 / 0.164), and the
    [train, valid] protocol differs (it leaves valid items out as well)."""
    from pipelines.prepare import ensure_prepared
    from recsys.evaluation import PopularityScorer

    shared_file("ml-1m-lightgcn/train.txt")
    data = ensure_prepared(compose_config("prepare", ("data=ml1m_lightgcn",)).data)
    assert data.manifest["ranking_excludes"] == ["train"]
    assert (data.seen("test") != data.matrix("train")).nnz == 0
    metrics = evaluate(PopularityScorer(data.matrix("train")), data, "test", ks=[20])
    assert (round(metrics["recall@20"], 3), round(metrics["ndcg@20"], 3)) == (0.118, 0.164)
    both = ensure_prepared(compose_config("prepare", ("data=ml1m_lightgcn", "data.ranking_excludes=[train,valid]")).data)
    assert both.seen("test").nnz == 590_733 + 80_897
    assert evaluate(PopularityScorer(both.matrix("train")), both, "test", ks=[20])["recall@20"] > 0.12


def test_ranking_excludes_must_keep_train(tmp_path):
    with pytest.raises(ConfigError, match=r"data.ranking_excludes must be \[train\] or \[train, valid\], got \['valid'\]"):
        prepare_interactions(SourceConfig("lightgcn", splits=lightgcn_files(tmp_path)), tmp_path / "p",
                             InteractionFilters(), SplitConfig(), ranking_excludes=("valid",))
