import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.data.dataset import PreparedData
from recsys.data.prepare import (CTRSettings, InteractionFilters, SourceConfig, is_prepared, prepare_ctr,
                                 prepare_interactions, transform_dense)
from recsys.data.readers import CRITEO_DENSE, CRITEO_SPARSE
from recsys.data.splits import SplitConfig
from recsys.data.synthetic import SyntheticCTR
from recsys.errors import ConfigError, DataError
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
    assert manifest["generator"]["rows"] == 5000 and 0.6 < manifest["generator"]["planted_auc"] < 1
    assert manifest["dense_stats"] is None


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


# ---------------------------------------------------------------------------------- dense transforms


def _dense_table(path, n=500):
    """label, three float columns (heavy-tailed with NaN, constant, signed with NaN) and a row id."""
    rng = np.random.default_rng(7)
    heavy = np.floor(rng.lognormal(1.0, 2.0, n))
    heavy[rng.random(n) < 0.2] = np.nan
    signed = rng.normal(1.0, 3.0, n)
    signed[rng.random(n) < 0.1] = np.nan
    frame = pd.DataFrame({"label": rng.integers(0, 2, n).astype(np.int8), "heavy": heavy.astype(np.float32),
                          "constant": np.full(n, 0.1, np.float32), "signed": signed.astype(np.float32),
                          "row": np.arange(n, dtype=np.int64) + 10_000})
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
    return frame


def _prepared_rows(root) -> dict[str, pd.DataFrame]:
    """Each split's rows, indexed by the raw row id."""
    data = PreparedData.open(root)
    rows = {}
    for split in data.splits:
        frame = pq.read_table(data.path(split)).to_pandas()
        rows[split] = frame.set_index(data.vocab("row").raw(frame["row"].to_numpy()))
    return rows


@pytest.mark.parametrize("transform", ["standard", "log1p_standard"])
def test_standardized_dense_uses_train_statistics_only(tmp_path, transform):
    raw = _dense_table(tmp_path / "raw.parquet").set_index("row")
    ctr = CTRSettings(dense_transform=transform, valid_fraction=0.2, test_fraction=0.2, seed=3)
    manifest = prepare_ctr(SourceConfig("parquet", str(tmp_path / "raw.parquet"), {"batch_size": 64}),
                           tmp_path / "p", ctr)
    rows = _prepared_rows(tmp_path / "p")
    train_ids = rows["train"].index
    assert 0 < len(rows["valid"]) and 0 < len(rows["test"]) and len(train_ids) + len(rows["valid"]) + len(rows["test"]) == 500
    stats = manifest["dense_stats"]
    assert set(stats) == {"heavy", "constant", "signed"} and manifest["ctr"]["dense_transform"] == transform
    for name in stats:
        base = raw[name].astype(np.float64)
        if transform == "log1p_standard":
            base = np.log1p(base.clip(lower=0))
        mean, std = base[train_ids].mean(), base[train_ids].std(ddof=0)  # pandas skips NaN
        assert stats[name]["count"] == base[train_ids].notna().sum()
        assert stats[name]["mean"] == pytest.approx(mean, rel=1e-9)
        if name == "constant":  # std 0: centred, divided by 1
            assert stats[name]["std"] == 0.0 and std < 1e-12
            std = 1.0
        else:
            assert stats[name]["std"] == pytest.approx(std, rel=1e-9)
        expected = ((base - mean) / std).fillna(0.0)
        for split, frame in rows.items():
            np.testing.assert_allclose(frame[name], expected[frame.index], rtol=1e-5, atol=1e-6, err_msg=f"{name} {split}")
    assert np.abs(rows["train"]["constant"]).max() < 1e-6  # centred (up to rounding of the mean)


def test_split_does_not_depend_on_the_dense_transform(tmp_path):
    _dense_table(tmp_path / "raw.parquet")
    source = SourceConfig("parquet", str(tmp_path / "raw.parquet"), {"batch_size": 64})
    ids = {}
    for transform in ("none", "standard"):
        manifest = prepare_ctr(source, tmp_path / transform, CTRSettings(dense_transform=transform, seed=5))
        ids[transform] = {s: sorted(f.index) for s, f in _prepared_rows(tmp_path / transform).items()}
        assert (manifest["dense_stats"] is None) == (transform == "none")
    assert ids["none"] == ids["standard"]


