"""MLflow runs end with the right status (KILLED on SIGTERM or Ctrl-C, FAILED on an error) and resume as one run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from recsys.tracking.mlflow_run import Tracker
from tests.conftest import ROOT

SLEEPER = """
import sys, time
from recsys.tracking.mlflow_run import Tracker
with Tracker(experiment="signals", root=sys.argv[1]).start("sleeper", {"a": 1}):
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
        while not _runs(tracker):
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
