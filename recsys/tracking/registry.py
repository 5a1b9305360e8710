"""MLflow models of packaged recommenders: logging the pyfunc, registering versions, the champion alias.

Aliases only (no stages): ``models:/<name>@champion`` is what batch scoring and serving load.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import mlflow
import pandas as pd
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from recsys.errors import ConfigError
from recsys.inference.export import serving_export
from recsys.inference.package import META, VOCAB, WEIGHTS, Package
from recsys.inference.predict import predict_frame
from recsys.inference.scorers import load
from recsys.tracking.mlflow_run import metric_name

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
LIBRARY = Path(__file__).resolve().parents[1]  # the recsys package, shipped with the model (code_paths)
MODEL_ARTIFACT = "model"
CHAMPION = "champion"
PROMOTIONS = "model-promotions"  # the experiment recording every promotion decision
PACKAGE = "artifacts/package"  # the package directory inside a logged pyfunc model
REGISTERED = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))")
REQUIREMENTS = ["torch==2.13.0", "fbgemm-gpu-cpu==1.8.0", "torchrec==1.8.0", "mlflow", "pandas", "pyarrow", "numpy",
                "scipy", "safetensors", "faiss-cpu", "hydra-core", "tensordict", "torchmetrics==1.0.3", "iopath",
                "pyre-extensions"]


def example_input(package: Package, scorer=None, rows: int = 3) -> pd.DataFrame:
    """A few valid input rows for the model's signature: known users, or CTR rows of the most common ids."""
    return (scorer or load(package)).example_input(rows)


