"""The HTTP/1.1 layer under the app: uvicorn's h11 protocol, plus a deadline for a request's headers.

uvicorn closes a keep-alive connection that stays idle after an answer, but nothing else times out:
a connection that sends nothing, or its headers a byte at a time (slowloris), or the rest of a body
the app never read, stays open for ever, holding a socket and a place under the connection limit.
Here every connection gets ``header_timeout`` seconds, from its opening or from the end of its
previous answer, to deliver a complete request head; the timer is not reset by the bytes that trickle
in, only by a request reaching the app. The body then has the app's own deadline
(``BodyLimitMiddleware``), which can answer 408.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("pipx_llama.server")


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client connection may take from the server."""

    header_timeout: float = 20.0  # seconds to deliver a request's headers (from connect or the last answer)
    keep_alive: int = 5  # seconds an idle connection is kept after an answer
    max_connections: int = 64  # open connections; requests on more are answered 503
    max_header_bytes: int = 16 << 10  # request line and headers; larger: 400


class HeaderDeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol that closes a connection whose next request head is late."""

    header_timeout = ConnectionLimits.header_timeout
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._update()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._update()  # a request that reached the app stops the clock; a partial one does not

    def on_response_complete(self) -> None:
        self._cancel()  # the clock starts again for the next request
        super().on_response_complete()  # may already start a pipelined request
        self._update()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def _update(self) -> None:
        busy = self.cycle is not None and not self.cycle.response_complete
        if busy or self.transport.is_closing():
            self._cancel()
        elif self._deadline is None:
            self._deadline = self.loop.call_later(self.header_timeout, self._expired)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.debug("%s: no complete request within %g s; connection closed", self.client,
                      self.header_timeout)
            self.transport.close()


def protocol_class(header_timeout: float) -> type[H11Protocol]:
    """uvicorn builds one protocol object per connection from a class: the timeout is a class attribute."""
    return type("HeaderDeadlineH11Protocol", (HeaderDeadlineH11Protocol,), {"header_timeout": header_timeout})


def uvicorn_config(app: Any, limits: ConnectionLimits, **options: Any) -> uvicorn.Config:
    """A ``uvicorn.Config`` for ``app`` with ``limits`` applied; ``options`` are passed on (log level,
    ...)."""
    return uvicorn.Config(
        app,
        http=protocol_class(limits.header_timeout),
        ws="none",  # the server has no WebSocket route: an upgrade request is answered as plain HTTP
        limit_concurrency=limits.max_connections,
        timeout_keep_alive=limits.keep_alive,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        **options,
    )
