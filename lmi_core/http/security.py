"""Access control: the API key and the tenant it names, CORS, and which routes a listener serves when
management has its own.

With an API key set (the server's ``api_key``, or a tenant's in the tenants file), every route
except ``/ping`` (load balancers' health checks carry no secret) needs ``Authorization: Bearer KEY``
or ``x-api-key: KEY`` (Anthropic's clients send the key that way); that includes ``/metrics``
(Prometheus sends bearer tokens) and the management routes. Every request that passes gets its
tenant (``serving.tenants``) here, the one place a request's key is read. CORS is off unless allowed
origins are configured.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from lmi_core.errors import AuthenticationError, NotFoundError
from lmi_core.http import errors
from lmi_core.http.common import HttpMiddleware
from lmi_core.serving.tenants import FAIRNESS_HEADER, Tenant, Tenants

OPEN_PATHS = frozenset({"/ping", "/health", "/live"})
# Served by both listeners when management has its own address.
SHARED_PATHS = frozenset({"/ping", "/health", "/live", "/openapi.json"})
_TENANT = "lmi_tenant"


def presented_keys(headers: dict[bytes, bytes]) -> list[str]:
    """The API keys a request presents: ``Authorization: Bearer KEY``, then ``x-api-key: KEY`` (the
    header Anthropic's clients send). Either one valid is enough."""
    keys = []
    scheme, _, key = headers.get(b"authorization", b"").partition(b" ")
    if scheme.lower() == b"bearer" and key:
        keys.append(key.decode("latin-1"))
    if other := headers.get(b"x-api-key"):
        keys.append(other.decode("latin-1"))
    return keys


def tenant_of(scope: Scope) -> Tenant | None:
    """The tenant ``ApiKeyMiddleware`` found for the request (None: the app has none)."""
    tenant = scope.get("state", {}).get(_TENANT)
    return tenant if isinstance(tenant, Tenant) else None


class ApiKeyMiddleware(HttpMiddleware):
    """Find each request's tenant (``Tenants.identify``); refuse one that needs an API key and has
    no valid one (401), except on the open paths (``/ping``...)."""

    def __init__(self, app: ASGIApp, tenants: Tenants, api_key: str | None = None) -> None:
        super().__init__(app)
        self.tenants = tenants
        self.api_key = api_key

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        fairness_id = headers.get(FAIRNESS_HEADER)
        tenant = self.tenants.identify(
            presented_keys(headers), fairness_id.decode("latin-1") if fairness_id else None, self.api_key
        )
        if tenant is None and scope["path"] not in OPEN_PATHS:
            error = AuthenticationError("missing or invalid API key")
            response = errors.render(error, errors.dialect_for(scope["path"]))
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})[_TENANT] = tenant or self.tenants.default
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
