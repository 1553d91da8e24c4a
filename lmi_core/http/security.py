"""Access control: the API key, CORS, and which routes a listener serves when management has its own.

With an API key set, every route except ``/ping`` (load balancers' health checks carry no secret)
needs ``Authorization: Bearer KEY`` or ``x-api-key: KEY`` (Anthropic's clients send the key that
way); that includes ``/metrics`` (Prometheus sends bearer tokens) and the management routes. CORS
is off unless allowed origins are configured.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from lmi_core.errors import AuthenticationError, NotFoundError
from lmi_core.http import errors
from lmi_core.http.common import HttpMiddleware

OPEN_PATHS = frozenset({"/ping", "/health", "/live"})
# Served by both listeners when management has its own address.
SHARED_PATHS = frozenset({"/ping", "/health", "/live", "/openapi.json"})


class ApiKeyMiddleware(HttpMiddleware):
    """Refuse requests without ``Authorization: Bearer <api_key>`` or ``x-api-key: <api_key>`` (401),
    except on ``/ping``."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        super().__init__(app)
        self.key = api_key.encode()
        self.bearer = b"Bearer " + self.key

    def accepts(self, headers: dict[bytes, bytes]) -> bool:
        # Both compared in constant time, whichever is present: no guessing by timing.
        bearer = hmac.compare_digest(headers.get(b"authorization", b""), self.bearer)
        return hmac.compare_digest(headers.get(b"x-api-key", b""), self.key) | bearer

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] not in OPEN_PATHS and not self.accepts(dict(scope["headers"])):
            error = AuthenticationError("missing or invalid API key")
            response = errors.render(error, errors.dialect_for(scope["path"]))
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def allow_cors(app: Starlette, origins: Sequence[str]) -> None:
    """Let browsers on ``origins`` (``*``: any) call the API; preflights are answered before the key check."""
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(origins),
        allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
        allow_headers=[
            "Authorization",
            "Content-Type",
            "X-Request-Id",
            "X-Api-Key",
            "Anthropic-Version",
            "Anthropic-Beta",
        ],
        expose_headers=["X-Request-Id", "Retry-After"],
    )


def is_management_path(path: str) -> bool:
    """The management API (``/models...`` but not ``/models/{name}/invoke``, ``/server...``) and
    ``/metrics``: operator routes, kept off the inference listener when management has its own."""
    if path.startswith("/models/") and path.endswith("/invoke"):
        return False
    return path in ("/models", "/metrics") or path.startswith(("/models/", "/server/"))


class ListenerFilter(HttpMiddleware):
    """One listener's view of the app: only management routes, or only the others (404 otherwise)."""

    def __init__(self, app: ASGIApp, management: bool) -> None:
        super().__init__(app)
        self.management = management

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if path not in SHARED_PATHS and is_management_path(path) != self.management:
            listener = "management" if self.management else "inference"
            error = NotFoundError(f"{path} is not served on the {listener} address")
            response = errors.render(error, errors.dialect_for(path))
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
