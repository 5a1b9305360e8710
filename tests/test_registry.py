"""Model packages (JSON + safetensors) of every family, the pyfunc in a fresh process, registry and promotion."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from recsys.data.batching import CTRBatcher
from recsys.embeddings.quantization import pq_bytes
from recsys.errors import ConfigError
from recsys.inference.export import package_model, serving_export
from recsys.inference.package import META, VOCAB, WEIGHTS, Package
from recsys.inference.scorers import collections, load
from recsys.tracking.registry import PROMOTIONS, promote, register
from tests.conftest import ROOT, TINY_CTR, TINY_TRAIN, raw_ctr_rows, train_registered

pytestmark = pytest.mark.integration

RANKING = {
    "mf": ["model=mf_bpr", "model.dim=16"],
    "mf_frequency_hashing": ["model=mf_bpr", "model.dim=16", "embedding=frequency_hashing"],
    "mf_mixed_dim": ["model=mf_bpr", "model.dim=16", "embedding=mixed_dim", "embedding.default.budget=0.5"],
    "mf_low_rank": ["model=mf_bpr", "model.dim=16", "embedding=low_rank", "embedding.default.budget=0.5"],  # rank 4
    "mf_tensor_train": ["model=mf_bpr", "model.dim=16", "embedding=tensor_train"],
    "mf_quotient_remainder": ["model=mf_bpr", "model.dim=16", "embedding=quotient_remainder"],
    "mf_hashing_item_bias": ["model=mf_bpr", "model.dim=16", "embedding=hashing", "model.item_bias=true"],
    "mf_vq": ["model=mf_bpr", "model.dim=16", "embedding=vq_e2e"],
    "als": ["model=als", "model.factors=8"],
    "ease": ["model=ease", "model.regularization=50"],
    "ease_pruned": ["model=ease", "model.prune_top_k=8"],
    "nbmf": ["model=nbmf", "model.factors=8"],
    "comirec_sa": ["model=comirec_sa", "model.dim=16"],
    "comirec_dr": ["model=comirec_dr", "model.dim=16"],
    "comirec_vq": ["model=comirec_sa", "model.dim=16", "embedding=vq_e2e"],
}
CTR = {"dlrm": ["model=dlrm"], "deepfm_hashing": ["model=deepfm", "embedding=hashing"],
       "dcnv2_qr_total_budget": ["model=dcnv2", "embedding=quotient_remainder", "embedding.total_budget=0.25",
                                 "embedding.full_below_rows=0"],  # the tiny fields are all under 1000 rows
       "dlrm_vq_total_budget": ["model=dlrm", "embedding=vq_e2e", "embedding.default.codewords=null",
                                "embedding.total_budget=0.25", "embedding.full_below_rows=0"]}


def _trained(tmp_path, *overrides):
    from pipelines.train import train

    return train(f"paths.root={tmp_path}", "trainer.epochs=1", "log_model=false", *overrides)["model"]


def _no_pickles(directory):
    """No file of the package is a pickle (or a zip-wrapped torch.save)."""
    for path in directory.rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:2]
            assert head != b"\x80\x04" and head != b"\x80\x05" and not zipfile.is_zipfile(path), path


@pytest.mark.parametrize("name", sorted(RANKING))
def test_ranking_families_score_the_same_after_a_round_trip(name, tmp_path):
    model = _trained(tmp_path, *TINY_TRAIN, *RANKING[name])
    directory = package_model(model, model.data, metrics={"recall@20": 0.5}).save(tmp_path / "package")
    assert sorted(p.name for p in directory.iterdir()) == sorted([META, VOCAB, WEIGHTS])
    _no_pickles(directory)
    meta = json.loads((directory / META).read_text())
    assert meta["family"] == name.split("_")[0]
    assert len(load_file(str(directory / WEIGHTS))) > 0 and meta["metrics"] == {"recall@20": 0.5}
    recommender = load(directory)
    users = torch.arange(1, model.data.n_users)
    expected, got = model.score_users(users).float(), recommender.score_users(users).float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # top-k of all users in one call == brute force over the trained scores with the seen items masked (the batch's
    # heavy users take the second, deeper FAISS search)
    seen = model.data.matrix("train")
    masked = expected.clone()
    masked[:, 0] = -torch.inf
    rows, columns = seen[1:].nonzero()
    masked[rows, columns] = -torch.inf
    best = masked.topk(10, dim=1).values
    tops = recommender.recommend(users.numpy(), 10)
    assert {t.source for t in tops} == {"model"}
    got = np.stack([t.scores for t in tops])  # the same top-10 scores (hashed tables tie: equal items may swap)
    np.testing.assert_allclose(got, best.numpy(), rtol=1e-5, atol=1e-5)
    for row in (0, 6, 41):
        np.testing.assert_allclose(expected[row, recommender.item_index(tops[row].items)].numpy(), tops[row].scores,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CTR))
def test_ctr_families_score_raw_rows_like_the_trained_model(name, tmp_path):
    model = _trained(tmp_path, *TINY_CTR, *CTR[name])
    directory = package_model(model, model.data).save(tmp_path / "package")
    _no_pickles(directory)
    frame, prepared = raw_ctr_rows(model.data, "test", 200)
    expected = model.predict(CTRBatcher(model.data.ctr_schema)(prepared)).numpy()
    np.testing.assert_allclose(load(directory).predict(frame), expected, rtol=1e-5, atol=1e-6)
    # int8 rows through TorchRec's quantized modules: every collection (DeepFM's first-order tables too)
    int8 = load(directory, tables="int8")
    quantized = collections(int8.model)
    assert set(quantized) == ({"embeddings", "first_order"} if name.startswith("deepfm") else {"embeddings"})
    float_bytes = sum(sum(c.memory().values()) for c in collections(load(directory).model).values())
    assert sum(sum(c.memory().values()) for c in quantized.values()) < 0.6 * float_bytes
    np.testing.assert_allclose(int8.predict(frame), expected, atol=0.02)


def test_item_biases_rank_users_but_not_similar_items_and_need_exact_serving(tmp_path):
    model = _trained(tmp_path, *TINY_TRAIN, *RANKING["mf_hashing_item_bias"])
    package = package_model(model, model.data)
    recommender = load(package)
    items = np.array([3, 7])
    vectors = model.embed("item", torch.arange(model.data.n_items))
    torch.testing.assert_close(recommender.similar_scores(items), vectors[items] @ vectors.T)  # no bias
    with pytest.raises(ConfigError, match=r"index='HNSW32': an MF package with item biases serves exactly"):
        load(package, index="HNSW32")


def test_quantized_tables_stay_close_to_the_float_model(tmp_path):
    model = _trained(tmp_path, *TINY_TRAIN, *RANKING["mf"])
    package = package_model(model, model.data)
    users = torch.arange(1, 50)
    full = load(package).score_users(users)
    int8, int4 = load(package, tables="int8").score_users(users), load(package, tables="int4").score_users(users)
    scale = full.abs().max()
    assert 0 < (int8 - full).abs().max() < 0.02 * scale < (int4 - full).abs().max() < 0.2 * scale
    sizes = serving_export(package, tmp_path / "serving")
    rows, dim = model.data.n_users + model.data.n_items, 16  # FBGEMM rows: D codes + fp16 scale and bias
    assert sum(model.memory().values()) == rows * dim * 4
    assert sizes["tables_int8"] == rows * (dim + 4) and sizes["tables_int4"] == rows * (dim // 2 + 4)
    assert not (tmp_path / "serving" / "items.safetensors").exists()  # MF serves its tables as stored


def test_a_vq_package_serves_codes_and_codebooks_without_the_query_table(tmp_path):
    model = _trained(tmp_path, *TINY_TRAIN, *RANKING["mf_vq"])
    package = package_model(model, model.data)
    assert not [k for k in package.tensors if "__query" in k or ".usage" in k]
    stored = package.meta["build"]["settings"]["tables"]
    assert {t: (c["source"], c["subspaces"], c["codewords"]) for t, c in stored.items()} == {
        t: ("stored", m.subspaces, m.codewords) for t, m in model.embeddings.methods.items()}
    served = collections(load(package).model)["embeddings"].memory()
    assert served == {t: pq_bytes(m.spec.num_embeddings, 16, m.subspaces, m.codewords)
                      for t, m in model.embeddings.methods.items()}
    assert all(served[t] < trained for t, trained in model.memory().items())


@pytest.mark.parametrize("prepared_clusters", [False, True])
def test_a_graph_hash_package_holds_no_graph_and_loads_without_clustering(prepared_clusters, tmp_path, monkeypatch):
    """Issue 15: the package carried the training graph and loading re-ran Leiden."""
    import recsys.data.graph

    clusters = ["data.graph_clusters=1.0"] if prepared_clusters else []
    model = _trained(tmp_path, *TINY_TRAIN, "model=mf_bpr", "model.dim=16", "embedding=graph_hash", *clusters)
    package = package_model(model, model.data)
    assert not any(k.startswith("stats.graph") for k in package.tensors)
    assert package.tensors["stats.item.clusters"].max() + 1 == model.embeddings.methods["item"].rows

    def no_clustering(*args, **kwargs):
        raise AssertionError("loading a package must not cluster")

    monkeypatch.setattr(recsys.data.graph, "clusters_near", no_clustering)
    users = torch.arange(1, model.data.n_users)
    torch.testing.assert_close(load(package).score_users(users).float(), model.score_users(users).float(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("embedding", ["full", "quotient_remainder", "hashing"])
def test_mf_serves_its_tables_as_stored(embedding, tmp_path):
    """Issue 15: loading MF decoded every user and item vector (and kept the package's tensors beside them)."""
    budget = [] if embedding == "full" else ["embedding.default.budget=0.25"]
    model = _trained(tmp_path, *TINY_TRAIN, *RANKING["mf"], f"embedding={embedding}", *budget)
    package = package_model(model, model.data)
    recommender = load(package)
    recommender.recommend(np.array([1, -1]), 5, [None, np.array([3, 4])])
    memory = recommender.memory()
    tables = sum(model.embeddings.memory().values())
    assert memory["model"] == tables  # the plain tables, id maps and combiners as trained: nothing decoded
    n = model.data.n_users + model.data.n_items
    if embedding != "full":
        assert tables <= 0.25 * n * 16 * 4 + 1024
    context = memory["_history"] + memory.get("_exclude", 0) + memory["popularity"]  # _exclude: no valid split
    assert sum(memory.values()) - tables - context < 64 * 1024  # the vocabularies; no (N, D) matrix anywhere
    assert sum(memory.values()) <= package.bytes() + 64 * 1024


def test_package_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="not a model package"):
        Package.load(tmp_path)
    with pytest.raises(ConfigError, match=r"package family must be one of \['als', 'comirec', .*\], got 'svd'"):
        load(Package("svd", {}, {}))


