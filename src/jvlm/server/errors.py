"""One OpenAI-shaped error body, and the one place where jvlm's typed errors become HTTP statuses.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    ContextLengthError,
    ImageError,
    ImageFetchError,
    ImageTooLargeError,
    InvalidRequestError,
    JvlmError,
    OverloadedError,
)

log = logging.getLogger("jvlm.server")

RETRY_AFTER_OVERLOADED_S = 1
RETRY_AFTER_LOADING_S = 30
LOADING_MESSAGE = ("Model is loading, please retry in 30-60 seconds. The server is up; /ready answers 200 "
                   "once the model '{name}' has loaded and run a warm-up pass.")


class APIError(Exception):
    """An HTTP error with OpenAI's body; raised anywhere in a route, rendered by ``api_error_handler``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class BodyError(StarletteHTTPException):
    """A request body that cannot be parsed, raised while FastAPI parses it: FastAPI lets HTTP exceptions
    through as they are (any other becomes its generic 400 without a code), so this carries jvlm's error out."""

    def __init__(self, error: APIError):
        super().__init__(error.status, error.message)
        self.error = error


def from_jvlm(exc: JvlmError) -> APIError:
    """The status table for library errors (most specific class first)."""
    message = str(exc)
    if isinstance(exc, ContextLengthError):
        return APIError(400, message, param="messages", code="context_length_exceeded")
    if isinstance(exc, ImageFetchError):
        return APIError(400, message, param="messages", code="image_fetch_failed")
    if isinstance(exc, ImageTooLargeError):
        return APIError(400, message, param="messages", code="image_too_large")
    if isinstance(exc, ImageError):
        return APIError(400, message, param="messages", code="invalid_image")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, message, code="invalid_request")
    if isinstance(exc, OverloadedError):
        return APIError(503, f"The server is overloaded ({message}); retry shortly.", type="overloaded_error",
                        code="server_overloaded", headers={"Retry-After": str(RETRY_AFTER_OVERLOADED_S)})
    return internal_error(exc)


def internal_error(exc: BaseException | str) -> APIError:
    if isinstance(exc, BaseException):
        log.error("unexpected error while serving a request", exc_info=exc)
    else:
        log.error("unexpected error while serving a request: %s", exc)
    return APIError(500, "The server had an error while processing your request.", type="server_error",
                    code="internal_error")


def loading_response(model_name: str) -> JSONResponse:
    """The cold-start answer of every /v1/* route: exactly ``{"error": {"message", "code": 503}}``."""
    return JSONResponse({"error": {"message": LOADING_MESSAGE.format(name=model_name), "code": 503}},
                        status_code=503, headers={"Retry-After": str(RETRY_AFTER_LOADING_S)})


def body_json(error: APIError) -> bytes:
    """The error body as bytes, for places that write raw ASGI messages or SSE events."""
    return json.dumps(error.body()).encode()


_UNION_LABELS = {"str", "constrained-str"}
_PART_TAGS = {"text", "image_url"}  # content-part discriminator values, which pydantic puts in the location


def _path(loc: tuple, extra: bool = False) -> str:
    """``("body", "messages", 0, "content", "list[...]", 0, "text", "foo")`` → ``messages.0.content.0.foo``:
    pydantic's union-branch labels and discriminator tags dropped (an unknown key, last, is kept as sent)."""
    loc = loc[1:]
    kept = [p for i, p in enumerate(loc) if (extra and i == len(loc) - 1) or not isinstance(p, str) or not (
        "[" in p or p in _UNION_LABELS or (p in _PART_TAGS and i and isinstance(loc[i - 1], int)))]
    return ".".join(str(p) for p in kept) or "body"


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    extra = list(dict.fromkeys(_path(e["loc"], extra=True) for e in errors if e["type"] == "extra_forbidden"))
    if extra:
        return APIError(400, f"Unsupported parameter(s): {', '.join(extra)}. jvlm does not implement them.",
                        param=extra[0], code="unsupported_parameter")
    first = errors[0]
    if first["type"] == "json_invalid" and tuple(first["loc"])[:1] == ("body",):
        ctx = first.get("ctx", {}).get("error", "")
        return APIError(400, f"The request body is not valid JSON{f' ({ctx})' if ctx else ''}.", code="invalid_json")
    if tuple(first["loc"]) == ("body",):  # valid JSON, but not an object (or no body at all)
        sent = type(first.get("input")).__name__ if first.get("input") is not None else "nothing"
        sent = {"list": "an array", "str": "a string", "int": "a number", "float": "a number",
                "bool": "a boolean", "NoneType": "null"}.get(sent, sent)
        return APIError(400, f"The request body must be a JSON object with 'messages'; got {sent}.",
                        code="invalid_request_body")
    param = str(first["loc"][1]) if len(first["loc"]) > 1 else None  # the top-level field
    details = "; ".join(f"{_path(e['loc'])}: {e['msg']}" for e in errors[:5])
    return APIError(400, f"Invalid request: {details}", param=param, code="invalid_value")


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def jvlm_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, JvlmError)
    return from_jvlm(exc).response()


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _validation_error(exc).response()


async def body_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BodyError)
    return exc.error.response()


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    # 400: FastAPI's own "There was an error parsing the body", should a body still fail in a way jvlm misses
    code = {400: "invalid_request_body", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers).response()


EXCEPTION_HANDLERS = {
    APIError: api_error_handler,
    BodyError: body_error_handler,
    JvlmError: jvlm_error_handler,
    RequestValidationError: validation_error_handler,
    StarletteHTTPException: http_error_handler,
}  # anything else becomes a 500 in app.EdgeMiddleware
