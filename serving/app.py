"""The HTTP API: ``create_app(settings)`` builds a FastAPI app serving one model (see ``serving/__init__.py``)."""

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Annotated, Union

import anyio
from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from recsys.inference.scorers import CTRScorer
from serving import queries
from serving.admin import ReloadPacer, admin_guard
from serving.coalesce import Coalescer
from serving.errors import LoadFailed, NotReady, ReloadBusy, TooEarly, WrongModel, install_handlers
from serving.limits import BodyLimit
from serving.metrics import CONTENT_TYPE, Metrics, RecordRequests
from serving.model_source import LoadedModel, ModelHolder, load_model
from serving.schemas import ErrorBody, Health, Probabilities, Ready, Recommendation, Recommendations, Reloaded, \
    SimilarItems, Unready, ValidationErrors, request_models
from serving.settings import ServingSettings

log = logging.getLogger("serving")

ERRORS = {
    400: "Invalid JSON, or data the model cannot read (the message names the row and column).",
    401: "No admin bearer token, or a wrong one.",
    403: "Admin endpoints are disabled: the server listens beyond loopback and has no admin token.",
    404: "An item id the model does not know.",
    409: "The endpoint needs the other kind of model (ranking: /recommend, /similar; CTR: /score), or a reload runs.",
    413: "The body is larger than the server's max_body_bytes.",
    415: "The body was not sent as JSON (Content-Type: application/json).",
    422: "The body does not match the schema.",
    429: "Too early: the last reload started less than min_reload_interval seconds ago.",
    500: "A bug; the message has an error reference to the server log's details.",
    503: "No model is being served yet (it is loading, or its load failed).",
}
HEADERS = {401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
           429: {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer", "minimum": 1}}}}
BODY = (400, 413, 415, 422, 500)  # what any route with a JSON body may answer


def create_app(settings: ServingSettings, loader=load_model) -> FastAPI:
    """The serving app of ``settings``. The model loads in a worker thread once the app starts (``/readyz`` answers
    503 until then); ``POST /admin/reload`` loads it again (e.g. the new champion) and swaps it in. Admin calls are
    guarded as ``serving.admin`` says (a bearer token, or loopback only) and paced by ``settings.min_reload_interval``.

    Args:
        settings: the model to serve, the request bounds, the admin token and whether to serve the API docs.
        loader: ``settings -> LoadedModel``; ``load_model`` resolves and loads ``settings.model_uri``.

    Example:
        >>> app = create_app(ServingSettings(model_uri="models:/recsys@champion"))  # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
    """
    holder, metrics, models = ModelHolder(settings, loader), Metrics(), request_models(settings)

    async def load_now() -> tuple[LoadedModel, LoadedModel | None]:
        new, previous = await anyio.to_thread.run_sync(holder.reload)
        metrics.serving(new.name, new.version, new.family, new.memory)
        return new, previous

    async def first_load() -> None:
        try:
            await load_now()
        except (LoadFailed, ReloadBusy):
            pass  # logged by the holder; /readyz reports it and /admin/reload retries

    coalescer = Coalescer(queries.recommend, settings.coalesce_queries)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(first_load())
        yield
        task.cancel()
        await coalescer.close()

    docs = settings.docs  # /docs, /redoc and /openapi.json, or none of them
    app = FastAPI(title="recsys serving", lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)
    app.state.holder, app.state.metrics, app.state.settings = holder, metrics, settings
    install_handlers(app)
    default_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            _exact_integers(default_openapi())  # in place: default_openapi keeps its answer in app.openapi_schema
        return app.openapi_schema

    app.openapi = openapi

    def ranking() -> LoadedModel:
        served = _current(holder)
        if isinstance(served.model, CTRScorer):
            raise WrongModel(f"{served.name} (version {served.version}) is a CTR model (family ctr): use POST /score")
        return served

    @app.post("/recommend", response_model=Union[Recommendation, Recommendations], responses=_errors(*BODY, 409, 503))
    async def recommend(body: Annotated[models.recommend, Body()]):
        """Top-k items for a user (or a batch ``{"requests": [...]}``); unseen users fall back to their history,
        then to popularity. Requests that arrive while the model is busy are scored together."""
        served = ranking()
        batch = isinstance(body, models.batch)
        results = await coalescer.submit(served, body.requests if batch else [body])
        for r in results:
            if r["fallback"]:
                metrics.fallbacks.labels(r["source"]).inc()
        return {"results": results, "model_version": served.version} if batch else results[0]

    @app.post("/similar", response_model=SimilarItems, responses=_errors(*BODY, 404, 409, 503))
    def similar(body: models.similar):
        """The k items most similar to an item; 404 for an item the model does not know."""
        return queries.similar(ranking(), body.item_id, body.k)

    @app.post("/score", response_model=Probabilities, responses=_errors(*BODY, 409, 503))
    def score(body: models.score):
        """Click probabilities of raw feature rows (CTR models)."""
        served = _current(holder)
        if not isinstance(served.model, CTRScorer):
            raise WrongModel(f"{served.name} (version {served.version}) is not a CTR model (family {served.family}): "
                             f"use POST /recommend or /similar")
        return queries.score(served, body.rows)

    @app.get("/healthz", response_model=Health)
    def healthz():
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Ready, responses={503: {"model": Unready, "description": ERRORS[503]}})
    def readyz():
        """200 with the model being served, 503 while none is loaded (loading, or the load failed)."""
        served = holder.current
        if served is None:
            status = "failed" if holder.error else "loading"
            return JSONResponse({"status": status, "detail": holder.error or "the model is loading"},
                                status_code=503)
        return {"status": "ready", "model": served.describe()}

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus():
        """Prometheus metrics (text exposition format)."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    pacer = ReloadPacer(settings.min_reload_interval)

    guard, refusals = admin_guard(settings)

    @app.post("/admin/reload", response_model=Reloaded, dependencies=[guard],
              responses=_errors(*refusals, 409, 413, 429, 500, 503))
    async def reload():
        """Loads ``settings.model_uri`` again (e.g. a new champion) in a worker thread, then swaps it in; requests keep
        being answered by the previous model until the swap. 409 while another reload runs, 429 (with Retry-After)
        sooner than ``min_reload_interval`` seconds after the last reload started."""
        if holder.busy:
            metrics.reloads.labels("busy").inc()
            raise ReloadBusy("a reload is already running; try again when it has finished")
        try:
            pacer.start()
        except TooEarly:
            metrics.reloads.labels("too_early").inc()
            raise
        try:
            new, previous = await load_now()
        except ReloadBusy:
            metrics.reloads.labels("busy").inc()
            raise
        except LoadFailed:
            metrics.reloads.labels("failure").inc()
            raise
        metrics.reloads.labels("success").inc()
        return {"version": new.version, "previous_version": previous.version if previous else None,
                "model": new.describe()}

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RecordRequests, metrics=metrics, endpoints=frozenset(route.path for route in app.routes))
    return app


def _errors(*statuses: int) -> dict:
    """The OpenAPI ``responses`` of these error statuses: their body model, meaning and headers."""
    return {status: {"model": ValidationErrors if status == 422 else ErrorBody, "description": ERRORS[status]}
            | ({"headers": HEADERS[status]} if status in HEADERS else {}) for status in sorted(statuses)}


def _exact_integers(node) -> None:
    """Writes integral bounds of integer schemas back as JSON integers, in place: FastAPI's OpenAPI model turns them
    into floats (``maximum: 1000.0``; 2**63 - 1 would even become 2**63, hence ``schemas.Int64``'s exclusive bound)."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                if isinstance(node.get(key), float) and node[key].is_integer():
                    node[key] = int(node[key])
        for value in node.values():
            _exact_integers(value)
    elif isinstance(node, list):
        for value in node:
            _exact_integers(value)


def _current(holder: ModelHolder) -> LoadedModel:
    served = holder.current  # read once: this request keeps this model even if a reload swaps another in
    if served is None:
        detail = holder.error or "the model is still loading"
        raise NotReady(f"no model is being served yet ({detail}); see GET /readyz")
    return served
