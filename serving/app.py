"""The HTTP API: ``create_app(settings)`` builds a FastAPI app serving one model (see ``serving/__init__.py``)."""

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Annotated, Union

import anyio
from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse, Response

from recsys.inference.scorers import CTRScorer
from serving import queries
from serving.admin import ReloadPacer, admin_guard
from serving.errors import LoadFailed, NotReady, ReloadBusy, TooEarly, WrongModel, install_handlers
from serving.limits import BodyLimit
from serving.metrics import CONTENT_TYPE, Metrics, RecordRequests
from serving.model_source import LoadedModel, ModelHolder, load_model
from serving.schemas import Probabilities, Recommendation, Recommendations, SimilarItems, request_models
from serving.settings import ServingSettings

log = logging.getLogger("serving")


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
        metrics.serving(new.name, new.version, new.family)
        return new, previous

    async def first_load() -> None:
        try:
            await load_now()
        except (LoadFailed, ReloadBusy):
            pass  # logged by the holder; /readyz reports it and /admin/reload retries

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(first_load())
        yield
        task.cancel()

    docs = settings.docs  # /docs, /redoc and /openapi.json, or none of them
    app = FastAPI(title="recsys serving", lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)
    app.state.holder, app.state.metrics, app.state.settings = holder, metrics, settings
    install_handlers(app)

    def ranking() -> LoadedModel:
        served = _current(holder)
        if isinstance(served.model, CTRScorer):
            raise WrongModel(f"{served.name} (version {served.version}) is a CTR model (family ctr): use POST /score")
        return served

    @app.post("/recommend", response_model=Union[Recommendation, Recommendations])
    def recommend(body: Annotated[models.recommend, Body()]):
        """Top-k items for a user (or a batch ``{"requests": [...]}``); unseen users fall back to their history,
        then to popularity."""
        served = ranking()
        batch = isinstance(body, models.batch)
        results = queries.recommend(served, body.requests if batch else [body])
        for r in results:
            if r["fallback"]:
                metrics.fallbacks.labels(r["source"]).inc()
        return {"results": results, "model_version": served.version} if batch else results[0]

    @app.post("/similar", response_model=SimilarItems)
    def similar(body: models.similar):
        """The k items most similar to an item; 404 for an item the model does not know."""
        return queries.similar(ranking(), body.item_id, body.k)

    @app.post("/score", response_model=Probabilities)
    def score(body: models.score):
        """Click probabilities of raw feature rows (CTR models)."""
        served = _current(holder)
        if not isinstance(served.model, CTRScorer):
            raise WrongModel(f"{served.name} (version {served.version}) is not a CTR model (family {served.family}): "
                             f"use POST /recommend or /similar")
        return queries.score(served, body.rows)

    @app.get("/healthz")
    def healthz():
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        """200 with the model being served, 503 while none is loaded (loading, or the load failed)."""
        served = holder.current
        if served is None:
            status = "failed" if holder.error else "loading"
            return JSONResponse({"status": status, "detail": holder.error or f"loading {settings.model_uri}"},
                                status_code=503)
        return {"status": "ready", "model": served.describe()}

    @app.get("/metrics")
    def prometheus():
        """Prometheus metrics (text exposition format)."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    pacer = ReloadPacer(settings.min_reload_interval)

    @app.post("/admin/reload", dependencies=[admin_guard(settings)])
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


def _current(holder: ModelHolder) -> LoadedModel:
    served = holder.current  # read once: this request keeps this model even if a reload swaps another in
    if served is None:
        detail = holder.error or "the model is still loading"
        raise NotReady(f"no model is being served yet ({detail}); see GET /readyz")
    return served
