"""MLflow runs end with the right status (KILLED on SIGTERM or Ctrl-C, FAILED on an error); a resume continues its run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from recsys.tracking.mlflow_run import Tracker
from tests.conftest import ROOT, SHARED_DATA, TINY_TRAIN

SLEEPER = """
import pathlib, sys, time
from recsys.tracking.mlflow_run import Tracker
with Tracker(experiment="signals", root=sys.argv[1]).start("sleeper", {"a": 1}):
    (pathlib.Path(sys.argv[1]) / "started").touch()  # the run is open; the test does not read the store meanwhile
    while True:
        time.sleep(0.05)
"""


def _runs(tracker: Tracker):
    return MlflowClient(tracker.uri).search_runs([tracker.experiment_id()])


def test_sigterm_ends_the_run_as_killed(tmp_path):
    tracker = Tracker(experiment="signals", root=str(tmp_path))
    tracker.experiment_id()  # the store exists before the child opens it: no concurrent schema creation
    with open(tmp_path / "stderr.txt", "w") as stderr:
        child = subprocess.Popen([sys.executable, "-c", SLEEPER, str(tmp_path)], cwd=ROOT, stderr=stderr)
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "started").exists():  # not polling SQLite: a reader can lock out the child's writes
            assert child.poll() is None, (tmp_path / "stderr.txt").read_text()
            assert time.monotonic() < deadline, "the child's run never appeared in the store"
            time.sleep(0.1)
        child.send_signal(signal.SIGTERM)
        code = child.wait(timeout=180)
    finally:
        if child.poll() is None:
            child.kill()
    [run] = _runs(tracker)
    assert run.info.status == "KILLED", (tmp_path / "stderr.txt").read_text()
    assert code == 128 + signal.SIGTERM  # exited through Terminated(SystemExit), not killed by the signal


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt, "KILLED"), (ValueError, "FAILED")])
def test_an_exception_ends_the_run_and_is_reraised(tmp_path, error, status):
    tracker = Tracker(experiment="errors", root=str(tmp_path))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(error):
        with tracker.start("broken", {"a": 1}):
            assert signal.getsignal(signal.SIGTERM) is not before
            raise error()
    assert signal.getsignal(signal.SIGTERM) is before
    [run] = _runs(tracker)
    assert run.info.status == status


def test_continuing_a_run_keeps_the_first_params_and_tags_the_changed_ones(tmp_path):
    tracker = Tracker(experiment="resume", root=str(tmp_path))
    with tracker.start("first", {"trainer": {"epochs": 2, "resume": False}}) as run:
        run.log_metrics({"loss": 1.0}, step=0)
    with tracker.start("second", {"trainer": {"epochs": 3, "resume": True}, "extra": 1}, run_id=run.id) as again:
        again.log_metrics({"loss": 0.5}, step=1)
    [logged] = _runs(tracker)
    assert again.id == run.id and logged.info.status == "FINISHED"
    assert logged.data.params == {"trainer.epochs": "2", "trainer.resume": "False", "extra": "1"}
    assert json.loads(logged.data.tags["resumed_with"]) == {"trainer.epochs": "3", "trainer.resume": "True"}
    assert [m.step for m in MlflowClient(tracker.uri).get_metric_history(run.id, "loss")] == [0, 1]


def test_a_run_gone_from_the_store_is_replaced_by_one_tagged_resumed_from(tmp_path, caplog):
    tracker = Tracker(experiment="resume", root=str(tmp_path))
    with tracker.start("first", {"a": 1}) as run:
        pass
    MlflowClient(tracker.uri).delete_run(run.id)
    with tracker.start("second", {"a": 2}, run_id=run.id) as again:
        pass
    assert again.id != run.id
    logged = MlflowClient(tracker.uri).get_run(again.id)
    assert logged.data.tags["resumed_from"] == run.id and logged.data.params == {"a": "2"}
    assert f"cannot continue MLflow run {run.id}: it is deleted" in caplog.text


def test_a_resumed_training_continues_its_mlflow_run(tmp_path):
    from pipelines.train import train

    def run(epochs: int, resume: bool) -> dict:
        return train(f"paths.root={tmp_path}", f"paths.shared_data={SHARED_DATA}", "model=mf_bpr", "model.dim=8",
                     "log_model=false", f"trainer.checkpoint_dir={tmp_path}/ck", f"trainer.epochs={epochs}",
                     f"trainer.resume={str(resume).lower()}", *TINY_TRAIN)

    first, resumed = run(2, False), run(3, True)
    assert resumed["run_id"] == first["run_id"]
    client = MlflowClient(resumed["tracking_uri"])
    [logged] = client.search_runs([client.get_run(first["run_id"]).info.experiment_id])
    assert logged.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(logged.info.run_id, "loss")] == [0, 1, 2]
    assert json.loads(logged.data.tags["resumed_with"]) == {"trainer.epochs": "3", "trainer.resume": "True"}
