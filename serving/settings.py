"""What a serving process loads and the bounds it puts on every request."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt


class ServingSettings(BaseModel):
    """Settings of one serving app, checked when built (``conf/serving.yaml`` fills them).

    Example:
        >>> ServingSettings(model_uri="models:/recsys@champion", tables="int8").max_k
        1000
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

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
    max_history: PositiveInt = 1000
    """Most items of a request's ``history``."""
    max_items: PositiveInt = 10_000
    """Most items of a request's ``allowed_items`` / ``excluded_items``."""
    max_body_bytes: PositiveInt = 1_000_000
    """Largest request body; larger ones get 413."""
