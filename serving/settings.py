"""What a serving process loads and the bounds it puts on every request."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveInt, SecretStr, field_validator

ADMIN_TOKEN_ENV = "RECSYS_ADMIN_TOKEN"
MIN_TOKEN_LENGTH = 16


class ServingSettings(BaseModel):
    """Settings of one serving app, checked when built (``conf/serving.yaml`` fills them).

    Example:
        >>> ServingSettings(model_uri="models:/recsys@champion", tables="int8").max_k
        1000
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=(),
                              hide_input_in_errors=True)  # errors never echo the admin token

    model_uri: str = Field(min_length=1)
    """``models:/<name>@<alias>``, ``models:/<name>/<version>`` or the path of a package directory."""
    tracking_uri: str | None = None
    """MLflow tracking (and registry) URI of ``models:/`` URIs; None: MLflow's default."""
    tables: Literal["float", "int8", "int4", "fp16"] = "float"
    """Embedding tables as trained (``float``) or quantized with TorchRec's kernels."""
    index: str = Field("Flat", min_length=1)
    """FAISS ``index_factory`` string of vector models' item index: ``Flat`` (exact), ``HNSW32``, ``IVF256,Flat``."""
    max_k: PositiveInt = 1000
    """Largest ``k`` of /recommend and /similar."""
    max_batch: PositiveInt = 256
    """Most queries of a batch /recommend and rows of a /score request."""
    coalesce_queries: PositiveInt = 64
    """Most /recommend queries one model call answers: queries that arrive while the model is busy are scored
    together (``serving.coalesce``); 1 scores every request on its own."""
    max_history: PositiveInt = 1000
    """Most items of a request's ``history``."""
    max_items: PositiveInt = 10_000
    """Most items of a request's ``allowed_items`` / ``excluded_items``."""
    max_body_bytes: PositiveInt = 1_000_000
    """Largest request body; larger ones get 413."""
    host: str = "127.0.0.1"
    """The address the server listens on (``create_app`` does not bind it: give uvicorn the same one). Beyond loopback
    (not 127.0.0.0/8, ::1 or localhost) admin endpoints are disabled unless ``admin_token`` is set."""
    admin_token: SecretStr | None = None
    """Bearer token of ``/admin/*`` (``Authorization: Bearer <token>``); ``python -m serving`` reads it from the
    environment variable ``RECSYS_ADMIN_TOKEN`` only. None: admin endpoints are open on loopback, disabled beyond."""
    min_reload_interval: NonNegativeFloat = 10.0
    """Seconds between the starts of two ``POST /admin/reload`` loads; an earlier call gets 429 with Retry-After."""
    docs: bool = True
    """Serve ``/docs``, ``/redoc`` and ``/openapi.json``; turn off in production."""

    @field_validator("admin_token")
    @classmethod
    def _long_enough(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and len(token.get_secret_value()) < MIN_TOKEN_LENGTH:
            raise ValueError(f"the admin token ({ADMIN_TOKEN_ENV}) needs at least {MIN_TOKEN_LENGTH} characters "
                             f"(e.g. secrets.token_urlsafe(32))")
        return token
