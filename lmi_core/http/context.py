"""One context per HTTP request: what its headers ask, and the response headers naming who served it.

Invariant: every HTTP request that passes the API key gets one ``RequestContext`` (in
``scope["state"]``), built here from its tenant (``security``), its headers and its listener: its
session (``x-session-id``, the endpoint picker's ``x-session-token``, or SageMaker's), the per-worker
port it came in on, and its ``x-request-timeout`` (a header that is not a positive finite number is a
400 naming it, in the route's dialect, before any route runs). Handlers pass it with each generation;
the pool appends each dispatch decision to it before the generation's first event, and the response
headers are written from it when the response starts, so ``x-lmi-worker`` names the worker(s) of
every inference response that reached one, streamed or not, errors after dispatch included. The
metrics middleware, outside this one, reads the model it ran on from it when the request is over.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from lmi_core.errors import BadRequestError
from lmi_core.http import errors
from lmi_core.http.common import HttpMiddleware, on_response_start
from lmi_core.http.security import tenant_of
from lmi_core.serving.deadlines import parse_client_timeout
from lmi_core.serving.routing import RequestContext

# The client's session: lmi's own header, the endpoint picker's (GIE / llm-d session affinity), then
# SageMaker's stateful-session header.
SESSION_HEADERS = (b"x-session-id", b"x-session-token", b"x-amzn-sagemaker-session-id")
TIMEOUT_HEADER = b"x-request-timeout"
WORKER_HEADER = b"x-lmi-worker"
# Present when the session's worker died, retired or was overloaded: its state there is gone.
MOVED_HEADER = b"x-lmi-session-moved"
_KEY = "lmi_context"
_SLOT_KEY = "lmi_worker_slot"


def context_of(scope: Scope) -> RequestContext | None:
    """The request's context (None where the app has no ``RequestContextMiddleware``, or it refused
    the request before building one)."""
    context = scope.get("state", {}).get(_KEY)
    return context if isinstance(context, RequestContext) else None


def request_context(request: Request) -> RequestContext | None:
    return context_of(request.scope)


def arrived_on_worker_port(scope: Scope, slot: int) -> None:
    """Mark a request that came in on per-worker port ``slot`` (``http.listeners``), before it reaches
    the app: its context will prefer that worker."""
    scope.setdefault("state", {})[_SLOT_KEY] = slot


def keep_alive(request: Request, seconds: float | None) -> None:
    """Record the body's ``keep_alive`` (None: it has none) in the request's context: its model's
    residency reads it when the request ends."""
    context = request_context(request)
    if context is not None and seconds is not None:
        context.keep_alive = seconds


def parse_context(headers: dict[bytes, bytes]) -> RequestContext:
    """A request's context from its headers; a 400 naming ``x-request-timeout`` when it is not a
    positive finite number of seconds."""
    session = next((headers[h] for h in SESSION_HEADERS if h in headers), None)
    timeout = headers.get(TIMEOUT_HEADER)
    seconds = parse_client_timeout(timeout.decode("latin-1")) if timeout is not None else None
    if timeout is not None and seconds is None:
        raise BadRequestError(
            "x-request-timeout must be a positive number of seconds", param="x-request-timeout"
        )
    return RequestContext(session.decode(errors="replace") if session else None, seconds)


def response_headers(context: RequestContext) -> list[tuple[bytes, bytes]]:
    """``x-lmi-worker``: the workers that served, in dispatch order, each once (n > 1 choices may
    run on several); ``x-lmi-session-moved``: the worker the session left."""
    workers = list(dict.fromkeys(str(d.worker_id) for d in context.served))
    headers = [(WORKER_HEADER, ",".join(workers).encode())] if workers else []
    moved = [str(d.moved_from) for d in context.served if d.moved_from is not None]
    if moved:
        headers.append((MOVED_HEADER, moved[0].encode()))
    return headers


class RequestContextMiddleware(HttpMiddleware):
    """Give every request its ``RequestContext`` and write the serving workers onto the response."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            context = parse_context(dict(scope["headers"]))
        except BadRequestError as exc:
            await errors.render(exc, errors.dialect_for(scope["path"]))(scope, receive, send)
            return
        context.tenant = tenant_of(scope)
        state = scope.setdefault("state", {})
        context.worker_slot = state.get(_SLOT_KEY)
        state[_KEY] = context

        def add_workers(message: Message) -> None:
            message["headers"] = [*message.get("headers", []), *response_headers(context)]

        await self.app(scope, receive, on_response_start(send, add_workers))
