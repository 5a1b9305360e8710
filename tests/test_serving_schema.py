"""Schema fuzzing of the serving API (issue 14): Schemathesis draws requests from the app's own OpenAPI schema, valid
ones and invalid ones, for every operation, and runs all its checks on the answers (no 5xx, documented status codes,
content types, headers and bodies, invalid data rejected, valid data accepted, auth enforced).

The apps run in-process (ASGI) with the session's tiny MF and tiny DLRM packages loaded; ``POST /admin/reload`` is
called with the admin token and no rate limit, so it really reloads. Examples are few, derandomized and without a
database, so every run draws the same requests.
"""

from __future__ import annotations

import time
from pathlib import Path

import jsonschema_rs  # Schemathesis' own validator
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig

from serving.app import create_app
from serving.settings import ServingSettings
from tests.test_serving import _package

pytestmark = pytest.mark.integration

TOKEN = "schema-test-admin-token"
LOAD_SECONDS = 120
CONFIG = f"""
[checks]
enabled = true          # all of them

[generation]
mode = "all"            # valid and invalid data
max-examples = 15       # per operation and generation mode, on top of the coverage phase's boundary cases
deterministic = true    # Hypothesis' derandomize (Schemathesis sets deadline=None); no time limit
database = "none"

[auth.openapi.adminToken]
bearer = "{TOKEN}"
"""
# The columns of a CTR model are known only once its package is loaded, so the schema (static) lets /score rows hold any
# column; rows lacking the model's columns get 400 with the missing columns named. Only for /score of the CTR app, 400
# counts as an acceptable answer to schema-valid data (every other check and operation keeps the defaults).
CTR_SCORE = """
[[operations]]
include-path = "/score"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400"]
"""


def _served(package: Path, extra: str = ""):
    """The Schemathesis schema of an app serving ``package``, once the model is loaded."""
    app = create_app(ServingSettings(model_uri=str(package), admin_token=TOKEN, min_reload_interval=0))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=SchemathesisConfig.from_str(CONFIG + extra))
    deadline = time.monotonic() + LOAD_SECONDS  # from_asgi started the app: the model loads in a worker thread
    while app.state.holder.current is None:
        assert app.state.holder.error is None, app.state.holder.error
        assert time.monotonic() < deadline, f"{package} did not load within {LOAD_SECONDS}s"
        time.sleep(0.1)
    return schema


@pytest.fixture(scope="module")
def ranking_api(registered_mf, tmp_path_factory):
    return _served(_package(registered_mf["tracking_uri"], registered_mf["name"], registered_mf["version"],
                            tmp_path_factory.mktemp("mf_package")))


@pytest.fixture(scope="module")
def ctr_api(registered_ctr, tmp_path_factory):
    return _served(_package(registered_ctr["tracking_uri"], registered_ctr["name"], registered_ctr["version"],
                            tmp_path_factory.mktemp("ctr_package")), CTR_SCORE)


@pytest.fixture(autouse=True)
def _node_id(request):
    """Schemathesis 4.32's ``from_fixture`` tests read and write ``Node._nodeid``, which pytest 9.2 no longer has."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@schemathesis.pytest.from_fixture("ranking_api").parametrize()
def test_ranking_api_matches_its_schema(case):
    case.call_and_validate()


@schemathesis.pytest.from_fixture("ctr_api").parametrize()
def test_ctr_api_matches_its_schema(case):
    case.call_and_validate()


def test_the_schema_states_what_the_app_checks(ranking_api):
    """Schemathesis' findings of issue 14, spelled out: the /recommend body needs a user or a history, ids are int64
    exactly, error answers are documented, and /metrics is text."""
    raw = ranking_api.raw_schema
    body = raw["paths"]["/recommend"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    valid = jsonschema_rs.validator_for({**body, "components": raw["components"]}).is_valid
    for accepted in ({"user_id": 2**63 - 1}, {"user_id": -(2**63)}, {"history": []}, {"user_id": None, "history": [7.0]},
                     {"requests": [{"user_id": "u"}]}):
        assert valid(accepted), accepted
    for rejected in ({}, {"k": 5}, {"user_id": None}, {"history": None}, {"user_id": 2**63}, {"history": [-(2**63) - 1]},
                     {"requests": [{}]}):
        assert not valid(rejected), rejected
    declared = {(path, method): set(op["responses"]) for path, ops in raw["paths"].items() for method, op in ops.items()}
    assert {"400", "409", "413", "415", "422", "503"} <= declared["/recommend", "post"]
    assert {"404"} <= declared["/similar", "post"] and {"409"} <= declared["/score", "post"]
    assert {"401", "409", "429", "503"} <= declared["/admin/reload", "post"]
    assert list(raw["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
