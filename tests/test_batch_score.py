"""Batch scoring: the top-k and probabilities of a direct computation, exactly-once parts that survive a kill,
a resume that rewrites only what is missing, two torchrun ranks giving one process's rows, and clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.batch_score import batch_score
from recsys.errors import ConfigError, DataError
from recsys.inference.batch import JOB, MANIFEST, SUCCESS, BatchSettings, score_parquet
from recsys.inference.scorers import load
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

QUIET = dict(progress=False)


def package_dir(registered: dict) -> Path:
    """The package of a registered champion, downloaded independently of the code under test."""
    client = MlflowClient(registered["tracking_uri"], registry_uri=registered["tracking_uri"])
    version = client.get_model_version_by_alias(registered["name"], "champion").version
    source = client.get_model_version_download_uri(registered["name"], version)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/artifacts/package",
                                                    tracking_uri=registered["tracking_uri"]))


def write_files(table: pa.Table, directory: Path, files: int) -> Path:
    """``table`` split into ``files`` parquet files (interleaved rows), small row groups."""
    directory.mkdir(parents=True)
    for f in range(files):
        pq.write_table(table.take(np.arange(f, table.num_rows, files)), directory / f"rows-{f:02d}.parquet",
                       row_group_size=70)
    return directory


def read_output(out: Path) -> pa.Table:
    table = ds.dataset(out, partitioning="hive").to_table()
    return table.sort_by([(c, "ascending") for c in table.column_names])


def parts(out: Path) -> dict[str, int]:
    """Relative part path -> mtime (ns)."""
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.glob("fragment=*/part-*.parquet")}


def leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def mf(registered_mf) -> dict:
    """The registered MF, its scorer, and its users: every known one plus 40 the model has not seen."""
    scorer = load(package_dir(registered_mf))
    known = scorer.users.ids
    unknown = np.arange(10**7, 10**7 + 40, dtype=known.dtype)
    return {**registered_mf, "scorer": scorer, "known": known, "unknown": unknown,
            "uri": f"models:/{registered_mf['name']}@champion"}


@pytest.fixture(scope="module")
def many_users(mf, tmp_path_factory) -> Path:
    """20,000 user rows (known and unknown users, repeated) in 12 files: 204 parts of 100 rows."""
    rng = np.random.default_rng(0)
    ids = rng.choice(np.concatenate([mf["known"], mf["unknown"]]), 20_000)
    return write_files(pa.table({"user_id": ids}), tmp_path_factory.mktemp("many") / "users", 12)


@pytest.fixture(scope="module")
def reference(mf, many_users, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted one-process run over ``many_users`` through the Python entry point."""
    out = tmp_path_factory.mktemp("reference") / "out"
    summary = batch_score(f"model.uri={mf['uri']}", f"input={many_users}", f"output={out}", "batch_size=100", "k=10",
                          f"tracking.uri={mf['tracking_uri']}", "progress=false")
    return out, summary


def command(mf: dict, users: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "pipelines.batch_score", f"model.uri={mf['uri']}", f"input={users}", f"output={out}", "batch_size=100",
            "k=10", f"tracking.uri={mf['tracking_uri']}", "progress=false", f"hydra.run.dir={out.parent}/hydra", *extra]


def assert_same_rows(out: Path, expected: Path) -> None:
    got, want = read_output(out), read_output(expected)
    assert got.num_rows == want.num_rows
    for name in ("fragment", "user_id", "rank", "item_id", "source"):
        assert got[name].equals(want[name]), name
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=1e-5, atol=1e-6)


def test_top_k_of_every_user_equals_the_model_scores_with_seen_items_masked(mf, tmp_path):
    users = np.concatenate([mf["known"], mf["unknown"]])
    source = write_files(pa.table({"user_id": users}), tmp_path / "users", 3)
    summary = score_parquet(mf["uri"], source, tmp_path / "out", BatchSettings(k=7, batch_size=64, **QUIET),
                            tracking_uri=mf["tracking_uri"])
    assert summary["rows_in"] == len(users) and summary["complete"] and summary["parts_skipped"] == 0
    got = read_output(tmp_path / "out").to_pandas()
    assert summary["rows_out"] == len(got) == 7 * len(users)
    assert got.dtypes["item_id"] == mf["scorer"].items.ids.dtype and got.dtypes["score"] == np.float32

    scorer = mf["scorer"]
    scores = mf["model"].score_users(torch.arange(len(scorer.users))).double()  # the trained model: every item, user
    scores[:, 0] = -torch.inf
    for row in range(1, len(scorer.users)):
        scores[row, torch.as_tensor(scorer.excluded(row), dtype=torch.long)] = -torch.inf
    top_scores, top_items = scores.topk(7, dim=1)
    by_user = {u: g.sort_values("rank") for u, g in got.groupby("user_id")}
    assert set(by_user) == set(users.tolist())
    for user in mf["known"]:
        rows, index = by_user[user], scorer.user_index([user])[0]
        assert rows["rank"].tolist() == list(range(1, 8)) and set(rows["source"]) == {"model"}
        assert rows["item_id"].tolist() == scorer.items.raw(top_items[index].numpy()).tolist()
        np.testing.assert_allclose(rows["score"], top_scores[index].numpy(), rtol=1e-5, atol=1e-5)
        assert (np.diff(rows["score"].to_numpy()) <= 0).all()
    popular = np.sort(scorer.popularity[1:])[::-1][:7]  # the counts of the 7 most popular items (ties either way)
    for user in mf["unknown"]:
        rows = by_user[user]
        assert set(rows["source"]) == {"popularity"} and rows["item_id"].nunique() == 7
        np.testing.assert_allclose(rows["score"], popular)
        np.testing.assert_allclose(scorer.popularity[scorer.item_index(rows["item_id"].tolist())], popular)

    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["rows_in"] == len(users) and manifest["rows_out"] == len(got)
    assert manifest["parts"] == len(manifest["files"]) == summary["parts_written"]
    assert (tmp_path / "out" / SUCCESS).is_file() and json.loads((tmp_path / "out" / JOB).read_text())["k"] == 7


