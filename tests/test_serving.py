"""The HTTP serving API against real server processes (``python -m serving``) on loopback ports.

One server serves a tiny MF (registered as ``serving-mf`` from the session's ``registered_mf`` run), another the
tiny DLRM. Answers are compared with brute-force computations on the trained model or the loaded package; the last
test reloads the MF server onto a newly promoted EASE while threads keep querying it. Three more servers, of a model
that fails to load, check what admin calls need and what error answers leave out (issue 14).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient
from starlette.requests import Request

from recsys.inference.scorers import load
from recsys.tracking.registry import promote, register
from serving.errors import _unexpected
from serving.settings import ADMIN_TOKEN_ENV
from tests.conftest import ROOT, TINY_TRAIN, train_registered

pytestmark = pytest.mark.integration

NAME = "serving-mf"  # the MF server's registered model (registered_mf's tiny-mf stays as other tests expect it)
MAX_BODY = 200_000
STARTUP_SECONDS = 120
TOKEN = "test-admin-token-0123456789"  # the MF server's RECSYS_ADMIN_TOKEN
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


class Server:
    """A ``python -m serving`` process on a free loopback port, its output in files under ``directory``; ``token``
    becomes its RECSYS_ADMIN_TOKEN (None: unset)."""

    def __init__(self, directory: Path, *overrides: str, token: str | None = None):
        directory.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.directory, self.stderr_path = directory, directory / "stderr.txt"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        env.pop(ADMIN_TOKEN_ENV, None)
        if token is not None:
            env[ADMIN_TOKEN_ENV] = token
        with open(directory / "stdout.txt", "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen([sys.executable, "-m", "serving", f"port={self.port}",
                                             f"limits.max_body_bytes={MAX_BODY}", *overrides],
                                            cwd=directory, env=env, stdout=out, stderr=err)
        self.session = requests.Session()

    def wait_ready(self, status: str = "ready") -> dict:
        """/readyz's answer once it reports ``status`` (``ready``, or ``failed`` for a model that cannot load)."""
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.stderr()}")
            try:
                answer = requests.get(f"{self.url}/readyz", timeout=2)
                if answer.json().get("status") == status:
                    return answer.json()
                if answer.json().get("status") == "failed":
                    pytest.fail(f"the model failed to load: {answer.json()}\n{self.stderr()}")
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        pytest.fail(f"the server was not {status} within {STARTUP_SECONDS}s:\n{self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def log(self) -> str:
        """The ``serving`` logger's lines (Hydra's log file of the run)."""
        return "".join(p.read_text(errors="replace") for p in sorted(self.directory.glob("outputs/serving/*/*/serving.log")))

    def post(self, path: str, body=None, **kwargs) -> requests.Response:
        if body is not None:
            kwargs["json"] = body
        return self.session.post(f"{self.url}{path}", timeout=30, **kwargs)

    def get(self, path: str) -> requests.Response:
        return self.session.get(f"{self.url}{path}", timeout=30)

    def stop(self) -> None:
        self.session.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _package(tracking_uri: str, name: str, version: str, dst: Path) -> Path:
    """The package directory of a registered version, downloaded into ``dst``."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    source = client.get_model_version_download_uri(name, version)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst),
                                                    tracking_uri=tracking_uri)) / "artifacts" / "package"


@pytest.fixture(scope="module")
def mf(registered_mf, tmp_path_factory):
    """registered_mf's run registered again as ``serving-mf`` v1 (champion), and its package loaded here."""
    uri = registered_mf["tracking_uri"]
    version = register(registered_mf["run_id"], NAME, uri)
    assert promote(NAME, version, metric="test_recall@20", tracking_uri=uri).promoted
    reference = load(_package(uri, NAME, version, tmp_path_factory.mktemp("mf_package")))
    return {**registered_mf, "name": NAME, "version": version, "reference": reference}


def _running(directory, name: str, tracking_uri: str, *overrides: str, token: str | None = None):
    """A ready server of ``models:/<name>@champion``, stopped when the fixture ends."""
    server = Server(directory, f"model.uri=models:/{name}@champion", f"tracking.uri={tracking_uri}", *overrides,
                    token=token)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mf_server(mf, tmp_path_factory):
    """The MF server; admin calls need ``TOKEN`` and are not paced (the reload test sends two at once)."""
    yield from _running(tmp_path_factory.mktemp("mf_server"), NAME, mf["tracking_uri"], "admin.min_reload_interval=0",
                        token=TOKEN)


@pytest.fixture(scope="module")
def ctr(registered_ctr, tmp_path_factory):
    package = _package(registered_ctr["tracking_uri"], registered_ctr["name"], registered_ctr["version"],
                       tmp_path_factory.mktemp("ctr_package"))
    return {**registered_ctr, "reference": load(package)}


@pytest.fixture(scope="module")
def ctr_server(ctr, tmp_path_factory):
    yield from _running(tmp_path_factory.mktemp("ctr_server"), ctr["name"], ctr["tracking_uri"])


def _top(scores: torch.Tensor, skip, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k item indices and scores of (N,) ``scores``, OOV and ``skip`` left out."""
    scores = scores.double().clone()
    scores[0] = -torch.inf
    scores[torch.as_tensor(np.asarray(skip, dtype=np.int64))] = -torch.inf
    values, items = scores.topk(k)
    return items.numpy(), values.numpy()


def _assert_top(answer: dict, scores: torch.Tensor, skip, k: int, reference) -> None:
    """``answer`` holds a correct top-k of ``scores``: the expected scores, and each item's own score (ties in any
    order)."""
    _, values = _top(scores, skip, k)
    assert len(answer["items"]) == len(answer["scores"]) == k
    np.testing.assert_allclose(answer["scores"], values, rtol=1e-4, atol=1e-5)
    own = scores.double()[torch.as_tensor(reference.item_index(answer["items"]))].numpy()
    np.testing.assert_allclose(answer["scores"], own, rtol=1e-4, atol=1e-5)
    assert not set(reference.item_index(answer["items"]).tolist()) & set(np.asarray(skip).tolist())


# ---------------------------------------------------------------------------------------------------- health


def test_healthz_and_readyz_report_the_served_version(mf_server, mf):
    assert mf_server.get("/healthz").json() == {"status": "ok"}
    assert {"/recommend", "/similar", "/score", "/admin/reload"} <= set(mf_server.get("/openapi.json").json()["paths"])
    ready = mf_server.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["model"] | {"load_seconds": 0} == {"name": NAME, "version": mf["version"], "family": "mf",
                                                            "uri": f"models:/{NAME}@champion", "load_seconds": 0}


# ---------------------------------------------------------------------------------------------------- /recommend


def test_known_user_gets_the_brute_force_top_k_of_the_trained_model(mf_server, mf):
    reference, task = mf["reference"], mf["model"]
    for raw in reference.users.ids[[0, 7, 150]].tolist():
        user = int(reference.user_index([raw])[0])
        scores = task.score_users(torch.tensor([user]))[0]
        answer = mf_server.post("/recommend", {"user_id": raw, "k": 10}).json()
        assert answer["source"] == "model" and answer["fallback"] is False and answer["user_id"] == raw
        assert answer["model_version"] == mf["version"]
        _assert_top(answer, scores, reference.excluded(user), 10, reference)
        # digit strings match integer ids; exclude_seen=false ranks the user's items too
        assert mf_server.post("/recommend", {"user_id": str(raw), "k": 10}).json()["items"] == answer["items"]
        everything = mf_server.post("/recommend", {"user_id": raw, "k": 10, "exclude_seen": False}).json()
        _assert_top(everything, scores, [], 10, reference)


def test_candidate_filters_restrict_the_answer(mf_server, mf):
    reference, task = mf["reference"], mf["model"]
    raw = reference.users.ids[3].item()
    user = int(reference.user_index([raw])[0])
    scores = task.score_users(torch.tensor([user]))[0]
    best = mf_server.post("/recommend", {"user_id": raw, "k": 5}).json()["items"]
    without = mf_server.post("/recommend", {"user_id": raw, "k": 5, "excluded_items": best[:2]}).json()
    assert without["items"][:3] == best[2:] and not set(without["items"]) & set(best[:2])
    allowed = reference.items.ids[20:40].tolist() + ["no-such-item", 10**18]
    answer = mf_server.post("/recommend", {"user_id": raw, "k": 4, "allowed_items": allowed}).json()
    outside = np.setdiff1d(np.arange(reference.n_items), reference.item_index(allowed[:20]))
    _assert_top(answer, scores, np.union1d(outside, reference.excluded(user)), 4, reference)


def test_unknown_user_with_history_is_scored_from_the_items_vectors(mf_server, mf):
    reference, task = mf["reference"], mf["model"]
    history = reference.items.ids[[5, 9, 30]].tolist()
    answer = mf_server.post("/recommend", {"user_id": "new-user", "history": [*history, "unknown-item"], "k": 8}).json()
    assert answer["source"] == "history" and answer["fallback"] is True
    indices = reference.item_index(history)
    with torch.no_grad():
        items = task.embed("item", torch.arange(reference.n_items))
    _assert_top(answer, items @ items[torch.as_tensor(indices)].mean(0), indices, 8, reference)


def test_unknown_user_without_usable_history_gets_popular_items(mf_server, mf):
    reference = mf["reference"]
    expected = reference.items.raw(np.argsort(-reference.popularity[1:], kind="stable")[:6] + 1).tolist()
    for body in ({"user_id": 10**15, "k": 6}, {"history": ["unknown"], "k": 6}, {"history": [], "k": 6}):
        answer = mf_server.post("/recommend", body).json()
        assert answer["source"] == "popularity" and answer["fallback"] is True
        assert sorted(reference.popularity[reference.item_index(answer["items"])]) == \
            sorted(reference.popularity[reference.item_index(expected)])


def test_batch_answers_each_query_as_alone(mf_server, mf):
    ids = mf["reference"].users.ids
    queries = [{"user_id": ids[1].item(), "k": 3}, {"user_id": "x", "history": mf["reference"].items.ids[:2].tolist()},
               {"user_id": ids[2].item(), "k": 5, "excluded_items": [mf["reference"].items.ids[0].item()]},
               {"user_id": "y"}]
    batch = mf_server.post("/recommend", {"requests": queries}).json()
    assert batch["model_version"] == mf["version"]
    assert batch["results"] == [mf_server.post("/recommend", q).json() for q in queries]
    assert [r["source"] for r in batch["results"]] == ["model", "history", "model", "popularity"]


def test_concurrent_requests_get_the_answers_they_get_alone(mf_server, mf):
    """Requests arriving together may be scored by one model call (``serving.coalesce``); each still gets its own
    answer, whatever its k, filters or fallback."""
    ids, items = mf["reference"].users.ids, mf["reference"].items.ids
    queries = [{"user_id": ids[1 + i % 7].item(), "k": 3 + i % 4} for i in range(24)]
    queries += [{"user_id": "x", "history": items[:2].tolist()}, {"user_id": "y"},
                {"user_id": ids[2].item(), "excluded_items": [items[0].item()]}]
    alone = [mf_server.post("/recommend", q).json() for q in queries]

    def ask(query):
        with requests.post(f"{mf_server.url}/recommend", json=query, timeout=30) as answer:
            return answer.json()

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, queries))
    _assert_same_answers(together, alone)


def _assert_same_answers(got: list[dict], expected: list[dict]) -> None:
    """The same answers, scores within float32 rounding: a query scored alone or beside others (one matrix product
    for several queries) may round differently."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-6, atol=1e-7)
        assert {**a, "scores": None} == {**b, "scores": None}


# ---------------------------------------------------------------------------------------------------- /similar


def test_similar_items_are_the_nearest_item_vectors(mf_server, mf):
    reference, task = mf["reference"], mf["model"]
    raw = reference.items.ids[4].item()
    answer = mf_server.post("/similar", {"item_id": raw, "k": 7}).json()
    assert answer["item_id"] == raw and answer["model_version"] == mf["version"]
    with torch.no_grad():
        items = task.embed("item", torch.arange(reference.n_items))
    index = int(reference.item_index([raw])[0])
    _assert_top(answer, items @ items[index], [index], 7, reference)
    missing = mf_server.post("/similar", {"item_id": "no-such-item", "k": 3})
    assert missing.status_code == 404 and "not in the model's vocabulary" in missing.json()["detail"]


# ---------------------------------------------------------------------------------------------------- /score


def _ctr_rows(scorer, n: int, seed: int = 0) -> list[dict]:
    """Rows of known ids (and, in the last row, ids the model has never seen) with random dense values."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(n):
        row = {name: float(rng.normal()) for name in scorer.schema.dense}
        row |= {name: scorer.vocabs[name].ids[rng.integers(len(scorer.vocabs[name].ids))].item()
                for name in scorer.schema.sparse}
        row |= {name: scorer.vocabs[name].ids[rng.integers(len(scorer.vocabs[name].ids), size=r % 3)].tolist()
                for name in scorer.schema.multi_valued}
        rows.append(row)
    rows[-1] |= {name: 12345 for name in scorer.schema.sparse} | {scorer.schema.dense[0]: None}
    return rows


def test_score_matches_the_package_loaded_in_process(ctr_server, ctr):
    scorer = ctr["reference"]
    rows = _ctr_rows(scorer, 20)
    answer = ctr_server.post("/score", {"rows": rows})
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == ctr["version"]
    np.testing.assert_allclose(answer.json()["probabilities"], scorer.predict(pd.DataFrame(rows)), rtol=1e-5, atol=1e-6)
    one = ctr_server.post("/score", {"rows": rows[:1]}).json()["probabilities"]
    assert one == pytest.approx(answer.json()["probabilities"][:1], rel=1e-5)


def test_score_rejects_rows_the_model_cannot_read(ctr_server, ctr):
    row = _ctr_rows(ctr["reference"], 1)[0]
    dense, sparse, multi = (ctr["reference"].schema.dense[0], ctr["reference"].schema.sparse[0],
                            ctr["reference"].schema.multi_valued[0])
    cases = {"lacks columns": {k: v for k, v in row.items() if k != sparse},
             "is dense": row | {dense: "high"}, "one id per row": row | {sparse: [1, 2]},
             "is multi-valued": row | {multi: 7}}
    for message, bad in cases.items():
        answer = ctr_server.post("/score", {"rows": [row, bad]})
        assert answer.status_code == 400 and message in answer.json()["detail"], (message, answer.text)
    nan = json.dumps({"rows": [row | {dense: float("nan")}]})  # NaN: Python's JSON extension, not standard JSON
    assert ctr_server.post("/score", data=nan, headers={"content-type": "application/json"}).status_code == 422


def test_each_endpoint_refuses_the_other_kind_of_model(mf_server, ctr_server):
    answer = mf_server.post("/score", {"rows": [{"a": 1}]})
    assert answer.status_code == 409 and "not a CTR model" in answer.json()["detail"]
    for path, body in (("/recommend", {"user_id": 1}), ("/similar", {"item_id": 1})):
        answer = ctr_server.post(path, body)
        assert answer.status_code == 409 and "is a CTR model" in answer.json()["detail"]


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("path, body, status, message", [
    ("/recommend", b"{not json", 400, "invalid JSON"),
    ("/recommend", b"[" * 50_000 + b"]" * 50_000, 400, ""),  # deeper than the JSON parser recurses
    ("/recommend", None, 422, "Field required"),
    ("/recommend", {"user_id": 1, "k": 0}, 422, "greater than or equal to 1"),
    ("/recommend", {"user_id": 1, "k": 1001}, 422, "less than or equal to 1000"),
    ("/recommend", {"user_id": 1, "k": "ten"}, 422, "valid integer"),
    ("/recommend", {"user_id": [1]}, 422, "user_id"),
    ("/recommend", {"user_id": 10**30}, 422, "user_id"),
    ("/recommend", {"user_id": 1, "history": "abc"}, 422, "valid list"),
    ("/recommend", {"user_id": 1, "history": list(range(1001))}, 422, "at most 1000"),
    ("/recommend", {"user_id": 1, "exclude_seen": "yes"}, 422, "valid boolean"),
    ("/recommend", {"user_id": 1, "colour": "red"}, 422, "Extra inputs"),
    ("/recommend", {"k": 5}, 422, "needs a 'user_id', a 'history'"),
    ("/recommend", {"requests": []}, 422, "at least 1"),
    ("/recommend", {"requests": [{"user_id": 1}] * 257}, 422, "at most 256"),
    ("/recommend", [1, 2], 422, "valid dictionary"),
    ("/similar", {"item_id": None}, 422, "item_id"),
    ("/similar", {"item_id": 1, "k": -3}, 422, "greater than or equal to 1"),
    ("/score", {"rows": []}, 422, "at least 1"),
    ("/score", {"rows": [{"a": {"b": 1}}]}, 422, "rows"),
])
def test_malformed_requests_get_a_4xx_with_a_message(mf_server, path, body, status, message):
    answer = mf_server.post(path, data=body, headers={"content-type": "application/json"}) \
        if isinstance(body, bytes) else mf_server.post(path, body)
    assert answer.status_code == status, answer.text
    assert message in json.dumps(answer.json()["detail"])


def test_body_size_limit_and_content_type(mf_server):
    big = {"user_id": 1, "history": ["x" * 200] * 1000}
    assert mf_server.post("/recommend", big).status_code == 413  # Content-Length over the limit
    chunks = (b'{"user_id": 1, "history": [' + b'"xxxxxxxxxx",' * 2000 for _ in range(10))
    answer = mf_server.post("/recommend", data=chunks, headers={"content-type": "application/json"})  # chunked
    assert answer.status_code == 413 and "too large" in answer.json()["detail"]
    answer = mf_server.post("/recommend", data=b'{"user_id": 1}', headers={"content-type": "text/plain"})
    assert answer.status_code == 415 and "application/json" in answer.json()["detail"]
    assert mf_server.get("/healthz").status_code == 200


ODD_IDS = st.sampled_from(["0", "-1", "²", "--5", "007", " 7", "", "\x00", "9" * 30, "1e3"])
SCALARS = st.none() | st.booleans() | st.floats() | st.integers(-(2**70), 2**70) | st.text(max_size=8) | ODD_IDS
JSON = st.recursive(SCALARS, lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.text(max_size=8) | st.sampled_from(["user_id", "k", "rows"]), children,
                                      max_size=4), max_leaves=20)


def _bodies(mf: dict, ctr: dict) -> dict:
    """Body strategies per (server, path): mostly well-formed bodies with odd values (so the model code runs on
    them), plus arbitrary JSON anywhere."""
    reference, scorer = mf["reference"], ctr["reference"]
    ids = st.sampled_from(reference.users.ids[:50].tolist() + reference.items.ids[:50].tolist()) \
        | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8) | ODD_IDS
    id_lists = st.lists(ids, max_size=6)
    options = {"history": id_lists | JSON, "k": st.integers(1, 1000) | JSON, "exclude_seen": st.booleans(),
               "allowed_items": id_lists, "excluded_items": id_lists | JSON}
    query = st.fixed_dictionaries({"user_id": ids}, optional=options) \
        | st.fixed_dictionaries({"history": id_lists}, optional={k: v for k, v in options.items() if k != "history"}) \
        | st.fixed_dictionaries({}, optional=options | {"user_id": JSON})
    similar = st.fixed_dictionaries({"item_id": ids}, optional={"k": st.integers(1, 1000) | st.integers(-2, 1002) | JSON})
    known = {name: st.sampled_from(scorer.vocabs[name].ids[:20].tolist()) | ids for name in scorer.vocabs}
    cells = {name: st.floats(-1e6, 1e6) | st.integers(-(2**63), 2**63 - 1) | st.none() for name in scorer.schema.dense}
    cells |= {name: known[name] for name in scorer.schema.sparse}
    cells |= {name: st.lists(known[name], max_size=4) for name in scorer.schema.multi_valued}
    messy = {name: cell | st.floats() | JSON for name, cell in cells.items()}
    rows = st.fixed_dictionaries(cells) | st.fixed_dictionaries(messy) \
        | st.dictionaries(st.sampled_from(scorer.columns) | st.text(max_size=4), JSON)
    return {"/recommend": query | st.fixed_dictionaries({"requests": st.lists(query, min_size=1, max_size=3)}) | JSON,
            "/similar": similar | JSON, "/score": st.fixed_dictionaries({"rows": st.lists(rows, min_size=1, max_size=3)}),
            "/score (ranking model)": st.fixed_dictionaries({"rows": st.lists(JSON, max_size=3)}) | JSON}


def test_random_bodies_never_get_a_server_error(mf_server, ctr_server, mf, ctr):
    bodies = _bodies(mf, ctr)
    targets = [(mf_server, "/recommend"), (mf_server, "/similar"), (mf_server, "/score (ranking model)"),
               (ctr_server, "/score"), (ctr_server, "/recommend")]

    @settings(max_examples=150, deadline=None, database=None, derandomize=True,  # the same 150 bodies on every run
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data):
        server, target = data.draw(st.sampled_from(targets))
        path = target.split()[0]
        if data.draw(st.integers(0, 4)):
            payload = json.dumps(data.draw(bodies[target])).encode()  # NaN and Infinity too, as Python writes them
        else:
            payload = data.draw(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
        answer = server.post(path, data=payload, headers={"content-type": "application/json"})
        assert answer.status_code < 500, (path, payload[:300], answer.text)
        assert answer.status_code < 400 or "detail" in answer.json()

    check()
    assert mf_server.get("/healthz").status_code == 200 and ctr_server.get("/healthz").status_code == 200


# ---------------------------------------------------------------------------------------------------- /metrics


def _metric(text: str, sample: str, /, **labels) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    for line in text.splitlines():
        match = re.fullmatch(rf"{sample}\{{(.*)\}} (\S+)", line)
        if match and dict(re.findall(r'(\w+)="([^"]*)"', match[1])) == labels:
            return float(match[2])
    return 0.0


def test_metrics_count_requests_fallbacks_and_the_model(mf_server, mf):
    before = mf_server.get("/metrics").text
    mf_server.post("/recommend", {"user_id": "nobody", "k": 2})
    mf_server.post("/recommend", {"user_id": "nobody", "history": [mf["reference"].items.ids[1].item()], "k": 2})
    mf_server.post("/recommend", {"user_id": 1, "k": 0})
    answer = mf_server.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    text = answer.text
    for status in ("200", "422"):
        labels = {"endpoint": "/recommend", "status": status}
        assert _metric(text, "recsys_serving_requests_total", **labels) == \
            _metric(before, "recsys_serving_requests_total", **labels) + (2 if status == "200" else 1)
    assert _metric(text, "recsys_serving_fallbacks_total", source="popularity") >= 1
    assert _metric(text, "recsys_serving_fallbacks_total", source="history") >= 1
    assert _metric(text, "recsys_serving_request_seconds_count", endpoint="/recommend") >= 2
    assert _metric(text, "recsys_serving_model_info", name=NAME, version=mf["version"], family="mf") == 1
    tables = sum(mf["model"].embeddings.memory().values())  # the served model's tables are the trained ones, as stored
    assert _metric(text, "recsys_serving_model_bytes", part="model") == tables
    assert _metric(text, "recsys_serving_model_bytes", part="_history") > 0
    mf_server.get("/no/such/path")
    assert _metric(mf_server.get("/metrics").text, "recsys_serving_requests_total", endpoint="other", status="404") >= 1


# ---------------------------------------------------------------------------------------------------- admin


@pytest.fixture(scope="module")
def broken(mf, tmp_path_factory):
    """Servers of a model that is not registered (its load fails at once), started together: ``open`` (loopback, no
    token, reloads not paced), ``paced`` (loopback, no token, one reload per hour) and ``public`` (listening on
    0.0.0.0 without a token, docs off). Their tracking store is the MF's, so its path is there to leak."""
    root = tmp_path_factory.mktemp("broken")
    common = ("model.uri=models:/no-such-model@champion", f"tracking.uri={mf['tracking_uri']}")
    servers = {"open": Server(root / "open", *common, "admin.min_reload_interval=0"),
               "paced": Server(root / "paced", *common, "admin.min_reload_interval=3600"),
               "public": Server(root / "public", *common, "host=0.0.0.0", "docs=false")}
    try:
        for server in servers.values():
            server.wait_ready("failed")
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def test_admin_reload_needs_the_bearer_token(mf_server):
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"}):
        answer = mf_server.post("/admin/reload", headers=headers)
        assert answer.status_code == 401, (headers, answer.text)
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        assert "token" in answer.json()["detail"]
    answer = mf_server.post("/admin/reload", headers=ADMIN)
    assert answer.status_code == 200, answer.text
    assert answer.json()["version"] == mf_server.get("/readyz").json()["model"]["version"]


def test_admin_is_open_on_loopback_without_a_token(broken):
    answer = broken["open"].post("/admin/reload")
    assert answer.status_code == 503 and "loading the model failed" in answer.json()["detail"]  # reached the load
    assert "admin endpoints are open to every local caller" in broken["open"].log()


def test_admin_is_disabled_beyond_loopback_without_a_token(broken):
    public = broken["public"]
    for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
        answer = public.post("/admin/reload", headers=headers)
        assert answer.status_code == 403 and "admin endpoints are disabled" in answer.json()["detail"], answer.text
    assert re.search(r"admin endpoints .* are DISABLED: the server listens on 0\.0\.0\.0.*RECSYS_ADMIN_TOKEN is not set",
                     public.log())


def test_reloads_are_rate_limited(broken):
    paced = broken["paced"]
    first, second = paced.post("/admin/reload"), paced.post("/admin/reload")
    assert first.status_code == 503, first.text  # the load started (and failed)
    assert second.status_code == 429 and "retry in" in second.json()["detail"], second.text
    assert 1 <= int(second.headers["Retry-After"]) <= 3600


def test_a_failed_load_names_no_internals_to_clients(broken, mf):
    server = broken["open"]
    answers = [server.post("/admin/reload"), server.get("/readyz"), server.post("/recommend", {"user_id": 1})]
    assert [a.status_code for a in answers] == [503, 503, 503], [a.text for a in answers]
    store = str(Path(mf["tracking_uri"].removeprefix("sqlite:///")).parent)
    for answer in answers:
        text = answer.text
        assert not re.search(r"[A-Z]\w*(Error|Exception)\b", text), text
        assert store not in text and "mlflow.db" not in text and "sqlite" not in text, text
    references = set(re.findall(r"error reference ([0-9a-f]{8})", " ".join(a.text for a in answers)))
    assert references, [a.text for a in answers]
    log = server.log()
    for reference in references:  # each reference's log line has the details
        line = next(line for line in log.splitlines() if f"[error {reference}]" in line)
        assert "ConfigError" in line and store in line, line


def test_an_unexpected_error_names_no_internals_to_clients(caplog):
    request = Request({"type": "http", "method": "POST", "path": "/recommend", "headers": [], "query_string": b""})
    with caplog.at_level(logging.ERROR, logger="serving"):
        answer = asyncio.run(_unexpected(request, KeyError("/srv/models/secret.db")))
    detail = json.loads(answer.body)["detail"]
    assert answer.status_code == 500 and "KeyError" not in detail and "secret" not in detail, detail
    reference = re.fullmatch(r"internal error \(error reference ([0-9a-f]{8}); the server log has the details\)", detail)[1]
    logged = next(r for r in caplog.records if f"[error {reference}]" in r.getMessage())
    assert "KeyError" in logged.getMessage() and "secret.db" in logged.getMessage() and logged.exc_info


def test_docs_can_be_turned_off(broken, mf_server):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert broken["public"].get(path).status_code == 404
        assert mf_server.get(path).status_code == 200


# ---------------------------------------------------------------------------------------------------- reload


def test_reload_swaps_in_the_new_champion_without_failing_a_request(mf_server, mf):
    """Threads query the server while it reloads onto a newly promoted EASE: every answer is 200 and is exactly
    the old model's or the new model's answer, each thread sees the versions in order, and the new one stays."""
    uri, raw_user = mf["tracking_uri"], mf["reference"].users.ids[0].item()
    history = mf["reference"].items.ids[:2].tolist()
    query = {"requests": [{"user_id": raw_user, "k": 10}, {"user_id": "new", "history": history}]}
    old = mf_server.post("/recommend", query).json()
    # its own experiment: "the newest run of experiment recsys" of this store stays registered_mf's (test_registry)
    new_version = train_registered(mf["root"], NAME, "model=ease", "tracking.experiment=serving-reload", *TINY_TRAIN)["version"]
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(NAME, "champion", new_version)

    stop, seen, failures = threading.Event(), [], []

    def hammer():
        session, versions = requests.Session(), []
        while not stop.is_set():
            try:
                answer = session.post(f"{mf_server.url}/recommend", json=query, timeout=30)
                if answer.status_code != 200:
                    failures.append(answer.text)
                    continue
                versions.append((answer.json()["model_version"], answer.json()["results"]))
            except requests.RequestException as error:
                failures.append(repr(error))
        seen.append(versions)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    reloads = []
    clients = [threading.Thread(target=lambda: reloads.append(mf_server.post("/admin/reload", headers=ADMIN)))
               for _ in range(2)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()

    assert not failures, failures[:3]
    assert sorted(r.status_code for r in reloads) in ([200, 200], [200, 409]), [r.text for r in reloads]
    done = next(r.json() for r in reloads if r.status_code == 200)
    assert done["version"] == new_version and done["previous_version"] == mf["version"]
    assert done["model"]["family"] == "ease"
    new = mf_server.post("/recommend", query).json()
    assert new["model_version"] == new_version and new["results"] != old["results"]
    for versions in seen:
        assert versions and versions[-1][0] == new_version
        names = [v for v, _ in versions]
        assert names == sorted(names, key=lambda v: v == new_version)  # old ones, then new ones
        for version, results in versions:
            _assert_same_answers(results, (new if version == new_version else old)["results"])
    assert mf_server.get("/readyz").json()["model"]["version"] == new_version
    text = mf_server.get("/metrics").text
    assert _metric(text, "recsys_serving_model_info", name=NAME, version=new_version, family="ease") == 1
    assert _metric(text, "recsys_serving_model_info", name=NAME, version=mf["version"], family="mf") == 0
    assert _metric(text, "recsys_serving_reloads_total", outcome="success") >= 1
