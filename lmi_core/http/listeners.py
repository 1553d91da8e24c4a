"""The extra listeners an inference gateway needs: a metrics port, and one port per worker.

Invariant: neither changes who may call the app. The metrics listener (``--metrics-port``) serves
``GET /metrics`` and nothing else, with no API key, because the endpoint picker (GIE / llm-d) cannot
send one; every other path there is a 404. A worker port (``--worker-ports``, at most 8, as many as an
``InferencePool``'s ``targetPorts``) answers ``GET /metrics`` itself, with no key, with only the
picker's series of the workers it names (``gie_metrics``); every other request goes to the app as on
the inference port, API key and all, marked with the port's slot so that the pool prefers that worker.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from lmi_core.errors import NotFoundError
from lmi_core.http import errors
from lmi_core.http.context import arrived_on_worker_port
from lmi_core.http.gie_metrics import PickerCollector
from lmi_core.http.state import ModelService

METRICS_PATH = "/metrics"


def is_scrape(scope: Scope) -> bool:
    return scope["type"] == "http" and scope["path"] == METRICS_PATH and scope["method"] in ("GET", "HEAD")


def exposition(registry: CollectorRegistry) -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class MetricsListener:
    """``GET /metrics`` of ``registry`` (the app's: every series) with no API key; a 404 otherwise."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan: the inference listener runs the app's
            return
        if is_scrape(scope):
            response = exposition(self.registry)
        else:
            response = errors.render(
                NotFoundError(f"{scope['path']} is not served on the metrics port; /metrics is"),
                errors.dialect_for(scope["path"]),
            )
        await response(scope, receive, send)


class WorkerPortListener:
    """Per-worker port ``slot``: its workers' picker series at ``/metrics``; the app for the rest."""

    def __init__(self, app: ASGIApp, server: ModelService, slot: int) -> None:
        self.app = app
        self.slot = slot
        self.registry = CollectorRegistry()
        self.registry.register(PickerCollector(server, slot))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if is_scrape(scope):
            await exposition(self.registry)(scope, receive, send)
            return
        if scope["type"] == "http":
            arrived_on_worker_port(scope, self.slot)
        await self.app(scope, receive, send)
