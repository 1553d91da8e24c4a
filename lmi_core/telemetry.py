"""OpenTelemetry in one process (server or worker): whether it traces, its span sink, where spans go.

Invariant: tracing is off unless the environment asks for it (``OTEL_TRACES_EXPORTER`` = ``otlp`` or
``console``, or an ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` with no
exporter named; ``OTEL_SDK_DISABLED=true`` and ``none`` turn it off), and while it is off nothing
here imports OpenTelemetry: the SDK (the ``lmi-core[otel]`` extra) is imported by the first
``span_sink`` call of a process that traces (the server's app, a worker's load). A worker inherits the
server's environment, so both decide alike. Spans leave through a batch processor on its own thread
(``OTEL_BSP_*`` settings). Part of the backend kit: an engine that exports spans of its own (vLLM)
sends them where ``traces_endpoint`` says. Standard library only at import: this module runs in
worker processes.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from lmi_core.errors import ConfigError

if TYPE_CHECKING:
    from lmi_core.otel import SpanSink

logger = logging.getLogger(__name__)

EXPORTERS = ("otlp", "console")
SERVICE_NAME = "lmi-core"

_sinks: list[SpanSink] = []  # the span sinks this process built (flushed by ``shutdown``)


def exporter_name(environ: Mapping[str, str]) -> str | None:
    """The span exporter the environment asks for (``otlp``, ``console``), None: tracing is off; a
    ``ConfigError`` naming ``OTEL_TRACES_EXPORTER`` for an exporter lmi-core does not ship."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    named = environ.get("OTEL_TRACES_EXPORTER")
    if named is None:
        endpoints = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
        return "otlp" if any(environ.get(name) for name in endpoints) else None
    choice = named.split(",")[0].strip().lower()  # OpenTelemetry allows a list; lmi-core uses one
    if choice in ("", "none"):
        return None
    if choice not in EXPORTERS:
        raise ConfigError("OTEL_TRACES_EXPORTER", named, "otlp, console or none")
    return choice


def traces_endpoint(environ: Mapping[str, str]) -> str | None:
    """The OTLP/HTTP URL spans go to, for an engine that exports its own (vLLM); None when this
    process does not export OTLP. The SDK's rule: the traces endpoint as is, else the base endpoint
    plus ``v1/traces``, else the default collector."""
    if exporter_name(environ) != "otlp":
        return None
    if explicit := environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return explicit
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318"
    return f"{base.rstrip('/')}/v1/traces"


@functools.cache
def span_sink(role: str) -> SpanSink | None:
    """This process's span sink, built from the environment on first use (``role``: ``server`` or
    ``worker``, a resource attribute); None when tracing is off or, in a worker, when the SDK is not
    installed (logged once). Its provider is this process's own, not the global one: an engine
    (vLLM) may install that for its own spans."""
    choice = exporter_name(os.environ)
    if choice is None:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

        from lmi_core import otel
    except ImportError as exc:
        if role == "server":
            raise ConfigError("OTEL_TRACES_EXPORTER", choice, "installed lmi-core[otel] to trace") from exc
        logger.warning("tracing is on but this worker has no OpenTelemetry SDK (%s): no worker spans", exc)
        return None
    # The OTLP exporter reads OTEL_EXPORTER_OTLP_* itself.
    exporter: SpanExporter = otel.OtlpHttpExporter() if choice == "otlp" else ConsoleSpanExporter()
    attributes: dict[str, str | int] = {"process.pid": os.getpid(), "lmi.process": role}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = SERVICE_NAME
    sink = otel.span_sink(BatchSpanProcessor(exporter), Resource.create(attributes))
    _sinks.append(sink)
    return sink


def shutdown() -> None:
    """Send the spans still buffered (the process is stopping)."""
    for sink in _sinks:
        sink.provider.shutdown()
