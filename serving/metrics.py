"""Prometheus metrics of one app, in its own registry (several apps in one process do not collide), and the ASGI
middleware that counts and times every request."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The serving metrics (names prefixed ``recsys_serving_``).

    Example:
        >>> metrics = Metrics()
        >>> metrics.requests.labels("/recommend", "200").inc()
        >>> b'recsys_serving_requests_total{endpoint="/recommend",status="200"} 1.0' in metrics.render()
        True
    """

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("recsys_serving_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("recsys_serving_request_seconds", "Request latency by endpoint", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.fallbacks = Counter("recsys_serving_fallbacks", "Recommendations not scored by the model, by source "
                                 "(history: an unseen user's items; popularity)", ["source"], registry=r)
        self.model = Gauge("recsys_serving_model_info", "1 for the model being served", ["name", "version", "family"],
                           registry=r)
        self.model_bytes = Gauge("recsys_serving_model_bytes", "Bytes the served model holds, by part (tables as stored, "
                                 "id maps, histories, a built index), measured from its tensors", ["part"], registry=r)
        self.reloads = Counter("recsys_serving_reloads",
                               "POST /admin/reload calls by outcome (success, failure, busy, too_early)", ["outcome"],
                               registry=r)

    def serving(self, name: str, version: str, family: str, memory: dict[str, int] | None = None) -> None:
        """Marks the model being served and the bytes it holds by part (the previous one's series are removed)."""
        self.model.clear()
        self.model.labels(name, version, family).set(1)
        self.model_bytes.clear()
        for part, size in (memory or {}).items():
            self.model_bytes.labels(part).set(size)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class RecordRequests:
    """ASGI middleware: counts requests by endpoint and status and times them. Paths that are not a route of the app
    count as ``other`` (so random paths cannot blow up the number of series).

    Args:
        app: the wrapped ASGI app.
        metrics: where to record.
        endpoints: the app's route paths.
    """

    def __init__(self, app, metrics: Metrics, endpoints: frozenset[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        status = "500"  # unless a response starts

        async def record_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        began = time.perf_counter()
        try:
            await self.app(scope, receive, record_status)
        finally:
            self.metrics.requests.labels(endpoint, status).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - began)
