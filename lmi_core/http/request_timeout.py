"""``x-request-timeout``: a client's seconds that lower (never raise) one request's total deadline.

Invariant: a request with a valid header runs with ``deadlines.client_timeout`` set to its seconds
for its whole life (the streamed body included, which runs inside this middleware's call); a header
that is not a positive finite number is a 400 naming it, in the route's shape, before any route runs.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from lmi_core.errors import BadRequestError
from lmi_core.http import errors
from lmi_core.serving.deadlines import client_timeout, parse_client_timeout

HEADER = b"x-request-timeout"


class RequestTimeoutMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = dict(scope["headers"]).get(HEADER) if scope["type"] == "http" else None
        if raw is None:
            await self.app(scope, receive, send)
            return
        seconds = parse_client_timeout(raw.decode("latin-1"))
        if seconds is None:
            error = BadRequestError(
                "x-request-timeout must be a positive number of seconds", param="x-request-timeout"
            )
            await errors.render(error, errors.dialect_for(scope.get("path", "")))(scope, receive, send)
            return
        token = client_timeout.set(seconds)
        try:
            await self.app(scope, receive, send)
        finally:
            client_timeout.reset(token)