def log_package(package: Package, name: str = MODEL_ARTIFACT) -> dict:
    """Logs ``package`` into the active MLflow run as a pyfunc model (artifact ``name``) and its serving export
    (artifacts ``serving/``); returns the model URI and the bytes of the serving files."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = package.save(Path(tmp) / "package")
        scorer = load(package)
        sizes = serving_export(package, Path(tmp) / "serving", scorer)
        example = example_input(package, scorer)
        params = dict(scorer.default_params)
        signature = infer_signature(example, predict_frame(scorer, example, params), params=params or None)
        info = mlflow.pyfunc.log_model(name=name, python_model=str(PYFUNC_CODE), artifacts={"package": str(directory)},
                                       code_paths=[str(LIBRARY)], signature=signature, pip_requirements=REQUIREMENTS,
                                       input_example=(example, params) if params else example,
                                       model_config={"tables": "float", "index": "Flat"})
        mlflow.log_artifacts(str(Path(tmp) / "serving"), "serving")
    served = scorer.memory()  # what a server holds for the model, beside the training run's table_bytes_*
    mlflow.log_metrics({f"serving_bytes_{k}": v for k, v in sizes.items()} | {"package_bytes": package.bytes()}
                       | {f"served_bytes_{k}": v for k, v in served.items()} | {"served_bytes_total": sum(served.values())})
    return {"model_uri": info.model_uri, "serving_bytes": sizes, "served_bytes": served}


def register(run_id: str, name: str, tracking_uri: str | None = None, artifact: str = MODEL_ARTIFACT) -> str:
    """Registers the pyfunc model of run ``run_id`` as a new version of ``name``; returns the version."""
    if tracking_uri:  # the registry finds the logged model's artifacts through the current tracking store
        mlflow.set_tracking_uri(tracking_uri)
    client = _client(tracking_uri)
    run = client.get_run(run_id)  # raises a clear MlflowException for an unknown run
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}' AND name = '{artifact}'")
    if not logged:
        raise ConfigError(f"run {run_id} logged no model named '{artifact}' (trained with log_model=false?)")
    model = logged[-1]
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source=f"models:/{model.model_id}", run_id=run_id,
                                          model_id=model.model_id,
                                          tags={"model": run.data.tags.get("model", ""), "run_id": run_id})
    return str(version.version)


def _client(tracking_uri: str | None) -> MlflowClient:
    """A client of ``tracking_uri`` for runs *and* the registry (None: MLflow's current URIs); no global state."""
    return MlflowClient(tracking_uri, registry_uri=tracking_uri) if tracking_uri else MlflowClient()


@dataclass
class Promotion:
    """The outcome of a promotion gate."""

    name: str
    version: str
    metric: str
    candidate: float
    champion: float | None
    champion_version: str | None
    promoted: bool
    reason: str


def promote(name: str, version: str | None = None, metric: str = "test_recall_at_20", mode: str = "max",
            min_delta: float = 0.0, alias: str = CHAMPION, tracking_uri: str | None = None) -> Promotion:
    """Sets ``alias`` on version ``version`` (None: the newest) of ``name`` when its run's ``metric`` beats the
    current alias holder's by at least ``min_delta`` (``mode`` max or min); with no alias holder it is promoted.
    The comparison is recorded as tags of the version and as a run of the ``model-promotions`` experiment."""
    if mode not in ("max", "min"):
        raise ConfigError(f"promote: mode must be 'max' or 'min', got {mode!r}")
    client, metric = _client(tracking_uri), metric_name(metric)
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        raise ConfigError(f"no registered model named '{name}'; register one first (python -m pipelines.register)")
    if version is None:
        version = str(max(int(v.version) for v in versions))
    candidate = client.get_model_version(name, version)
    value = _metric(client, candidate.run_id, metric, f"{name} v{version}")
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        holder = None
    if holder is None:
        outcome = Promotion(name, version, metric, value, None, None, True, f"no {alias} yet")
    elif holder.version == version:
        outcome = Promotion(name, version, metric, value, value, version, False, f"v{version} already is {alias}")
    else:
        best = _metric(client, holder.run_id, metric, f"{name} v{holder.version} ({alias})")
        gain = value - best if mode == "max" else best - value
        passed = gain >= min_delta
        outcome = Promotion(name, version, metric, value, best, holder.version, passed,
                            f"{metric} {value:.6g} vs {best:.6g} ({alias} v{holder.version}): "
                            f"{'gain' if gain >= 0 else 'loss'} {abs(gain):.6g} {'>=' if passed else '<'} {min_delta}")
    if outcome.promoted:
        client.set_registered_model_alias(name, alias, version)
    _record(client, outcome, alias, candidate.run_id)
    return outcome


def _metric(client: MlflowClient, run_id: str, metric: str, what: str) -> float:
    metrics = client.get_run(run_id).data.metrics
    if metric not in metrics:
        raise ConfigError(f"{what}: run {run_id} has no metric '{metric}'; it has {sorted(metrics)[:20]}")
    return float(metrics[metric])


def _record(client: MlflowClient, outcome: Promotion, alias: str, run_id: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for key, value in {"promotion.checked": stamp, "promotion.metric": outcome.metric,
                       "promotion.promoted": str(outcome.promoted), "promotion.reason": outcome.reason}.items():
        client.set_model_version_tag(outcome.name, outcome.version, key, value)
    found = client.get_experiment_by_name(PROMOTIONS)
    if found is None:  # its artifacts beside the trained run's (not ./mlruns of the working directory)
        location = client.get_experiment(client.get_run(run_id).info.experiment_id).artifact_location
        experiment_id = client.create_experiment(PROMOTIONS, artifact_location=location)
    else:
        experiment_id = found.experiment_id
    tags = {"model_name": outcome.name, "version": outcome.version, "alias": alias, "promoted": str(outcome.promoted),
            "reason": outcome.reason}
    run = client.create_run(experiment_id, run_name=f"{outcome.name}-v{outcome.version}", tags=tags)
    values = {"candidate": outcome.candidate, "promoted": float(outcome.promoted),
              **({"champion": outcome.champion} if outcome.champion is not None else {})}
    for key, value in values.items():
        client.log_metric(run.info.run_id, key, value)
    client.log_text(run.info.run_id, json.dumps(asdict(outcome), indent=1), "promotion.json")
    client.set_terminated(run.info.run_id)


@dataclass
class FetchedPackage:
    """A package directory on local disk and what it is: the registered ``name`` and ``version`` (for other URIs and
    directories: the URI or directory name and ``sha-<12 hex>`` of the files)."""

    directory: Path
    name: str
    version: str | None = None

    def __post_init__(self):
        self.version = self.version or f"sha-{self.digest[:12]}"

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of the package's files (read on first use, while the context is open)."""
        return package_digest(self.directory)


@contextmanager
def fetched_package(uri: str | Path, tracking_uri: str | None = None, quiet: bool = False) -> Iterator[FetchedPackage]:
    """The package of ``uri`` on local disk while the context is open (downloads are removed after it).

    ``uri``: a package directory, a downloaded pyfunc model directory, ``models:/<name>@<alias>`` or
    ``models:/<name>/<version>`` (the alias is resolved to a version first, and exactly that version is downloaded,
    so the version reported is the one loaded even when the alias moves meanwhile), or any other MLflow model URI
    (``models:/m-<id>``, ``runs:/<run_id>/model``). ``quiet`` hides MLflow's download progress bar.
    """
    local = Path(str(uri)).expanduser()
    if local.is_dir():
        yield FetchedPackage(_package_dir(local, str(uri)), local.name)
        return
    if ":/" not in str(uri):
        raise ConfigError(f"model {str(uri)!r} is neither a package directory nor an MLflow model URI "
                          "(models:/<name>@<alias>, models:/<name>/<version>, models:/m-<id>, runs:/<run_id>/model)")
    client = _client(tracking_uri)
    where = tracking_uri or mlflow.get_tracking_uri()
    name, version, source = str(uri), None, str(uri)
    if match := REGISTERED.fullmatch(str(uri)):
        name = match["name"]
        try:
            found = client.get_model_version_by_alias(name, match["alias"]) if match["alias"] else \
                client.get_model_version(name, match["version"])
        except mlflow.exceptions.MlflowException as error:
            raise ConfigError(f"{uri}: not found in the registry at {where}: {error.message}") from error
        version = str(found.version)
        source = f"{client.get_model_version_download_uri(name, version).rstrip('/')}/{PACKAGE}"
    with tempfile.TemporaryDirectory(prefix="recsys-model-") as tmp, _progress_bar(not quiet):
        try:
            root = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=tracking_uri)
        except (mlflow.exceptions.MlflowException, OSError) as error:
            raise ConfigError(f"model {uri}: cannot download {source} from {where}: {error}") from error
        yield FetchedPackage(_package_dir(Path(root), str(uri)), name, version)


def _package_dir(root: Path, what: str) -> Path:
    for candidate in (root, root / PACKAGE):
        if (candidate / META).is_file():
            return candidate
    raise ConfigError(f"model {what}: {root} is neither a model package ({META}, {VOCAB}, {WEIGHTS}) nor a recsys "
                      "pyfunc model (artifacts/package)")


def package_digest(directory: Path) -> str:
    """sha256 of a package's files: two packages score alike exactly when their digests agree."""
    digest = hashlib.sha256()
    for name in (META, VOCAB, WEIGHTS):
        digest.update(name.encode())
        with open(directory / name, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@contextmanager
def _progress_bar(shown: bool) -> Iterator[None]:
    """MLflow's artifact progress bar shown or hidden meanwhile (``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR``)."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    if not shown:
        os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
