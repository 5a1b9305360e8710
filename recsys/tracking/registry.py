"""MLflow models of packaged recommenders: logging the pyfunc, registering versions, the champion alias.

Aliases only (no stages): ``models:/<name>@champion`` is what batch scoring and serving load.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from recsys.errors import ConfigError
from recsys.inference.export import serving_export
from recsys.inference.package import Package
from recsys.inference.predict import predict_frame
from recsys.inference.scorers import CTRScorer, load
from recsys.tracking.mlflow_run import metric_name

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
LIBRARY = Path(__file__).resolve().parents[1]  # the recsys package, shipped with the model (code_paths)
MODEL_ARTIFACT = "model"
CHAMPION = "champion"
PROMOTIONS = "model-promotions"  # the experiment recording every promotion decision
REQUIREMENTS = ["torch==2.13.0", "fbgemm-gpu-cpu==1.8.0", "torchrec==1.8.0", "mlflow", "pandas", "pyarrow", "numpy",
                "scipy", "safetensors", "faiss-cpu", "hydra-core", "tensordict", "torchmetrics==1.0.3", "iopath",
                "pyre-extensions"]


def example_input(package: Package, scorer=None, rows: int = 3) -> pd.DataFrame:
    """A few valid input rows for the model's signature: known users, or CTR rows of the most common ids."""
    scorer = scorer or load(package)
    if isinstance(scorer, CTRScorer):
        frame = {name: [0.0] * rows for name in scorer.schema.dense}
        frame |= {f: [package.vocabs[f][0]] * rows for f in scorer.schema.sparse}
        frame |= {f: [[package.vocabs[f][0]]] * rows for f in scorer.schema.multi_valued}
        return pd.DataFrame(frame)
    return pd.DataFrame({"user_id": package.vocabs["user"][:rows]})


def log_package(package: Package, name: str = MODEL_ARTIFACT) -> dict:
    """Logs ``package`` into the active MLflow run as a pyfunc model (artifact ``name``) and its serving export
    (artifacts ``serving/``); returns the model URI and the bytes of the serving files."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = package.save(Path(tmp) / "package")
        sizes = serving_export(package, Path(tmp) / "serving")
        scorer = load(package)
        example = example_input(package, scorer)
        params = {} if isinstance(scorer, CTRScorer) else {"k": 10, "exclude_seen": True}
        signature = infer_signature(example, predict_frame(scorer, example, params), params=params or None)
        info = mlflow.pyfunc.log_model(name=name, python_model=str(PYFUNC_CODE), artifacts={"package": str(directory)},
                                       code_paths=[str(LIBRARY)], signature=signature, pip_requirements=REQUIREMENTS,
                                       model_config={"tables": "float", "index": "Flat"})
        mlflow.log_artifacts(str(Path(tmp) / "serving"), "serving")
    mlflow.log_metrics({f"serving_bytes_{k}": v for k, v in sizes.items()} | {"package_bytes": package.bytes()})
    return {"model_uri": info.model_uri, "serving_bytes": sizes}


def register(run_id: str, name: str, tracking_uri: str | None = None, artifact: str = MODEL_ARTIFACT) -> str:
    """Registers the pyfunc model of run ``run_id`` as a new version of ``name``; returns the version."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    run = MlflowClient().get_run(run_id)  # raises a clear MlflowException for an unknown run
    logged = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{run_id}' AND name = '{artifact}'")
    if not logged:
        raise ConfigError(f"run {run_id} logged no model named '{artifact}' (trained with log_model=false?)")
    version = mlflow.register_model(logged[-1].model_uri, name, tags={"model": run.data.tags.get("model", ""),
                                                                       "run_id": run_id})
    return str(version.version)


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
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client, metric = MlflowClient(), metric_name(metric)
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
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{outcome.name}-v{outcome.version}"):
        mlflow.set_tags({"model_name": outcome.name, "version": outcome.version, "alias": alias,
                         "promoted": str(outcome.promoted), "reason": outcome.reason})
        mlflow.log_metrics({"candidate": outcome.candidate, "promoted": float(outcome.promoted),
                            **({"champion": outcome.champion} if outcome.champion is not None else {})})
        mlflow.log_text(json.dumps(asdict(outcome), indent=1), "promotion.json")
