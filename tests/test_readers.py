"""Tests of the chunked readers and the quarantine of bad rows."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.data.quarantine import Quarantine, ReadChunk, empty_bad
from recsys.data.readers import (CRITEO_DENSE, CRITEO_SPARSE, FRAPPE_FIELDS, READERS, open_reader, read_all,
                                 read_criteo, read_libfm, read_lightgcn, read_movielens, read_parquet, read_sequences)
from recsys.errors import ConfigError, DataError

SHARED_DATA = Path(os.environ.get("RECSYS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def read(chunks, tmp_path: Path) -> tuple[pd.DataFrame, Quarantine, list[dict]]:
    """Reads all chunks through a quarantine file; returns the frame, the quarantine and its rows."""
    quarantine = Quarantine(tmp_path / "bad.jsonl")
    frame = read_all(chunks, quarantine)
    quarantine.close()
    rows = [json.loads(line) for line in (tmp_path / "bad.jsonl").read_text().splitlines()]
    return frame, quarantine, rows


def bad_lines(rows: list[dict]) -> dict[int, str]:
    return {row["line"]: row["reason"] for row in rows}


# ---------------------------------------------------------------------------------- MovieLens


UDATA = "1\t10\t4\t100\n2\t20\t3.5\t200\n3\t30\t5\n4\tx\t1\t400\n5\t50\tabc\t500\n6\t60\t2\t600\n\n\n"


def test_udata_good_and_bad_rows(tmp_path):
    path = write(tmp_path / "u.data", UDATA)
    frame, quarantine, rows = read(read_movielens(path, layout="udata"), tmp_path)
    assert frame["user_id"].tolist() == [1, 2, 6]
    assert frame["item_id"].tolist() == [10, 20, 60]
    assert frame["rating"].tolist() == [4.0, 3.5, 2.0]
    assert frame["timestamp"].tolist() == [100, 200, 600]
    assert frame.dtypes.astype(str).to_dict() == {"user_id": "int64", "item_id": "int64", "rating": "float32",
                                                  "timestamp": "int64"}
    assert bad_lines(rows) == {3: "expected 4 fields, found 3", 4: "item_id is not an integer: 'x'",
                               5: "rating is not a number: 'abc'"}
    assert rows[0] == {"source": str(path), "line": 3, "reason": "expected 4 fields, found 3", "text": "3\t30\t5"}
    assert (quarantine.n_bad, quarantine.n_total) == (3, 6)  # blank trailing lines are not counted
    assert quarantine.reasons == {"expected 4 fields, found 3": 1, "item_id is not an integer": 1,
                                  "rating is not a number": 1}


def test_ratings_csv_auto_detected(tmp_path):
    text = "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,1029,3.0,1260759179\n"
    path = write(tmp_path / "ratings.csv", text)
    frame = read_all(read_movielens(path))
    assert frame.to_dict("list") == {"user_id": [1, 1], "item_id": [31, 1029], "rating": [2.5, 3.0],
                                     "timestamp": [1260759144, 1260759179]}


def test_ratings_csv_wrong_header(tmp_path):
    path = write(tmp_path / "ratings.csv", "user,movie,rating,timestamp\n1,31,2.5,1260759144\n")
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*userId,movieId,rating,timestamp"):
        read_movielens(path, layout="ratings_csv")


def test_atomic_columns_by_name_and_order(tmp_path):
    text = "item_id:token\tuser_id:token\tage:float\n7\t1\t30\n8\t2\t40\n9\tz\t50\n"
    path = write(tmp_path / "x.inter", text)
    frame, quarantine, rows = read(read_movielens(path), tmp_path)
    assert list(frame.columns) == ["user_id", "item_id"]
    assert frame.to_dict("list") == {"user_id": [1, 2], "item_id": [7, 8]}
    assert bad_lines(rows) == {4: "user_id is not an integer: 'z'"}


def test_atomic_header_without_user(tmp_path):
    path = write(tmp_path / "x.inter", "item_id:token\trating:float\n1\t2\n")
    with pytest.raises(DataError, match=re.escape(str(path)) + " line 1: header has no user_id column"):
        read_movielens(path, layout="atomic")


def test_movielens_missing_file(tmp_path):
    path = tmp_path / "u.data"
    with pytest.raises(DataError, match=re.escape(f"{path}: file not found (expected MovieLens u.data")):
        read_movielens(path, layout="udata")


def test_movielens_given_parquet(tmp_path):
    path = tmp_path / "ratings.parquet"
    pq.write_table(pa.table({"user_id": [1, 2]}), path)
    with pytest.raises(DataError, match=re.escape(f"{path}: is a Parquet file")):
        read_movielens(path)


@pytest.mark.parametrize("position", ["head", "tail"])
def test_a_nul_byte_is_one_quarantined_row_wherever_it_is(tmp_path, position):
    """Issue 14: a NUL byte in the first 4 KiB rejected the whole file as binary, while later it was one bad row."""
    good = [f"{u}\t{u + 10}\t4\t{u}" for u in range(1, 2001)]
    damaged = 2 if position == "head" else 1900  # line numbers, 1-based
    good[damaged - 1] = f"{damaged}\t1\x002\t4\t{damaged}"
    path = write(tmp_path / "u.data", "\n".join(good) + "\n")
    assert (b"\x00" in path.read_bytes()[:4096]) == (position == "head")
    frame, quarantine, rows = read(read_movielens(path, layout="udata", chunksize=500), tmp_path)
    assert (quarantine.n_bad, quarantine.n_total, len(frame)) == (1, 2000, 1999)
    assert bad_lines(rows) == {damaged: "item_id is not an integer: '1\x002'"}


def test_a_binary_file_is_refused_with_its_nul_count(tmp_path):
    path = tmp_path / "u.data"
    path.write_bytes(b"1\t2\t3\t4\n" + bytes(2000) + b"\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: is a binary file (2000 of its first 2009 bytes are NUL)")):
        read_movielens(path, layout="udata")


def test_movielens_undetectable_layout(tmp_path):
    path = write(tmp_path / "ratings.dat", "1::2::3::4\n")
    with pytest.raises(DataError, match=re.escape(str(path)) + " line 1: cannot tell the MovieLens layout"):
        read_movielens(path)


def test_movielens_mostly_bad_first_chunk(tmp_path):
    path = write(tmp_path / "u.data", "1\t2\t3\t4\na b c d\ne f g h\n")
    with pytest.raises(DataError, match=re.escape(str(path)) + ": does not look like a MovieLens u.data"):
        list(read_movielens(path, layout="udata"))


def test_unknown_layout(tmp_path):
    with pytest.raises(ConfigError, match="unknown MovieLens layout 'dat'"):
        read_movielens(write(tmp_path / "u.data", UDATA), layout="dat")


def test_strict_read_all_raises_on_bad_row(tmp_path):
    path = write(tmp_path / "u.data", UDATA)
    with pytest.raises(DataError, match=re.escape(f"{path} line 3: expected 4 fields, found 3")):
        read_all(read_movielens(path))


# ---------------------------------------------------------------------------------- chunking


def test_chunking_matches_single_chunk(tmp_path):
    lines = [f"{u}\t{u * 10}\t{u % 5 + 1}\t{1000 + u}" for u in range(1, 41)]
    lines[6], lines[17], lines[33] = "7\t70\t1", "", "34\tbad\t1\t1034"
    path = write(tmp_path / "u.data", "\n".join(lines) + "\n")
    whole, _, whole_bad = read(read_movielens(path, chunksize=1000), tmp_path / "whole")
    chunks = list(read_movielens(path, chunksize=7))
    assert len(chunks) == 6
    parts, quarantine, parts_bad = read(iter(chunks), tmp_path / "parts")
    pd.testing.assert_frame_equal(whole, parts)
    assert bad_lines(parts_bad) == bad_lines(whole_bad) == {7: "expected 4 fields, found 3",
                                                            34: "item_id is not an integer: 'bad'"}
    assert (quarantine.n_bad, quarantine.n_total) == (2, 39)
    assert len(whole) == 37 and whole["user_id"].iloc[-1] == 40


# ---------------------------------------------------------------------------------- Quarantine


def make_chunk(n_lines: int, bad_lines_: list[int], reason: str = "rating is not a number: 'x'") -> ReadChunk:
    bad = pd.DataFrame({"line": bad_lines_, "reason": [reason] * len(bad_lines_),
                        "text": ["raw"] * len(bad_lines_)})
    return ReadChunk(pd.DataFrame(), bad if bad_lines_ else empty_bad(), n_lines=n_lines, source="data/u.data")


def test_quarantine_check_at_and_above_limit(tmp_path):
    path = tmp_path / "q" / "bad.jsonl"
    quarantine = Quarantine(path)
    quarantine.add("data/u.data", make_chunk(5, [2]))
    quarantine.add("data/u.data", make_chunk(5, [8, 9]))
    quarantine.check(0.3)
    with pytest.raises(DataError, match=r"data/u\.data: 3 of 10 rows are bad \(fraction 0\.3\).*"
                                        r"max_bad_fraction=0\.2.*" + re.escape(str(path)) +
                                        r".*rating is not a number x3 \(e\.g\. data/u\.data line 2\)"):
        quarantine.check(0.2)
    quarantine.close()
    assert len(path.read_text().splitlines()) == 3
    assert quarantine.summary() == {"n_bad": 3, "n_total": 10, "bad_fraction": 0.3,
                                    "reasons": {"rating is not a number": 3}, "path": str(path),
                                    "sources": ["data/u.data"]}


def test_quarantine_count_only_and_bad_limit():
    quarantine = Quarantine(None)
    quarantine.add("a.tsv", make_chunk(4, [1, 2, 3]))
    with pytest.raises(DataError, match="not saved"):
        quarantine.check(0.5)
    with pytest.raises(ConfigError, match="max_bad_fraction"):
        quarantine.check(1.5)


def test_quarantine_csv(tmp_path):
    path = tmp_path / "bad.csv"
    with Quarantine(path) as quarantine:
        quarantine.add("a.tsv", make_chunk(4, [1]))
        quarantine.add("a.tsv", make_chunk(4, [6]))
    assert pd.read_csv(path)["line"].tolist() == [1, 6]


# ---------------------------------------------------------------------------------- sequences


def test_sequences(tmp_path):
    path = write(tmp_path / "seq.txt", "u1 i1\nu1  i2\n\nu2\ti9\nu3\nu2 i1 extra\n")
    frame, _, rows = read(read_sequences(path), tmp_path)
    assert frame.to_dict("list") == {"user_id": ["u1", "u1", "u2"], "item_id": ["i1", "i2", "i9"],
                                     "timestamp": [0, 1, 3]}
    assert frame["timestamp"].dtype == np.int64
    assert bad_lines(rows) == {5: "expected 2 fields, found 1", 6: "expected 2 fields, found 3"}


def test_sequences_with_separator(tmp_path):
    path = write(tmp_path / "seq.csv", "1,2\n1,\n3,4\n")
    frame, _, rows = read(read_sequences(path, sep=","), tmp_path)
    assert frame["item_id"].tolist() == ["2", "4"]
    assert bad_lines(rows) == {2: "item_id is empty"}


# ---------------------------------------------------------------------------------- LightGCN


LIGHTGCN = "0 10 11 12\n\n  1   11\t13  \n2\n3 10 x 14 -5\nu7 10 11\nzz\n4 0012 " + "9" * 19 + "\n5 7\n"


def test_lightgcn_explodes_lines_and_quarantines_bad_tokens(tmp_path):
    path = write(tmp_path / "train.txt", LIGHTGCN)
    frame, quarantine, rows = read(read_lightgcn(path), tmp_path)
    assert frame.to_dict("list") == {"user_id": ["0", "0", "0", "1", "1", "3", "3", "4", "5"],
                                     "item_id": ["10", "11", "12", "11", "13", "10", "14", "0012", "7"]}
    assert frame.dtypes.astype(str).to_dict() == {"user_id": "str", "item_id": "str"}  # as read_sequences
    assert [(r["line"], r["reason"], r["text"]) for r in rows] == [
        (5, "item_id is not an integer id: 'x'", "3 x"),
        (5, "item_id is not an integer id: '-5'", "3 -5"),
        (6, "user_id is not an integer id: 'u7'", "u7 10"),  # a bad user rejects each of its pairs
        (6, "user_id is not an integer id: 'u7'", "u7 11"),
        (7, "user_id is not an integer id: 'zz'", "zz"),  # ... or its line, when it has no items
        (8, "item_id is not an integer id: '" + "9" * 19 + "'", "4 " + "9" * 19),  # over 18 digits
    ]
    # rows are (user, item) pairs: 9 good + 6 bad; the blank line and user 2's empty line count none
    assert (quarantine.n_total, quarantine.n_bad) == (15, 6)
    assert all(r["source"] == str(path) for r in rows)


def test_lightgcn_chunks_do_not_change_the_result(tmp_path):
    path = write(tmp_path / "train.txt", LIGHTGCN)
    whole, _, whole_bad = read(read_lightgcn(path), tmp_path)
    chunks = list(read_lightgcn(path, chunksize=2))
    assert len(chunks) == 5  # 9 non-blank lines
    assert sum(c.n_lines for c in chunks) == 15
    pieces, _, piece_bad = read(iter(chunks), tmp_path)
    pd.testing.assert_frame_equal(pieces, whole)
    assert piece_bad == whole_bad


def test_lightgcn_refuses_other_layouts(tmp_path):
    csv = write(tmp_path / "ratings.csv", "userId,movieId\n1,2\n1,3\n")
    with pytest.raises(DataError, match=re.escape(str(csv)) + ": does not look like a LightGCN text file: .*; 3 of "
                                                               "the first 3 lines are bad \\(line 1: user_id is not an "
                                                               "integer id: 'userId,movieId'\\)"):
        read_all(read_lightgcn(csv), Quarantine(None))
    users_only = write(tmp_path / "users.txt", "0\n1\n")
    with pytest.raises(DataError, match="users.txt: no data lines"):
        read_all(read_lightgcn(users_only), Quarantine(None))
    with pytest.raises(DataError, match="nope.txt: file not found"):
        read_lightgcn(tmp_path / "nope.txt")
    with pytest.raises(ConfigError, match="chunksize must be a positive integer"):
        read_lightgcn(csv, chunksize=0)


# ---------------------------------------------------------------------------------- libFM


LIBFM = ("1 3:1 10:1 20:1\n-1 4:1 11:1 21:0.5\n0 5:1 12:1 22:1\n2 5:1 12:1 22:1\n"
         "1 5:1 12:1\n1 5:1 x:1 22:1\n1 5:1 12:a 22:1\n-1 6:1 13:1 23:1\n")


def test_libfm(tmp_path):
    path = write(tmp_path / "a.libfm", LIBFM)
    frame, _, rows = read(read_libfm(path, field_names=["user", "item", "ctx"]), tmp_path)
    assert frame.to_dict("list") == {"label": [1, 0, 0, 0], "user": [3, 4, 5, 6], "item": [10, 11, 12, 13],
                                     "ctx": [20, 21, 22, 23]}
    assert frame.dtypes.astype(str).tolist() == ["int8", "int64", "int64", "int64"]
    assert bad_lines(rows) == {4: "label out of range: 2 (expected one of -1, 0, 1)",
                               5: "expected 4 fields, found 3", 6: "item is not idx:val: 'x:1'",
                               7: "item is not idx:val: '12:a'"}


def test_libfm_default_field_names(tmp_path):
    frame = read_all(read_libfm(write(tmp_path / "a.libfm", "1 3:1 10:1\n-1 4:1 11:1\n")))
    assert list(frame.columns) == ["label", "f0", "f1"]


def test_libfm_given_udata(tmp_path):
    path = write(tmp_path / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    with pytest.raises(DataError, match=re.escape(str(path)) + ": does not look like a libFM file"):
        list(read_libfm(path))


# ---------------------------------------------------------------------------------- Criteo


def criteo_line(label: str = "1", dense: list[str] | None = None, sparse: list[str] | None = None) -> str:
    dense = dense if dense is not None else [str(i) for i in range(13)]
    sparse = sparse if sparse is not None else ["68fd1e64"] * 26
    return "\t".join([label, *dense, *sparse])


def test_criteo(tmp_path):
    lines = [
        criteo_line("0", ["", "-1"] + ["5"] * 11, ["", "ff"] + ["68fd1e64"] * 24),
        criteo_line("1"),
        criteo_line("2"),
        criteo_line("1", ["1.5"] + ["1"] * 12),
        criteo_line("1", sparse=["zz"] + ["1"] * 25),
        criteo_line("1")[:-9],
    ]
    path = write(tmp_path / "day_0", "\n".join(lines) + "\n")
    frame, _, rows = read(read_criteo(path, chunksize=4), tmp_path)
    assert list(frame.columns) == ["label", *CRITEO_DENSE, *CRITEO_SPARSE]
    assert frame["label"].tolist() == [0, 1] and frame["label"].dtype == np.int8
    assert np.isnan(frame["I1"].iloc[0]) and frame["I2"].iloc[0] == -1.0 and frame["I13"].iloc[1] == 12.0
    assert frame["I1"].dtype == np.float32 and frame["C1"].dtype == np.int64
    assert frame["C1"].tolist() == [-1, 0x68FD1E64] and frame["C2"].iloc[0] == 255
    assert bad_lines(rows) == {3: "label out of range: 2 (expected one of 0, 1)", 4: "I1 is not an integer: '1.5'",
                               5: "C1 is not a hex id of 1-15 digits: 'zz'", 6: "expected 40 fields, found 39"}


# The first line of the Kaggle Display Advertising Challenge train.txt (I12 and C22 are empty).
KAGGLE_TRAIN_LINE = ("0\t1\t1\t5\t0\t1382\t4\t15\t2\t181\t1\t2\t\t2\t68fd1e64\t80e26c9b\tfb936136\t7b4723c4\t"
                     "25c83c98\t7e0ccccf\tde7995b8\t1f89b562\ta73ee510\ta8cd5504\tb2cb9c98\t37c9c164\t2824a5f6\t"
                     "1adce6ef\t8ba8b39a\t891b62e7\te5ba7672\tf54016b9\t21ddcdc9\tb1252a9d\t07b5194c\t\t3a171ecb\t"
                     "c5c50484\te8b83407\t9727dd16")


def test_criteo_kaggle_train_and_terabyte_day_layouts(tmp_path):
    day = criteo_line("1", ["", "-1", "", "3", "120563", "", "0", "1", "", "", "", "", "7"],
                      ["05db9164", "", "d833535f"] + ["ad4b77ff"] * 23)
    for name, text in (("train.txt", KAGGLE_TRAIN_LINE + "\n"), ("day_0", day + "\r\n")):
        frame, quarantine, _ = read(read_criteo(write(tmp_path / name, text)), tmp_path / f"{name}.bad")
        assert quarantine.n_bad == 0 and len(frame) == 1 and list(frame.columns) == ["label", *CRITEO_DENSE, *CRITEO_SPARSE]
    kaggle = read_all(read_criteo(tmp_path / "train.txt")).iloc[0]
    assert kaggle["label"] == 0 and kaggle["I5"] == 1382 and np.isnan(kaggle["I12"]) and kaggle["I13"] == 2
    assert kaggle["C1"] == 0x68FD1E64 and kaggle["C22"] == -1 and kaggle["C26"] == 0x9727DD16  # exact in float64
    terabyte = read_all(read_criteo(tmp_path / "day_0")).iloc[0]
    assert terabyte["label"] == 1 and terabyte["I2"] == -1 and terabyte["I5"] == 120563 and terabyte["I13"] == 7
    assert np.isnan(terabyte[["I1", "I3", "I6", "I9", "I10", "I11", "I12"]].astype(float)).all()
    assert terabyte["C2"] == -1 and terabyte["C26"] == 0xAD4B77FF


def test_criteo_without_labels_for_scoring(tmp_path):
    lines = [KAGGLE_TRAIN_LINE.split("\t", 1)[1], KAGGLE_TRAIN_LINE, "\t".join(["1"] * 13 + ["a"] * 26)]
    path = write(tmp_path / "test.txt", "\n".join(lines) + "\n")
    frame, quarantine, rows = read(read_criteo(path, has_label=False), tmp_path)
    assert list(frame.columns) == [*CRITEO_DENSE, *CRITEO_SPARSE]
    assert frame["I1"].tolist() == [1.0, 1.0] and frame["C1"].tolist() == [0x68FD1E64, 10]
    assert bad_lines(rows) == {2: "expected 39 fields, found 40"}


@pytest.mark.parametrize(("has_label", "line", "expected", "found", "hint"), [
    (True, KAGGLE_TRAIN_LINE.split("\t", 1)[1], 40, 39, "needs has_label: false"),
    (False, KAGGLE_TRAIN_LINE, 39, 40, "needs has_label: true"),
])
def test_criteo_other_layout_is_a_clear_error(tmp_path, has_label, line, expected, found, hint):
    path = write(tmp_path / "test.txt", "\n".join([line] * 5) + "\n")
    with pytest.raises(DataError, match=re.escape(str(path)) + r": does not look like a Criteo TSV.*" + hint +
                       rf".*5 of the first 5 lines are bad \(line 1: expected {expected} fields, found {found}\)"):
        list(read_criteo(path, has_label=has_label))


def test_criteo_malformed_lines_are_quarantined_with_line_numbers(tmp_path):
    lines = [
        criteo_line("1"),                                                   # 1 good
        criteo_line("0", [""] * 13, [""] * 26),                             # 2 good: all missing
        criteo_line("1", ["-3"] + ["0"] * 12, ["FFFFFFFF"] * 26),           # 3 good: negative count, upper-case hex
        "",                                                                 # 4 blank: skipped, not counted
        criteo_line(""),                                                    # 5 empty label
        criteo_line("x"),                                                   # 6 label not a number
        criteo_line("1") + "\t5",                                           # 7 41 fields
        criteo_line("0", ["abc"] + ["1"] * 12),                             # 8 dense not an integer
        criteo_line("0", ["1"] * 12 + ["7e3"]),                             # 9 dense in float notation
        criteo_line("1", sparse=["68fd1e64"] * 25 + ["123456789abcdef0"]),  # 10 hex id of 16 digits
        criteo_line("1", sparse=["0x1f"] + ["1"] * 25),                     # 11 0x prefix
        criteo_line("0"),                                                   # 12 good
    ]
    path = write(tmp_path / "day_1", "\n".join(lines) + "\n")
    frame, quarantine, rows = read(read_criteo(path, chunksize=4), tmp_path)
    assert bad_lines(rows) == {5: "label is not a number: ''", 6: "label is not a number: 'x'",
                               7: "expected 40 fields, found 41", 8: "I1 is not an integer: 'abc'",
                               9: "I13 is not an integer: '7e3'",
                               10: "C26 is not a hex id of 1-15 digits: '123456789abcdef0'",
                               11: "C1 is not a hex id of 1-15 digits: '0x1f'"}
    assert (quarantine.n_bad, quarantine.n_total) == (7, 11)
    assert frame["label"].tolist() == [1, 0, 1, 0]
    assert frame[list(CRITEO_DENSE)].iloc[1].isna().all() and (frame[list(CRITEO_SPARSE)].iloc[1] == -1).all()
    assert frame["I1"].iloc[2] == -3 and frame["C1"].iloc[2] == 0xFFFFFFFF
    assert quarantine.reasons["label is not a number"] == 2


# ---------------------------------------------------------------------------------- Parquet


def test_parquet(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"user": np.arange(10), "item": np.arange(10) * 2, "x": [0.5] * 10}), path)
    chunks = list(read_parquet(path, columns=["user", "item"], batch_size=4))
    assert [len(c.frame) for c in chunks] == [4, 4, 2]
    frame = read_all(iter(chunks), Quarantine(None))
    assert frame.to_dict("list") == {"user": list(range(10)), "item": list(range(0, 20, 2))}


def test_parquet_missing_columns_and_not_parquet(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"user": [1]}), path)
    with pytest.raises(DataError, match=re.escape(f"{path}: missing required column(s) item, label")):
        read_parquet(path, columns=["user", "item", "label"])
    text = write(tmp_path / "u.data", UDATA)
    with pytest.raises(DataError, match=re.escape(f"{text}: is not a readable Parquet file")):
        read_parquet(text)


# ---------------------------------------------------------------------------------- registry


def test_open_reader(tmp_path):
    assert set(READERS) == {"movielens", "sequences", "lightgcn", "libfm", "criteo", "parquet"}
    frame = read_all(open_reader("movielens", write(tmp_path / "u.data", "1\t2\t3\t4\n"), layout="udata"))
    assert frame["item_id"].tolist() == [2]
    with pytest.raises(DataError, match="unknown format 'csv'; expected one of movielens"):
        open_reader("csv", tmp_path / "u.data")
    with pytest.raises(ConfigError, match="unknown option"):
        open_reader("parquet", tmp_path / "u.data", chunksize=5)


# ---------------------------------------------------------------------------------- real files


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{relative} not found at {path}")
    return path


def test_real_ml100k_atomic():
    quarantine = Quarantine(None)
    frame = read_all(read_movielens(shared_file("ml-100k/ml-100k.inter")), quarantine)
    assert len(frame) == 100_000 and quarantine.n_bad == 0
    assert frame["user_id"].nunique() == 943 and frame["item_id"].nunique() == 1682
    assert set(frame["rating"].unique()) == {1.0, 2.0, 3.0, 4.0, 5.0}


def test_real_frappe():
    quarantine = Quarantine(None)
    frame = read_all(read_libfm(shared_file("frappe/frappe.validation.libfm"), FRAPPE_FIELDS), quarantine)
    assert len(frame) == 57_722 and quarantine.n_bad == 0
    assert list(frame.columns) == ["label", *FRAPPE_FIELDS]
    assert set(frame["label"].unique()) == {0, 1}
    assert frame[list(FRAPPE_FIELDS)].to_numpy().max() == 5381