def test_ctr_probabilities_equal_the_scorer_with_key_columns_passed_through(registered_ctr, tmp_path):
    raw = pq.read_table(registered_ctr["root"] / "data" / "raw" / "synthetic_ctr.parquet")
    raw = raw.append_column("row_id", pa.array(np.arange(raw.num_rows) * 3 + 1))
    missing = pa.array(np.arange(raw.num_rows) % 7 == 0)  # missing ids in a column of large int64 ids: no float trip
    raw = raw.set_column(raw.schema.get_field_index("s0"), "s0", pc.if_else(missing, pa.scalar(None, pa.int64()),
                                                                            raw["s0"]))
    source = write_files(raw, tmp_path / "rows", 4)
    uri = f"models:/{registered_ctr['name']}@champion"
    summary = score_parquet(uri, source, tmp_path / "out", BatchSettings(batch_size=256, key_columns=("row_id", "label"),
                                                                       **QUIET), tracking_uri=registered_ctr["tracking_uri"])
    got = read_output(tmp_path / "out").to_pandas().sort_values("row_id")
    assert summary["rows_in"] == summary["rows_out"] == raw.num_rows == len(got)
    assert list(got.columns) == ["row_id", "label", "probability", "fragment"]
    frame = raw.to_pandas(integer_object_nulls=True).sort_values("row_id")
    np.testing.assert_array_equal(got["row_id"], frame["row_id"])
    np.testing.assert_array_equal(got["label"], frame["label"])
    expected = load(package_dir(registered_ctr)).predict(frame)
    np.testing.assert_allclose(got["probability"], expected, rtol=1e-5, atol=1e-6)


