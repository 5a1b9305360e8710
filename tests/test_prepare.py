import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from recsys.data.dataset import PreparedData
from recsys.data.prepare import (CTRSettings, InteractionFilters, SourceConfig, is_prepared, prepare_ctr,
                                 prepare_interactions)
from recsys.data.splits import SplitConfig
from recsys.data.synthetic import SyntheticCTR
from recsys.errors import DataError
from tests.conftest import shared_file


def _udata(path, bad_lines=()):
    rng = np.random.default_rng(0)
    lines = [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in zip(rng.integers(1, 40, 400), rng.integers(1, 60, 400),
                                                         rng.integers(1, 6, 400), rng.integers(0, 10**6, 400))]
    for at, text in bad_lines:
        lines.insert(at, text)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_interactions_prepare_writes_splits_vocab_manifest_and_quarantine(tmp_path):
    raw = _udata(tmp_path / "u.data", bad_lines=[(3, "12\tabc\t4\t100"), (10, "1\t2\t3")])
    manifest = prepare_interactions(SourceConfig("movielens", str(raw)), tmp_path / "p",
                                    InteractionFilters(min_rating=4), SplitConfig(test_fraction=0.2, seed=0))
    rows = manifest["rows"]
    assert rows["read"] == 402 and rows["bad"] == 2
    assert manifest["quarantine"]["n_bad"] == 2
    bad = [json.loads(line) for line in (tmp_path / "p" / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(b["line"] for b in bad) == [4, 11]
    kept = rows["read"] - rows["bad"] - rows["below_min_rating"] - rows["duplicates"] \
        - rows["below_min_count"] - rows["below_min_user_interactions"]
    assert rows["train"] + rows["test"] == kept
    data = PreparedData.open(tmp_path / "p")
    train, test = data.matrix("train"), data.matrix("test")
    assert train.multiply(test).nnz == 0  # no (user, item) pair in both
    assert data.vocab("item").lookup([int(data.vocab("item").ids[0])]).tolist() == [1]
    assert len(manifest["input_hash"]) == 64 and manifest["split"]["method"] == "random_holdout"
    assert pq.read_schema(data.path("train")).names == ["user", "item", "rating", "timestamp"]


def test_bad_fraction_over_the_limit_fails_with_a_clear_message(tmp_path):
    raw = _udata(tmp_path / "u.data", bad_lines=[(i, "x\ty\tz\tw") for i in range(0, 40, 4)])
    with pytest.raises(DataError, match=r"u\.data: 10 of 410 rows are bad .*above max_bad_fraction=0.01.*quarantine.jsonl"):
        prepare_interactions(SourceConfig("movielens", str(raw)), tmp_path / "p", InteractionFilters(),
                             SplitConfig(), max_bad_fraction=0.01)
    manifest = prepare_interactions(SourceConfig("movielens", str(raw)), tmp_path / "p", InteractionFilters(),
                                    SplitConfig(), max_bad_fraction=0.05)
    assert manifest["rows"]["bad"] == 10


def test_missing_file_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match="nope.data"):
        prepare_interactions(SourceConfig("movielens", str(tmp_path / "nope.data")), tmp_path / "p",
                             InteractionFilters(), SplitConfig())


def test_is_prepared_tracks_settings(tmp_path):
    raw = _udata(tmp_path / "u.data")
    settings = {"a": 1}
    prepare_interactions(SourceConfig("movielens", str(raw)), tmp_path / "p", InteractionFilters(), SplitConfig(),
                         settings=settings)
    assert is_prepared(tmp_path / "p", {"a": 1}) and not is_prepared(tmp_path / "p", {"a": 2})


def test_ctr_prepare_streams_vocab_and_splits(tmp_path):
    gen = SyntheticCTR(n_rows=5000, chunk_rows=1000, seed=1)
    manifest = prepare_ctr(SourceConfig("synthetic", str(tmp_path / "raw.parquet"), generator=gen), tmp_path / "p",
                           CTRSettings(min_count=2, valid_fraction=0.1, test_fraction=0.2, seed=0))
    data = PreparedData.open(tmp_path / "p")
    schema = data.ctr_schema
    assert schema.multi_valued == ("tags",) and len(schema.dense) == gen.n_dense
    assert manifest["rows"]["train"] + manifest["rows"]["valid"] + manifest["rows"]["test"] == 5000
    assert abs(manifest["rows"]["test"] / 5000 - 0.2) < 0.03
    raw = pq.read_table(tmp_path / "raw.parquet")
    train = pq.read_table(data.path("train"))
    for name in schema.sparse:
        counts = raw[name].to_pandas().value_counts()
        assert data.vocab_sizes[name] == (counts >= 2).sum() + 1
        assert train[name].to_numpy().max() < data.vocab_sizes[name]
    assert (train["tags"].combine_chunks().flatten().to_numpy() < data.vocab_sizes["tags"]).all()
    assert min(train[d].to_numpy().min() for d in schema.dense) >= 0  # log1p of non-negative counts


def test_libfm_frappe_prepare(tmp_path):
    path = shared_file("frappe/frappe.validation.libfm")
    fields = ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather", "country", "city"]
    manifest = prepare_ctr(SourceConfig("libfm", str(path), {"field_names": fields}), tmp_path / "p",
                           CTRSettings(dense_transform="none"))
    assert manifest["rows"]["read"] == 57722 and manifest["rows"]["bad"] == 0
    assert manifest["schema"]["sparse"] == fields and manifest["schema"]["dense"] == []
    assert sum(manifest["vocab_sizes"].values()) - len(fields) <= 5382


def test_ml100k_prepare_counts(tmp_path):
    path = shared_file("ml-100k/ml-100k.inter")
    manifest = prepare_interactions(SourceConfig("movielens", str(path)), tmp_path / "p",
                                    InteractionFilters(min_rating=4, min_user_interactions=5), SplitConfig(seed=0))
    assert manifest["rows"]["read"] == 100_000
    assert manifest["rows"]["below_min_rating"] == 44_625  # ratings 1-3
    assert manifest["rows"]["train"] + manifest["rows"]["test"] == 55_375 - manifest["rows"]["below_min_user_interactions"]
