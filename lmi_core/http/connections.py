"""HTTP connections that cannot pin the server: a deadline for each request head, a bound on how many.

uvicorn arms no timer on a new connection (its keep-alive timer starts only after a response), so a
client that connects and sends nothing, or trickles a request head one byte at a time (slowloris),
held a file descriptor for ever: 50 such connections were all still open after 30 s. And its
``limit_concurrency`` answers 503 only once a request head is complete, so idle connections were
never bounded at all.

Invariants, per listener: a connection sends a complete request head within
``SERVING_REQUEST_HEAD_TIMEOUT`` seconds of opening, and each later request's head within as long of
its first byte, or it is closed (idle time between requests is uvicorn's keep-alive, 5 s); at most
``SERVING_MAX_CONNECTIONS`` connections are open, and one more is answered 503 and closed at once,
never queued. Both live in uvicorn's own protocol class (``HttpToolsProtocol``), where the parser's
callbacks say when a head begins and ends; a request's body and its response are not timed here
(their deadlines are the request's own).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)

# File descriptors the server keeps for itself beside HTTP connections: worker sockets, logs, model
# files, the listening sockets.
FD_RESERVE = 256


def connection_bound(max_connections: int, fd_limit: int, listeners: int) -> int:
    """The connections each listener may hold: ``max_connections``, lowered so that every listener
    full still leaves ``FD_RESERVE`` descriptors of ``fd_limit`` (at least 1)."""
    return max(1, min(max_connections, (fd_limit - FD_RESERVE) // listeners))


def fd_bound(max_connections: int, listeners: int) -> int:
    """``connection_bound`` under this process's file-descriptor limit, after raising its soft limit
    toward what ``max_connections`` needs (up to the hard limit): a bound past the limit would not
    keep the server's own descriptors free."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections * listeners + FD_RESERVE
    if soft < wanted and (hard == resource.RLIM_INFINITY or soft < hard):
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    bound = connection_bound(max_connections, soft, listeners)
    if bound < max_connections:
        logger.warning(
            "SERVING_MAX_CONNECTIONS=%d lowered to %d: %d file descriptors", max_connections, bound, soft
        )
    return bound


def refusal(max_connections: int) -> bytes:
    """The whole HTTP response a connection over the bound gets before it is closed."""
    body = json.dumps(
        {
            "code": 503,
            "type": "ServiceUnavailableException",
            "message": f"too many open connections (SERVING_MAX_CONNECTIONS={max_connections})",
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request-head deadline and a connection bound (set by
    ``guarded_protocol``)."""

    head_timeout: ClassVar[float]
    max_connections: ClassVar[int]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections:
            self.transport = transport  # read by connection_lost
            transport.write(refusal(self.max_connections))
            transport.close()
            return
        super().connection_made(transport)
        self._arm_head_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_head_timer()  # a later request's first byte; the first request's runs from connect

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(head_timeout: float, max_connections: int) -> type[GuardedProtocol]:
    """The protocol class for one listener (``uvicorn.Config(http=...)`` takes a class)."""
    settings = {"head_timeout": head_timeout, "max_connections": max_connections}
    return type("GuardedProtocol", (GuardedProtocol,), settings)
