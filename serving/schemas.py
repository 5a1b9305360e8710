"""Request and response bodies. Request bounds come from the settings, so ``request_models`` builds them per app."""

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, StrictBool, \
    StrictFloat, StrictInt, StrictStr, Tag, WithJsonSchema, model_validator

from serving.settings import ServingSettings

INT64 = 2**63
# lt, not le=2**63-1: FastAPI's OpenAPI model writes bounds as floats, and 2**63 is exact as a float while 2**63-1 is not
# (it would round up to 2**63); ``serving.app`` writes integral bounds of integer schemas back as JSON integers.
Int64 = Annotated[StrictInt, Field(ge=-INT64, lt=INT64)]


def _whole(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _int64_if_whole(value: float) -> float:
    if value.is_integer() and not -INT64 <= value < INT64:
        raise ValueError("a whole number must lie within 64-bit integers, [-2**63, 2**63)")
    return value


Whole = BeforeValidator(_whole)
"""JSON Schema counts a whole number written as a float (``7.0``) as an integer, so integer fields take it as one.
(Beyond 2**53 a float does not spell an integer exactly: send such ids as JSON integers or strings.)"""


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"not valid UTF-8 text ({error.reason} at position {error.start})") from None
    return text


Text = Annotated[StrictStr, Field(max_length=256), AfterValidator(_encodable)]
RawId = Union[Annotated[Int64, Whole], Text]
"""A raw user or item id as in the training data: an integer or a string (digit strings match integer ids)."""
Number = Annotated[StrictFloat, Field(allow_inf_nan=False), AfterValidator(_int64_if_whole),
                   WithJsonSchema({"type": "number", "not": {"type": "integer"}})]
"""A float; whole ones must lie within int64 like integers (in JSON Schema they are integers: the ``Int64`` branch)."""
Scalar = Union[Int64, Number, Text, StrictBool, None]
Count = Annotated[StrictInt, Whole]
AnyId = Union[int, str]  # ids in answers come from the model's vocabulary: not re-checked
Source = Literal["model", "history", "popularity"]
Strict = ConfigDict(extra="forbid")
SOMEONE = {"anyOf": [{"required": ["user_id"], "properties": {"user_id": {"type": ["integer", "string"]}}},
                     {"required": ["history"], "properties": {"history": {"type": "array"}}}]}
"""What ``RecommendQuery``'s validator asks, in JSON Schema: a non-null ``user_id`` or a non-null ``history``."""


class ErrorBody(BaseModel):
    """An error answer: what went wrong, in words."""

    detail: str


class ValidationIssue(BaseModel):
    """One way the body does not match the schema (pydantic's location, message and error type)."""

    loc: list[int | str]
    msg: str
    type: str


class ValidationErrors(BaseModel):
    """A 422 answer: the body's mismatches with the schema (at most 20, then a ``truncated`` entry)."""

    detail: list[ValidationIssue]


class ModelInfo(BaseModel):
    """The model being served."""

    name: str
    version: str
    uri: str
    family: str
    load_seconds: float


class Health(BaseModel):
    """The process is alive."""

    status: Literal["ok"]


class Ready(BaseModel):
    """A model is being served."""

    status: Literal["ready"]
    model: ModelInfo


class Unready(BaseModel):
    """No model is served yet: it is ``loading``, or its load ``failed`` (``detail`` has an error reference)."""

    status: Literal["loading", "failed"]
    detail: str


class Reloaded(BaseModel):
    """The model that a reload swapped in, and the version it replaced."""

    version: str
    previous_version: str | None
    model: ModelInfo


class Recommendation(BaseModel):
    """Top items of one query, best first."""

    user_id: AnyId | None
    items: list[AnyId]
    scores: list[float]
    source: Source
    """``model`` (a known user), ``history`` (an unseen user, from the given items) or ``popularity``."""
    fallback: bool
    """True when the model could not score the user itself (``source`` is not ``model``)."""
    model_version: str


class Recommendations(BaseModel):
    """The answers of a batch /recommend, in request order."""

    results: list[Recommendation]
    model_version: str


class Probabilities(BaseModel):
    """Click probabilities of /score rows, in row order."""

    probabilities: list[float]
    model_version: str


class SimilarItems(BaseModel):
    """The items most similar to ``item_id`` (itself left out), best first."""

    item_id: AnyId
    items: list[AnyId]
    scores: list[float]
    model_version: str


@dataclass(frozen=True)
class RequestModels:
    """The request bodies of one app: ``recommend`` (one query or ``{"requests": [...]}``), ``score``, ``similar``."""

    query: type[BaseModel]
    batch: type[BaseModel]
    recommend: Any
    score: type[BaseModel]
    similar: type[BaseModel]


def request_models(settings: ServingSettings) -> RequestModels:
    """Request bodies bounded by ``settings`` (k, batch, history, filter sizes); unknown fields are rejected.

    Example:
        >>> models = request_models(ServingSettings(model_uri="x", max_k=50))
        >>> models.query(user_id=7, k=50).k
        50
    """

    class RecommendQuery(BaseModel):
        """One /recommend query: a user id, or recent items of a user the model has not seen, or both."""

        model_config = ConfigDict(extra="forbid", json_schema_extra=SOMEONE)
        user_id: RawId | None = None
        history: list[RawId] | None = Field(None, max_length=settings.max_history)
        """Recent items, most recent last; used when the model does not know ``user_id``."""
        k: Count = Field(10, ge=1, le=settings.max_k)
        exclude_seen: StrictBool = True
        """Leave out items the user interacted with (a known user's training items, else ``history``)."""
        allowed_items: list[RawId] | None = Field(None, max_length=settings.max_items)
        """Only recommend among these items (unknown ids are ignored)."""
        excluded_items: list[RawId] | None = Field(None, max_length=settings.max_items)
        """Never recommend these items."""

        @model_validator(mode="after")
        def _someone(self):
            if self.user_id is None and self.history is None:
                raise ValueError("a /recommend query needs a 'user_id', a 'history' (list of item ids) or both")
            return self

    class RecommendBatch(BaseModel):
        """Several queries answered in one call."""

        model_config = Strict
        requests: list[RecommendQuery] = Field(min_length=1, max_length=settings.max_batch)

    class ScoreRequest(BaseModel):
        """CTR rows: raw feature column -> value (a list of ids for multi-valued columns)."""

        model_config = Strict
        rows: list[dict[Text, Union[Scalar, Annotated[list[Scalar], Field(max_length=settings.max_history)]]]] = \
            Field(min_length=1, max_length=settings.max_batch)

    class SimilarRequest(BaseModel):
        """An item id and how many similar items to return."""

        model_config = Strict
        item_id: RawId
        k: Count = Field(10, ge=1, le=settings.max_k)

    def kind(body) -> str:
        return "batch" if isinstance(body, RecommendBatch) or (isinstance(body, dict) and "requests" in body) else "query"

    recommend = Annotated[Union[Annotated[RecommendQuery, Tag("query")], Annotated[RecommendBatch, Tag("batch")]],
                          Discriminator(kind)]
    return RequestModels(RecommendQuery, RecommendBatch, recommend, ScoreRequest, SimilarRequest)
