"""Request bodies parsed by jvlm, so that every unreadable one gets a 400 that says what is wrong.

FastAPI parses a JSON body with ``request.json()`` and turns any failure other than a syntax error (bytes
that are not UTF-8, a number past Python's int-string limit, nesting past the recursion limit) into one
generic "There was an error parsing the body" without a code. Routes of class ``JSONBodyRoute`` get a
request whose ``json()`` names the problem instead.
"""

from __future__ import annotations

import email.message
import json
import sys
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from .errors import APIError, BodyError

_UTF8_CHARSETS = {"utf-8", "utf8", "us-ascii", "ascii"}


def _declared_charset(content_type: str | None) -> str | None:
    if not content_type:
        return None
    message = email.message.Message()
    message["content-type"] = content_type
    return message.get_content_charset()


def parse_json_body(body: bytes, content_type: str | None = None) -> Any:
    """The body as JSON. A syntax error stays a ``json.JSONDecodeError`` (FastAPI reports where it is);
    anything else that stops parsing raises a ``BodyError`` (code ``invalid_json``)."""
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        raise
    except UnicodeDecodeError as e:
        charset = _declared_charset(content_type)
        declared = (f"; it is declared as charset={charset}, but JSON must be sent as UTF-8"
                    if charset and charset not in _UTF8_CHARSETS else "")
        message = f"The request body is not UTF-8 encoded JSON (invalid byte at offset {e.start}{declared})."
    except RecursionError:
        message = "The request body's JSON is nested too deeply."
    except ValueError as e:  # int("9" * 5000): Python's int-string conversion limit
        if "integer string conversion" not in str(e):
            raise
        message = (f"The request body has a number too large to parse (more than {sys.get_int_max_str_digits():,} "
                   "digits).")
    raise BodyError(APIError(400, message, code="invalid_json"))


class JSONBodyRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body(), self.headers.get("content-type"))
        return self._json


class JSONBodyRoute(APIRoute):
    """A route whose JSON body is parsed by ``parse_json_body``."""

    def get_route_handler(self):
        handle = super().get_route_handler()

        async def handle_with_jvlm_json(request: Request) -> Response:
            return await handle(JSONBodyRequest(request.scope, request.receive))

        return handle_with_jvlm_json
