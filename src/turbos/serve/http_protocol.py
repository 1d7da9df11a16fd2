"""How uvicorn runs the server: its h11 protocol with a deadline on request heads, and its limits.

uvicorn times out idle keep-alive connections but has no deadline on reading a request head, so
a client that sends one header line now and then (slowloris) holds a connection open for as long
as it likes. ``HeaderDeadlineProtocol`` gives every request head ``header_timeout`` seconds,
counted from the connection's start or from the end of its previous response; a connection that
has not sent a whole head by then gets 408 and is closed.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from turbos.serve.config import ServerConfig

_TIMEOUT_BODY = b"The request head did not arrive in time.\n"


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request head is late (module docstring)."""

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a whole head arrived
            self._cancel_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # both sides start over (IDLE) unless the connection closes or a pipelined head was read
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        self._cancel_deadline()
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.our_state is h11.IDLE:  # h11 lets a server answer before the request is read
            headers = [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(_TIMEOUT_BODY)).encode()),
                (b"connection", b"close"),
            ]
            events = [
                h11.Response(status_code=408, headers=headers, reason=b"Request Timeout"),
                h11.Data(data=_TIMEOUT_BODY),
                h11.EndOfMessage(),
            ]
            self.transport.write(b"".join(self.conn.send(event) for event in events))
        self.transport.close()


def uvicorn_options(config: ServerConfig) -> dict[str, Any]:
    """Keyword arguments of ``uvicorn.run`` / ``uvicorn.Config`` for a server with ``config``."""
    return {
        "host": config.host,
        "port": config.port,
        "log_level": config.log_level,
        "http": functools.partial(HeaderDeadlineProtocol, header_timeout=config.header_timeout),
        "timeout_keep_alive": config.keep_alive_timeout,
        "h11_max_incomplete_event_size": config.max_header_bytes,
        "timeout_graceful_shutdown": config.drain_timeout,
    }
