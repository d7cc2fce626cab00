"""uvicorn's HTTP/1.1 protocol with a deadline on each request's head (request line + headers).

uvicorn (0.54) times a connection out only while it is idle after a response (``timeout_keep_alive``): any byte
cancels that timer, so a client that sends a request's headers a byte at a time ("slowloris") holds its
connection, and its socket, forever, and a few hundred such clients exhaust the server's file descriptors. The
app cannot see a request before its headers are complete, so the deadline lives here: a request's head
must be complete within ``header_timeout`` seconds of its first byte (of the connection's start, for the first
request), else the client gets a 408 (or, if it sent nothing, the connection is just closed) and the connection
ends. Slow bodies are the app's business (``body_timeout``, server/app.py).
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import APIError


def protocol_with_header_timeout(header_timeout: float) -> type[H11Protocol]:
    """The class to hand ``uvicorn.Config(http=...)``."""
    return type("HeaderDeadlineH11Protocol", (HeaderDeadlineH11Protocol,), {"header_timeout": header_timeout})


class HeaderDeadlineH11Protocol(H11Protocol):
    header_timeout = 30.0
    _head_deadline: asyncio.TimerHandle | None = None
    _head_started = False  # some bytes of the awaited request head have arrived

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()  # a fresh connection that never sends a byte is closed too

    def data_received(self, data: bytes) -> None:
        if self._head_deadline is None and self.conn.their_state is h11.IDLE:  # the first byte of a new request
            self._arm_head_deadline()
        self._head_started = True
        super().data_received(data)

    def on_response_complete(self) -> None:
        self._cancel_head_deadline()  # until the next request's first byte: idle is uvicorn's keep-alive timeout
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_started = False
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_deadline_passed)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_deadline_passed(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:  # the head has arrived
            return
        if self._head_started:  # the same error body as a body that arrives too slowly (server/app.py)
            error = APIError(408, f"The request line and headers did not arrive within {self.header_timeout:g} "
                                  "seconds.", code="request_timeout")
            body = json.dumps(error.body()).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        self.logger.info("closing a connection whose request head took longer than %gs", self.header_timeout)
        self.transport.close()
