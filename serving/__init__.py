"""Online serving: an HTTP API (FastAPI + uvicorn) over one packaged model, ``python -m serving``.

Endpoints: ``POST /recommend`` (top-k for a user, from recent items, or popularity; batches), ``POST /similar``,
``POST /score`` (CTR models), ``GET /healthz``, ``GET /readyz``, ``GET /metrics`` (Prometheus) and
``POST /admin/reload`` (load the current champion and swap it in without failing a request).

Modules: ``app`` (routes), ``schemas`` (request/response bodies), ``queries`` (raw ids -> model calls),
``model_source`` (resolving, loading and swapping the model), ``metrics``, ``limits`` (body size), ``errors``.
"""

from serving.app import create_app
from serving.settings import ServingSettings

__all__ = ["create_app", "ServingSettings"]