def test_resume_rewrites_only_the_missing_part(mf, tmp_path):
    source = write_files(pa.table({"user_id": np.repeat(mf["known"], 2)}), tmp_path / "users", 3)
    out, settings = tmp_path / "out", BatchSettings(k=5, batch_size=40, **QUIET)
    first = score_parquet(mf["uri"], source, out, settings, tracking_uri=mf["tracking_uri"])
    before, rows = parts(out), read_output(out)
    assert first["parts_written"] == len(before) > 10
    victim = sorted(before)[len(before) // 2]
    (out / victim).unlink()
    stale = [out / "._manifest.json.rank0.0123abcd.tmp", out / "fragment=00001" / ".part-00000.parquet.rank3.99aa.tmp"]
    for path in stale:  # what a run killed while writing leaves
        path.write_bytes(b"partial")
    time.sleep(0.01)
    second = score_parquet(mf["uri"], source, out, settings, tracking_uri=mf["tracking_uri"])
    after = parts(out)
    assert second["parts_written"] == 1 and second["parts_skipped"] == len(before) - 1
    assert set(after) == set(before) and after[victim] != before[victim]
    assert {p: t for p, t in after.items() if p != victim} == {p: t for p, t in before.items() if p != victim}
    assert (second["rows_in"], second["rows_out"]) == (first["rows_in"], first["rows_out"])
    assert read_output(out).equals(rows) and json.loads((out / MANIFEST).read_text())["rows_out"] == rows.num_rows
    assert leftovers(out) == []


@pytest.mark.slow  # 30 s: a subprocess killed mid-job, then re-run
def test_killed_run_finished_by_a_rerun_gives_the_rows_of_an_uninterrupted_run(mf, many_users, reference, tmp_path):
    expected, summary = reference
    total = summary["parts_written"]
    assert total == 204 and summary["complete"]
    out, log = tmp_path / "out", open(tmp_path / "killed.log", "w")
    job = subprocess.Popen([sys.executable, *command(mf, many_users, out)], cwd=tmp_path, stdout=log, stderr=log)
    deadline = time.monotonic() + 120
    while job.poll() is None and time.monotonic() < deadline and len(parts(out) if out.is_dir() else ()) < 5:
        time.sleep(0.005)
    os.kill(job.pid, signal.SIGKILL)
    assert job.wait(30) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    killed = len(parts(out))
    assert 0 < killed < total and not (out / SUCCESS).exists()

    done = subprocess.run([sys.executable, *command(mf, many_users, out)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rerun = json.loads(done.stdout.strip().splitlines()[-1])
    assert rerun["parts_skipped"] >= killed and rerun["parts_written"] + rerun["parts_skipped"] == total
    assert rerun["rows_out"] == summary["rows_out"] and rerun["complete"]
    assert leftovers(out) == [] and (out / SUCCESS).is_file()
    assert_same_rows(out, expected)
    manifest, reference_manifest = (json.loads((d / MANIFEST).read_text()) for d in (out, expected))
    assert manifest["files"] == reference_manifest["files"]


@pytest.mark.slow  # 30 s: two torchrun ranks
def test_two_torchrun_ranks_give_the_rows_of_one_process(mf, many_users, reference, tmp_path):
    expected, summary = reference
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           *command(mf, many_users, out)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert sorted(s["rank"] for s in summaries) == [0, 1] and {s["world_size"] for s in summaries} == {2}
    assert sum(s["rows_in"] for s in summaries) == summary["rows_in"]
    assert sum(s["parts_written"] for s in summaries) == summary["parts_written"]
    assert any(s["complete"] for s in summaries)
    fragments = {int(p.split("/")[0].split("=")[1]) for p in parts(out)}
    assert fragments == set(range(12))
    assert_same_rows(out, expected)
    assert json.loads((out / MANIFEST).read_text())["files"] == json.loads((expected / MANIFEST).read_text())["files"]


def test_missing_columns_are_named_with_the_file(mf, registered_ctr, tmp_path):
    bad = write_files(pa.table({"uid": mf["known"]}), tmp_path / "bad", 2)
    with pytest.raises(DataError, match=r"rows-00\.parquet: batch scoring with a ranking model needs columns \['user_id'\]"):
        score_parquet(mf["uri"], bad, tmp_path / "out", BatchSettings(**QUIET), tracking_uri=mf["tracking_uri"])
    assert not (tmp_path / "out" / JOB).exists()

    raw = pq.read_table(registered_ctr["root"] / "data" / "raw" / "synthetic_ctr.parquet").slice(0, 100)
    rows = write_files(raw.drop_columns(["s3", "tags"]), tmp_path / "ctr", 1)
    with pytest.raises(DataError, match=r"rows-00\.parquet: .*CTR model.* needs columns \['s3', 'tags', 'row_id'\]"):
        score_parquet(f"models:/{registered_ctr['name']}@champion", rows, tmp_path / "out2",
                      BatchSettings(key_columns=("row_id",), **QUIET), tracking_uri=registered_ctr["tracking_uri"])
    with pytest.raises(DataError, match="no such file or directory"):
        score_parquet(mf["uri"], tmp_path / "nowhere", tmp_path / "out3", BatchSettings(**QUIET),
                      tracking_uri=mf["tracking_uri"])


def test_a_rerun_with_other_settings_fails_unless_overwrite(mf, tmp_path):
    source = write_files(pa.table({"user_id": mf["known"]}), tmp_path / "users", 2)
    out = tmp_path / "out"
    score_parquet(mf["uri"], source, out, BatchSettings(k=10, batch_size=50, **QUIET), tracking_uri=mf["tracking_uri"])
    with pytest.raises(ConfigError, match=r"different batch job: exclude_seen: True in _job.json, False now; "
                                          r"k: 10 in _job.json, 5 now\. .*overwrite=true"):
        score_parquet(mf["uri"], source, out, BatchSettings(k=5, exclude_seen=False, batch_size=50, **QUIET),
                      tracking_uri=mf["tracking_uri"])
    with pytest.raises(ConfigError, match="batch_size: 50 in _job.json, 30 now"):
        score_parquet(mf["uri"], source, out, BatchSettings(k=10, batch_size=30, **QUIET), tracking_uri=mf["tracking_uri"])
    local = package_dir(mf)  # the same package by path: the same job
    assert score_parquet(local, source, out, BatchSettings(k=10, batch_size=50, **QUIET))["parts_written"] == 0

    replaced = score_parquet(mf["uri"], source, out, BatchSettings(k=5, batch_size=30, overwrite=True, **QUIET),
                             tracking_uri=mf["tracking_uri"])
    table = read_output(out)
    assert replaced["parts_written"] == len(parts(out)) and table.num_rows == 5 * len(mf["known"])
    assert pd.Series(table["rank"].to_numpy()).max() == 5 and json.loads((out / JOB).read_text())["k"] == 5


def test_the_config_composes_with_required_values(compose_config):
    cfg = compose_config("batch_score", ("model.uri=models:/recsys@champion", "input=in", "output=out"))
    assert (cfg.k, cfg.batch_size, cfg.model.tables, cfg.model.index, list(cfg.key_columns)) == (10, 10000, "float", "Flat", [])
    assert (ROOT / "conf" / "batch_score.yaml").is_file()
