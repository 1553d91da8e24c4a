"""The ASGI application: routes, request ids, errors, and the model lifecycle (lifespan)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from lmi_core import telemetry
from lmi_core.config import ModelConfig, ServerConfig
from lmi_core.errors import BadRequestError, ConfigError, ServiceError
from lmi_core.http import (
    adapters,
    anthropic_api,
    errors,
    liveness,
    lmi_api,
    management,
    openai_api,
    openapi,
    pooling_api,
    responses_api,
    tgi_api,
    tokenize_api,
)
from lmi_core.http.boundary import ErrorBoundaryMiddleware
from lmi_core.http.common import ClientDisconnected, HttpMiddleware, on_response_start
from lmi_core.http.context import RequestContextMiddleware
from lmi_core.http.metrics import Metrics, MetricsMiddleware
from lmi_core.http.security import ApiKeyMiddleware, allow_cors
from lmi_core.http.state import AppState
from lmi_core.serving.server import ModelServer
from lmi_core.serving.tenants import Tenants

if TYPE_CHECKING:
    from lmi_core.otel import SpanSink

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"

Lifespan = Callable[[Starlette], contextlib.AbstractAsyncContextManager[None]]


class RequestIdMiddleware(HttpMiddleware):
    """Echo the client's ``x-request-id`` (or a new one) on every response."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        request_id = headers.get(REQUEST_ID_HEADER.encode()) or uuid.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = request_id.decode(errors="replace")

        def add_id(message: Message) -> None:
            message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id)]

        await self.app(scope, receive, on_response_start(send, add_id))


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    return errors.render(exc, errors.dialect_for(request.url.path))


async def _config_error(request: Request, exc: Exception) -> Response:
    """A bad setting in a management request (registering or scaling a model): a 400 naming its key."""
    assert isinstance(exc, ConfigError)
    return errors.render(BadRequestError(str(exc), param=exc.key), errors.dialect_for(request.url.path))


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown route or method: a JSON error like every other one, not starlette's plain text."""
    assert isinstance(exc, HTTPException)
    error = ServiceError(
        exc.detail, status=exc.status_code, type=HTTPStatus(exc.status_code).phrase.replace(" ", "")
    )
    response = errors.render(error, errors.dialect_for(request.url.path))
    response.headers.update(exc.headers or {})
    return response


async def _disconnected(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody is listening; the status is for the access log


def create_app(
    config: ServerConfig,
    models: list[ModelConfig] | None = None,
    server: ModelServer | None = None,
    on_load_failure: Callable[[Exception], None] | None = None,
    tenants: Tenants | None = None,
) -> Starlette:
    """The application serving ``models`` (loaded at startup, before /ping turns 200); a ``server``
    given (tests) keeps the pool observer it was built with. ``tenants``: the caller's (it reloads
    them on SIGHUP), else read from ``config.tenants_file`` (a bad file raises ``ConfigError``)."""
    metrics = Metrics()
    server = server or ModelServer(config, observe=metrics)
    metrics.collect_from(server)
    spans = telemetry.span_sink("server")  # None: tracing is off (and OpenTelemetry is not imported)
    state = AppState(
        config=config,
        server=server,
        startup_models=list(models or []),
        instrument=metrics.instrument,
        tenants=tenants if tenants is not None else Tenants.from_config(config),
    )
    server.expect(state.startup_models)

    async def load_startup_models() -> None:
        for model in state.startup_models:  # those with load_on_startup=false wait for a request
            try:
                await server.load_startup(model.name)
            except Exception as exc:
                logger.error("model %s failed to load: %s", model.name, exc)
                if on_load_failure is not None:
                    on_load_failure(exc)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncGenerator[None, None]:
        # Load in the background: the port is open at once and /ping says 503 until models are ready.
        loader = asyncio.get_running_loop().create_task(load_startup_models())
        # Starlette's StreamingResponse makes an anyio task group, and anyio imports its asyncio
        # backend on first use: that cost the first streamed request 270 ms of its TTFT (468 ms
        # against 14 ms for the second, vLLM backend, 2-core host). Any anyio call imports it now.
        await anyio.sleep(0)
        try:
            yield
        finally:
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            await server.shutdown()
            telemetry.shutdown()  # the spans still buffered

    return build_app(state, metrics, lifespan, spans)


def build_app(
    state: AppState, metrics: Metrics, lifespan: Lifespan | None = None, spans: SpanSink | None = None
) -> Starlette:
    """The routes, error handlers and middleware over ``state.server``, whatever implements it; with
    a span sink (``spans``), a SERVER span per request (``http.tracing``)."""
    config = state.config
    routes: list[Any] = [
        *lmi_api.routes,
        *tgi_api.routes,
        *openai_api.routes,
        *responses_api.routes,
        *anthropic_api.routes,
        *tokenize_api.routes,
        *pooling_api.routes,
        *openapi.routes,
        *management.routes,
        *adapters.routes,
        *liveness.routes,
        Route("/metrics", metrics.endpoint, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            ServiceError: _service_error,
            ConfigError: _config_error,
            ClientDisconnected: _disconnected,
            HTTPException: _http_error,
        },
    )
    app.state.lmi = state
    app.state.metrics = metrics  # the metrics listener serves its registry (cli)
    # Outermost last: CORS answers preflights before the key check; 401s are counted and carry an id;
    # the request context (x-session-id and x-request-timeout in, x-lmi-worker out) is built once
    # the key is checked and the tenant known; a traced request's span sees the status the client
    # gets; an unexpected error (innermost) is a JSON error that is counted, carries an id and names
    # its worker too.
    app.add_middleware(ErrorBoundaryMiddleware)
    if spans is not None:  # inside the context (it puts its trace there), outside the boundary
        from lmi_core.http.tracing import TracingMiddleware

        app.add_middleware(TracingMiddleware, sink=spans)
    app.add_middleware(RequestContextMiddleware)
    app.add_middleware(ApiKeyMiddleware, tenants=state.tenants, api_key=config.api_key or None)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)
    origins = [o.strip() for o in config.cors_allowed_origins.split(",") if o.strip()]
    if origins:
        allow_cors(app, origins)
    return app