def test_transform_dense_reapplies_manifest_statistics():
    x = np.array([0.0, np.nan, np.e - 1, -5.0])
    np.testing.assert_allclose(transform_dense(x, "log1p"), [0, 0, 1, 0])
    np.testing.assert_allclose(transform_dense(x, "none"), [0, 0, np.e - 1, -5])
    np.testing.assert_allclose(transform_dense(x, "log1p_standard", {"mean": 0.5, "std": 0.5}), [-1, 0, 1, -1])
    np.testing.assert_allclose(transform_dense(x, "standard", {"mean": 1.0, "std": 0.0}), [-1, 0, np.e - 2, -6])


def test_unknown_dense_transform(tmp_path):
    _dense_table(tmp_path / "raw.parquet")
    with pytest.raises(ConfigError, match="dense_transform must be one of log1p, standard, log1p_standard, none, got 'zscore'"):
        prepare_ctr(SourceConfig("parquet", str(tmp_path / "raw.parquet")), tmp_path / "p",
                    CTRSettings(dense_transform="zscore"))


# ---------------------------------------------------------------------------------- Criteo end to end


def _criteo_file(path, n=96, bad=()):
    """``n`` Criteo lines from small id pools (some fields empty), with ``bad`` (line, text) inserted."""
    rng = np.random.default_rng(11)
    pools = [[f"{h:08x}" for h in rng.integers(0, 2**32, size)] + [""] for size in rng.integers(2, 30, 26)]
    lines = []
    for _ in range(n):
        dense = [str(v) if rng.random() > 0.2 else "" for v in rng.integers(-1, 1000, 13)]
        sparse = [pool[int(rng.integers(0, len(pool)))] for pool in pools]
        lines.append("\t".join([str(int(rng.random() < 0.3)), *dense, *sparse]))
    for at, text in bad:
        lines.insert(at - 1, text)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_criteo_prepare_quarantines_counts_and_builds_vocabularies(tmp_path):
    good = "\t".join(["1"] + ["1"] * 13 + ["a"] * 26)
    bad = [(3, good.replace("1", "2", 1)), (20, good.rsplit("\t", 1)[0]), (41, good.replace("\ta", "\tzz", 1)),
           (70, good.replace("\t1", "\tx", 1))]
    path = _criteo_file(tmp_path / "day_0", bad=bad)
    source = SourceConfig("criteo", str(path), {"chunksize": 25})
    with pytest.raises(DataError, match=re.escape(str(path)) + r": 4 of 100 rows are bad .*max_bad_fraction=0.01"):
        prepare_ctr(source, tmp_path / "p", CTRSettings(min_count=2))
    manifest = prepare_ctr(source, tmp_path / "p", CTRSettings(min_count=2), max_bad_fraction=0.05)
    rows = manifest["rows"]
    assert (rows["read"], rows["bad"]) == (100, 4) and rows["train"] + rows["valid"] + rows["test"] == 96
    assert manifest["quarantine"]["reasons"] == {"label out of range": 1, "expected 40 fields, found 39": 1,
                                                 "C1 is not a hex id of 1-15 digits": 1, "I1 is not an integer": 1}
    quarantined = [json.loads(line) for line in (tmp_path / "p" / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(q["line"] for q in quarantined) == [3, 20, 41, 70]
    assert manifest["schema"] == {"dense": list(CRITEO_DENSE), "sparse": list(CRITEO_SPARSE), "multi_valued": []}
    text = [line.split("\t") for i, line in enumerate(path.read_text().splitlines(), 1) if i not in (3, 20, 41, 70)]
    data = PreparedData.open(tmp_path / "p")
    for j, name in enumerate(CRITEO_SPARSE, start=14):
        counts = pd.Series([int(t[j], 16) if t[j] else -1 for t in text]).value_counts()
        assert data.vocab_sizes[name] == (counts >= 2).sum() + 1
        vocab = data.vocab(name)
        assert sorted(vocab.ids.tolist()) == sorted(counts.index[counts >= 2].tolist())  # -1 = missing, an id
        assert vocab.oov_count == counts[counts < 2].sum()
    train = pq.read_table(data.path("train")).to_pandas()
    assert (train[list(CRITEO_DENSE)] >= 0).all().all()  # log1p(max(x, 0)), missing -> 0
