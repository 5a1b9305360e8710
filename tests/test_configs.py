"""The real config tree composes, every group instantiates, and the pipelines run end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient

from recsys.data.synthetic import SyntheticCTR, SyntheticInteractions
from recsys.tracking.mlflow_run import Tracker
from recsys.training.loop import TrainerConfig
from tests.conftest import ROOT

CONF = ROOT / "conf"


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("model", _options("model"))
def test_every_model_config_composes_and_names_a_trainable(compose_config, model):
    cfg = compose_config("train", (f"model={model}",))
    assert cfg.model.name == model
    assert cfg.model._target_.startswith("recsys.")


@pytest.mark.parametrize("data", _options("data"))
def test_every_data_config_composes(compose_config, data):
    overrides = (f"data={data}",) + (("data.source.path=/x",) if data in ("movielens", "criteo", "sequences") else ())
    cfg = compose_config("prepare", overrides)
    assert cfg.data.kind in ("interactions", "ctr")
    assert cfg.data.prepared_dir.endswith(f"prepared/{cfg.data.name}")
    if cfg.data.source.format == "synthetic":
        assert isinstance(instantiate(cfg.data.source.generator), (SyntheticInteractions, SyntheticCTR))


def test_trainer_and_tracking_groups_instantiate(compose_config, tmp_path):
    cfg = compose_config("train", ("trainer.epochs=3",))
    trainer = instantiate(cfg.trainer)
    assert isinstance(trainer, TrainerConfig) and trainer.epochs == 3 and trainer.eval_ks == [20, 50]
    tracker = instantiate(cfg.tracking)
    assert isinstance(tracker, Tracker) and tracker.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    server = instantiate(compose_config("train", ("tracking=server", "tracking.uri=http://127.0.0.1:5999")).tracking)
    assert server.uri == "http://127.0.0.1:5999"


SMALL = ["data.source.generator.n_users=300", "data.source.generator.n_items=200",
         "data.source.generator.n_interactions=12000", "model.dim=16", "trainer.batch_size=256"]


@pytest.mark.integration
def test_train_pipeline_logs_a_complete_mlflow_run(compose_config, tmp_path):
    from pipelines.train import run

    cfg = compose_config("train", tuple(SMALL))
    result = run(cfg)
    assert result["metrics"]["recall@20"] > result["baseline"]["recall@20"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = client.get_run(result["run_id"])
    metrics = logged.data.metrics
    assert metrics["test_recall_at_20"] == pytest.approx(result["metrics"]["recall@20"])
    assert metrics["table_bytes_total"] == sum(result["memory"].values()) > 0
    assert {"popularity_recall_at_20", "wall_seconds", "loss", "epoch_seconds"} <= set(metrics)
    assert len(client.get_metric_history(result["run_id"], "loss")) == 2  # one per epoch
    assert logged.data.params["model.dim"] == "16"
    artifacts = {a.path for a in client.list_artifacts(result["run_id"])}
    assert {"config.yaml", "data_manifest.json", "table_memory.json", "table_layout.json"} <= artifacts
    parts = client.download_artifacts(result["run_id"], "table_memory.json", str(tmp_path))
    assert sum(json.loads(Path(parts).read_text()).values()) == metrics["table_bytes_total"]
    layout = json.loads(Path(client.download_artifacts(result["run_id"], "table_layout.json", str(tmp_path))).read_text())
    assert {table: entry["bytes"] for table, entry in layout.items()} == result["memory"]  # per table: method, budget
    assert {(entry["method"], entry["budget"]) for entry in layout.values()} == {("Full", None)}


@pytest.mark.integration
@pytest.mark.slow  # 20 s: a Hydra sweep of two training jobs
def test_multirun_sweep_makes_one_mlflow_run_per_job(tmp_path):
    shared = ROOT.parent / "shared" / "data"
    command = [sys.executable, "-m", "pipelines.train", "-m", "model.dim=8,16", f"paths.root={tmp_path}",
               f"paths.shared_data={shared}", "trainer.epochs=1", "trainer.progress=false",
               f"hydra.sweep.dir={tmp_path}/multirun", *SMALL[:3]]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("recsys").experiment_id])
    assert sorted(r.data.params["model.dim"] for r in runs) == ["16", "8"]
    assert all(r.info.status == "FINISHED" and "test_recall_at_20" in r.data.metrics for r in runs)


@pytest.mark.parametrize("embedding", _options("embedding"))
def test_every_embedding_config_builds_the_mf_tables(compose_config, embedding, tiny_interactions):
    from recsys.embeddings.collection import CompressedEmbeddings, EmbeddingSettings
    from recsys.embeddings.spec import TableStats
    from recsys.models.mf import mf_specs

    settings = instantiate(compose_config("train", (f"embedding={embedding}",)).embedding)
    assert isinstance(settings, EmbeddingSettings)
    data, graph = tiny_interactions, tiny_interactions.graph()
    stats = {"user": TableStats(counts=data.user_counts(), graph=graph, side="user"),
             "item": TableStats(counts=data.item_counts(), graph=graph, side="item")}
    emb = CompressedEmbeddings(mf_specs(data.n_users, data.n_items, 64), settings, stats)
    full = (data.n_users + data.n_items) * 64 * 4
    budget = getattr(settings.default, "budget", None)
    total = sum(emb.memory().values())
    assert total <= (budget or 1.0) * full or embedding == "vq_e2e"  # vq_e2e trains a full query table


@pytest.mark.integration
def test_python_call_trains_like_the_command_line(tmp_path):
    from pipelines.train import train

    result = train("model=als", "model.factors=8", "trainer.epochs=2", "trainer.progress=false",
                   f"paths.root={tmp_path}", *SMALL[:3])
    logged = MlflowClient(result["tracking_uri"]).get_run(result["run_id"])
    assert result["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert logged.data.params["model.factors"] == "8" and not any(k.startswith("hydra") for k in logged.data.params)
    checkpoints = logged.data.params["trainer.checkpoint_dir"]  # ${hydra:job.override_dirname} resolved as on the CLI
    assert checkpoints.startswith(f"{tmp_path}/checkpoints/synthetic/als/") and "model.factors=8" in checkpoints
    assert logged.data.metrics["test_recall_at_20"] == pytest.approx(result["metrics"]["recall@20"])


def test_shared_data_stays_beside_the_project_when_the_root_moves(tmp_path, monkeypatch):
    """Issue 14: ``paths.root=...`` also moved the shared data folder, so a run rooted elsewhere lost ``ml100k``."""
    from pipelines.config import PROJECT, compose_run

    monkeypatch.delenv("RECSYS_SHARED_DATA", raising=False)
    cfg = compose_run("prepare", [f"paths.root={tmp_path / 'elsewhere'}", "data=ml100k"])
    assert Path(cfg.paths.shared_data) == PROJECT / ".." / "shared" / "data"
    assert cfg.data.source.path == f"{PROJECT}/../shared/data/ml-100k/ml-100k.inter"
    assert cfg.data.prepared_dir.startswith(str(tmp_path / "elsewhere"))
    monkeypatch.setenv("RECSYS_SHARED_DATA", str(tmp_path / "mine"))
    assert compose_run("prepare", ["data=ml100k"]).data.source.path == f"{tmp_path}/mine/ml-100k/ml-100k.inter"
    # the command line resolves the same (the resolver is registered when the pipelines package is imported)
    monkeypatch.delenv("RECSYS_SHARED_DATA")
    shown = subprocess.run([sys.executable, "-m", "pipelines.prepare", f"paths.root={tmp_path / 'cli'}", "data=ml100k",
                            "--cfg", "job", "--resolve"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert f"path: {PROJECT}/../shared/data/ml-100k/ml-100k.inter" in shown.stdout