def test_registered_model_loads_by_alias_in_a_fresh_process(registered_mf, registered_ctr, tmp_path):
    """models:/<name>@champion through mlflow.pyfunc.load_model in a new interpreter scores like the trained model."""
    mf, ctr = registered_mf, registered_ctr
    frame, prepared = raw_ctr_rows(ctr["model"].data, "test", 100)
    frame.to_parquet(tmp_path / "rows.parquet")
    users = mf["model"].data.vocab("user").ids[:20].tolist()
    script = f"""
import json, sys, mlflow, numpy as np, pandas as pd, torch
mlflow.set_tracking_uri({mf['tracking_uri']!r})
model = mlflow.pyfunc.load_model("models:/tiny-mf@champion")
top = model.predict(pd.DataFrame({{"user_id": {users!r}}}), params={{"k": 5}})
inner = model.unwrap_python_model().model
scores = inner.score_users(torch.as_tensor(inner.user_index({users!r}))).numpy()
mlflow.set_tracking_uri({ctr['tracking_uri']!r})
ctr = mlflow.pyfunc.load_model("models:/tiny-dlrm@champion")
probabilities = ctr.predict(pd.read_parquet({str(tmp_path / 'rows.parquet')!r}))["probability"].tolist()
np.save({str(tmp_path / 'scores.npy')!r}, scores)
json.dump({{"items": top["items"].tolist(), "probabilities": probabilities}}, open({str(tmp_path / 'out.json')!r}, "w"))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    trained = mf["model"]
    indices = torch.as_tensor(trained.data.vocab("user").lookup(users))
    expected = trained.score_users(indices).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "scores.npy"), expected, rtol=1e-5, atol=1e-6)
    seen = trained.data.matrix("train")
    for row, index in enumerate(indices.tolist()):
        scores = expected[row].copy()
        scores[0] = -np.inf
        scores[seen[index].indices] = -np.inf
        best = np.argsort(-scores, kind="stable")[:5]
        assert out["items"][row] == trained.data.vocab("item").raw(best).tolist()
    probabilities = ctr["model"].predict(CTRBatcher(ctr["model"].data.ctr_schema)(prepared)).numpy()
    np.testing.assert_allclose(out["probabilities"], probabilities, rtol=1e-5, atol=1e-6)


def test_promotion_gate_moves_the_alias_only_for_a_better_candidate(tmp_path):
    first = train_registered(tmp_path, "gate-mf", "model=mf_bpr", "model.dim=8", *TINY_TRAIN)
    second = train_registered(tmp_path, "gate-mf", "model=mf_bpr", "model.dim=16", "trainer.epochs=2", *TINY_TRAIN)
    client = MlflowClient(first["tracking_uri"])
    assert first["version"] == "1" and second["version"] == "2"
    a, b = first["metrics"]["recall@20"], second["metrics"]["recall@20"]
    # train_registered promoted v2 iff it beat v1 on test recall@20
    assert str(client.get_model_version_by_alias("gate-mf", "champion").version) == ("2" if b >= a else "1")
    margin = abs(a - b) + 1.0
    client.set_registered_model_alias("gate-mf", "champion", "1")
    held = promote("gate-mf", "2", "test_recall@20", min_delta=margin, tracking_uri=first["tracking_uri"])
    assert not held.promoted and str(client.get_model_version_by_alias("gate-mf", "champion").version) == "1"
    assert held.champion == pytest.approx(a) and held.candidate == pytest.approx(b) and "< " in held.reason
    assert client.get_model_version("gate-mf", "2").tags["promotion.promoted"] == "False"
    passed = promote("gate-mf", "2", "test_recall@20", min_delta=-margin, tracking_uri=first["tracking_uri"])
    assert passed.promoted and str(client.get_model_version_by_alias("gate-mf", "champion").version) == "2"
    runs = client.search_runs([client.get_experiment_by_name(PROMOTIONS).experiment_id])
    assert {r.data.tags["promoted"] for r in runs} == {"True", "False"}
    assert any(r.data.metrics.get("champion") == pytest.approx(a) for r in runs)
    with pytest.raises(ConfigError, match="has no metric 'test_nope'"):
        promote("gate-mf", "1", "test_nope", tracking_uri=first["tracking_uri"])
    with pytest.raises(ConfigError, match="no registered model named 'absent'"):
        promote("absent", tracking_uri=first["tracking_uri"])


def test_register_refuses_a_run_without_a_model(tmp_path):
    from pipelines.train import train

    result = train(f"paths.root={tmp_path}", "trainer.epochs=1", "log_model=false", "model=als", "model.factors=4",
                   *TINY_TRAIN)
    with pytest.raises(ConfigError, match="logged no model named 'model'"):
        register(result["run_id"], "nothing", result["tracking_uri"])


def test_register_and_promote_commands(registered_mf):
    """python -m pipelines.register (the newest run) then python -m pipelines.promote, on the fixture's store."""
    root = registered_mf["root"]
    common = [f"paths.root={root}", "name=cli-mf"]
    for module in ("pipelines.register", "pipelines.promote"):
        done = subprocess.run([sys.executable, "-m", module, *common], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(registered_mf["tracking_uri"])
    champion = client.get_model_version_by_alias("cli-mf", "champion")
    assert champion.run_id == registered_mf["run_id"] and champion.tags["promotion.reason"] == "no champion yet"
