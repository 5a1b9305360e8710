"""Errors of the serving layer and the handlers that turn every error into a JSON answer with a clear message.

Client mistakes get 4xx: invalid JSON 400, a body not sent as JSON 415, a body that does not match the schema 422
(pydantic's messages), data the model rejects (``recsys.errors.DataError`` / ``ConfigError``) 400. Anything else is
a bug: 500, logged. Answers about the server itself (a failed load, a bug) name no internals (exception classes,
paths, the tracking URI): the client gets a short error reference, and the log line with the details carries the same
reference.
"""

from __future__ import annotations

import logging
import secrets

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from recsys.errors import ConfigError, DataError

log = logging.getLogger("serving")
MAX_ERRORS = 20  # validation errors listed in one answer


def error_reference() -> str:
    """A short random id that ties a client's error answer to the server's log line with the details."""
    return secrets.token_hex(4)


class ServingError(Exception):
    """An error with its HTTP status and the headers of its answer."""

    status = 500

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.headers = headers


class NotReady(ServingError):
    """No model is loaded (yet)."""

    status = 503


class WrongModel(ServingError):
    """The endpoint needs another kind of model (e.g. /score on a ranking model)."""

    status = 409


class NotFound(ServingError):
    """An id the model does not know."""

    status = 404


class ReloadBusy(ServingError):
    """A reload is already running."""

    status = 409


class LoadFailed(ServingError):
    """The model could not be resolved or loaded; the previous one (if any) keeps serving."""

    status = 503


class Unauthorized(ServingError):
    """An admin call without the right bearer token."""

    status = 401

    def __init__(self, message: str):
        super().__init__(message, {"WWW-Authenticate": 'Bearer realm="recsys admin"'})


class AdminDisabled(ServingError):
    """Admin endpoints are off: the server listens beyond loopback and no admin token is set."""

    status = 403


class TooEarly(ServingError):
    """A reload asked for before ``min_reload_interval`` has passed since the last one started."""

    status = 429

    def __init__(self, message: str, retry_after: int):
        super().__init__(message, {"Retry-After": str(retry_after)})


def _detail(status: int, detail, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def _serving_error(request: Request, error: ServingError) -> JSONResponse:
    return _detail(error.status, str(error), error.headers)


async def _data_error(request: Request, error: Exception) -> JSONResponse:
    return _detail(400, str(error))


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    errors = error.errors()
    if isinstance(error.body, (bytes, bytearray)):  # FastAPI parses a body as JSON only under a JSON content type
        content_type = request.headers.get("content-type", "")
        return _detail(415, f"send the body as JSON with 'Content-Type: application/json' (got {content_type[:80]!r})")
    broken = [e for e in errors if e.get("type") == "json_invalid"]
    if broken:
        reason = (broken[0].get("ctx") or {}).get("error", "")
        where = broken[0].get("loc", ())[-1:]
        return _detail(400, f"invalid JSON body: {reason}" + (f" at position {where[0]}" if where else ""))
    listed = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]
    if len(listed) > MAX_ERRORS:
        listed = [*listed[:MAX_ERRORS], {"loc": [], "msg": f"... and {len(listed) - MAX_ERRORS} more errors",
                                         "type": "truncated"}]
    return _detail(422, listed)


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    reference = error_reference()
    log.error("unhandled error on %s %s [error %s]: %s: %s", request.method, request.url.path, reference,
              type(error).__name__, error, exc_info=error)
    return _detail(500, f"internal error (error reference {reference}; the server log has the details)")


def install_handlers(app: FastAPI) -> None:
    """Registers the handlers above on ``app``."""
    app.add_exception_handler(ServingError, _serving_error)
    app.add_exception_handler(DataError, _data_error)
    app.add_exception_handler(ConfigError, _data_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
