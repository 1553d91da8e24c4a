"""Routing on the HTTP side: the session a request names, and the headers naming who served it.

Invariant: every HTTP request gets one ``RouteHint`` (in ``scope["state"]``) holding its session id;
the pool appends each dispatch decision to it before the generation's first event, and the response
headers are written from it when the response starts, so ``x-lmi-worker`` names the worker(s) of
every inference response that reached one, streamed or not, errors after dispatch included.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from lmi_core.http.common import HttpMiddleware, on_response_start
from lmi_core.serving.routing import RouteHint

# The client's session: lmi's own header, then SageMaker's stateful-session header.
SESSION_HEADERS = (b"x-session-id", b"x-amzn-sagemaker-session-id")
WORKER_HEADER = b"x-lmi-worker"
# Present when the session's worker died, retired or was overloaded: its state there is gone.
MOVED_HEADER = b"x-lmi-session-moved"
_KEY = "route_hint"


def route_hint(request: Request) -> RouteHint | None:
    """The request's hint (None where the app has no ``RoutingMiddleware``)."""
    hint = request.scope.get("state", {}).get(_KEY)
    return hint if isinstance(hint, RouteHint) else None


def response_headers(hint: RouteHint) -> list[tuple[bytes, bytes]]:
    """``x-lmi-worker``: the workers that served, in dispatch order, each once (n > 1 choices may
    run on several); ``x-lmi-session-moved``: the worker the session left."""
    workers = list(dict.fromkeys(str(d.worker_id) for d in hint.served))
    headers = [(WORKER_HEADER, ",".join(workers).encode())] if workers else []
    moved = [str(d.moved_from) for d in hint.served if d.moved_from is not None]
    if moved:
        headers.append((MOVED_HEADER, moved[0].encode()))
    return headers


class RoutingMiddleware(HttpMiddleware):
    """Give every request a ``RouteHint`` and write its headers onto the response."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        session = next((headers[h] for h in SESSION_HEADERS if h in headers), None)
        hint = RouteHint(session.decode(errors="replace") if session else None)
        scope.setdefault("state", {})[_KEY] = hint

        def add_workers(message: Message) -> None:
            message["headers"] = [*message.get("headers", []), *response_headers(hint)]

        await self.app(scope, receive, on_response_start(send, add_workers))
