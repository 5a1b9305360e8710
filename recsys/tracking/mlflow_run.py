"""MLflow runs: a local SQLite store by default, a tracking server when ``uri`` is set."""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import mlflow
import torch.distributed as dist
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)
_UNSAFE = re.compile(r"[^0-9A-Za-z_\-. /]")


def metric_name(name: str) -> str:
    """MLflow-safe metric name: ``recall@20`` -> ``recall_at_20``."""
    return _UNSAFE.sub("_", name.replace("@", "_at_"))


def flatten(config: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"a.b.c": "value"} (lists kept as their string form)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = str(value)[:6000]
    return flat


class Terminated(SystemExit):
    """SIGTERM arrived while a run was active (raised in the main thread; exits with status 128 + 15)."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turns SIGTERM into :class:`Terminated` in the main thread, so ``finally`` blocks run; restores the previous
    handler afterwards (and at the first SIGTERM, so a second one acts as before). Elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    previous = signal.SIG_DFL if previous is None else previous  # None: installed outside Python

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, previous)
        raise Terminated(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Run:
    """Logs into one active MLflow run; a no-op on ranks other than 0.

    Args:
        active: whether this process logs (rank 0).
    """

    def __init__(self, active: bool):
        self.active = active
        self.id = mlflow.active_run().info.run_id if active else None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, prefix: str = "") -> None:
        if self.active:
            mlflow.log_metrics({metric_name(prefix + k): float(v) for k, v in metrics.items()}, step=step)

    def log_params(self, params: Mapping) -> None:
        if self.active:
            mlflow.log_params(flatten(params))

    def log_dict(self, data: dict, name: str) -> None:
        if self.active:
            mlflow.log_dict(data, name)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.active:
            mlflow.log_artifact(str(path), folder)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.active:
            mlflow.set_tags(dict(tags))


class Tracker:
    """Where runs are recorded.

    Args:
        uri: tracking URI; None uses ``sqlite:///<root>/mlflow.db``.
        experiment: experiment name (created on first use).
        root: directory of the default SQLite store and artifact folder (default: cwd).

    Example:
        >>> tracker = Tracker(experiment="demo", root="/tmp/mlflow-example")  # doctest: +SKIP
        >>> with tracker.start("run-1", {"model": {"dim": 8}}) as run:        # doctest: +SKIP
        ...     run.log_metrics({"recall@20": 0.3})
    """

    def __init__(self, uri: str | None = None, experiment: str = "recsys", root: str | None = None):
        self.root = Path(root or Path.cwd()).resolve()
        self.uri = uri or f"sqlite:///{self.root / 'mlflow.db'}"
        self.experiment = experiment

    def experiment_id(self) -> str:
        mlflow.set_tracking_uri(self.uri)
        client = MlflowClient(self.uri)
        found = client.get_experiment_by_name(self.experiment)
        if found:
            return found.experiment_id
        location = (self.root / "mlartifacts").as_uri() if self.uri.startswith("sqlite:") else None
        return client.create_experiment(self.experiment, artifact_location=location)

    @contextmanager
    def start(self, run_name: str | None, config: Mapping, tags: Mapping[str, str] | None = None,
              run_id: str | None = None, nested: bool = False,
              stopped: tuple[type[BaseException], ...] = ()) -> Iterator[Run]:
        """Starts a run with the flattened ``config`` as params and the full config as an artifact.

        With ``run_id`` (a resumed training), continues that run: params it has not logged yet are logged, the
        changed ones (e.g. ``trainer.epochs``) go to the tag ``resumed_with`` as JSON, since MLflow keeps a param's
        first value. When that run is gone from the store, a new run is tagged ``resumed_from=<run_id>``.

        With ``nested``, the run is a child of the active run (e.g. a tuning trial under its study's run).

        The run ends ``FINISHED``; ``KILLED`` on SIGTERM (see :class:`Terminated`), Ctrl-C or one of the ``stopped``
        exceptions (e.g. a pruned trial); ``FAILED`` on any other exception. Exceptions are re-raised.
        """
        if dist.is_initialized() and dist.get_rank() != 0:
            yield Run(active=False)
            return
        began, status = time.perf_counter(), "FAILED"
        with _sigterm_raises():
            try:
                experiment_id = self.experiment_id()
                previous = self._continuable(run_id, experiment_id) if run_id else None
                if previous is None:
                    mlflow.start_run(experiment_id=experiment_id, run_name=run_name, nested=nested)
                    run = Run(active=True)
                    run.log_params(config)
                    run.log_dict(dict(config), "config.yaml")
                    run.set_tags({**({"resumed_from": run_id} if run_id else {}), **(tags or {})})
                else:
                    mlflow.start_run(run_id=run_id)
                    run = Run(active=True)
                    logged, flat = previous.data.params, flatten(config)
                    if new := {k: v for k, v in flat.items() if k not in logged}:
                        mlflow.log_params(new)
                    changed = {k: v for k, v in flat.items() if k in logged and logged[k] != v}
                    run.set_tags({**({"resumed_with": json.dumps(changed)[:5000]} if changed else {}), **(tags or {})})
                yield run
                run.log_metrics({"wall_seconds": time.perf_counter() - began})
                status = "FINISHED"
            except (Terminated, KeyboardInterrupt, *stopped):
                status = "KILLED"
                raise
            finally:
                if mlflow.active_run() is not None:
                    mlflow.end_run(status)

    def _continuable(self, run_id: str, experiment_id: str):
        """The MLflow run ``run_id`` if this experiment holds it (not deleted), else None with a warning."""
        try:
            found = MlflowClient(self.uri).get_run(run_id)
        except MlflowException as error:
            logger.warning("cannot continue MLflow run %s (%s): starting a new run tagged resumed_from", run_id,
                           error.message)
            return None
        if found.info.lifecycle_stage == "deleted" or found.info.experiment_id != experiment_id:
            logger.warning("cannot continue MLflow run %s: it is %s; starting a new run tagged resumed_from", run_id,
                           "deleted" if found.info.lifecycle_stage == "deleted"
                           else f"in experiment {found.info.experiment_id}, not {self.experiment!r} ({experiment_id})")
            return None
        return found
