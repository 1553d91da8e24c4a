"""Finished spans, recorded lean and sent as OTLP/HTTP: what a process that traces uses of OpenTelemetry.

Invariant: imported only by a process that traces (``telemetry.span_sink``), never at a module's
import. A span is recorded once, whole, when it is over: ``SpanSink.record`` builds one SDK
``ReadableSpan`` and hands it to the batch processor (its thread exports), with none of the live
``Span`` machinery (locks, per-attribute validation, processors called at start and end). Measured
on this machine for one traced chat's three server spans: 106 us on the event loop through the SDK's
``Tracer``, 12 us through ``record``. The exporter is the SDK's OTLP/HTTP one (endpoint, headers,
TLS, compression, retries from ``OTEL_EXPORTER_OTLP_*``) with a lean encoder: ``encode`` writes the
protobuf bytes of ``ExportTraceServiceRequest`` itself, equal message for message to the SDK's
``encode_spans`` (tested) in under a third of its time (10 vs 34 us a span), because that runs on
the same CPU as the server's loop.

The sampler, ID generator and resource are the SDK's, from the environment (``OTEL_TRACES_SAMPLER``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_SERVICE_NAME``), through a ``TracerProvider`` that owns the
processor (its ``shutdown`` flushes it).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    TraceFlags,
    set_span_in_context,
)
from opentelemetry.trace.span import TraceState
from opentelemetry.trace.status import Status, StatusCode

SCOPE = InstrumentationScope("lmi_core")
SAMPLED, NOT_SAMPLED = TraceFlags(TraceFlags.SAMPLED), TraceFlags(TraceFlags.DEFAULT)
UNSET = Status(StatusCode.UNSET)


# W3C trace context's traceparent, as the SDK's propagator reads it (a later version may add fields).
TRACEPARENT = re.compile(r"^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?[ \t]*$")


def parent_context(traceparent: str | None, tracestate: str | None = None) -> SpanContext | None:
    """The remote parent a W3C ``traceparent`` (and ``tracestate``) names; None if absent or invalid
    (the propagator's rules, without building a ``Context``: a fifth of the worker span's cost)."""
    found = TRACEPARENT.match(traceparent) if traceparent else None
    if found is None:
        return None
    version, trace, span, flags, rest = found.groups()
    if version == "ff" or (version == "00" and rest) or not int(trace, 16) or not int(span, 16):
        return None
    state = TraceState.from_header([tracestate]) if tracestate else None
    return SpanContext(int(trace, 16), int(span, 16), True, TraceFlags(int(flags, 16)), state)


def traceparent_of(context: SpanContext) -> str:
    """``context`` as a W3C ``traceparent`` header (its children's parent)."""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


class SpanSink:
    """Where this process's finished spans go: ``start`` decides a new span's context (sampled or
    not), ``record`` hands a sampled one, over, to the batch processor."""

    def __init__(self, provider: TracerProvider, processor: SpanProcessor) -> None:
        self.provider = provider
        self.processor = processor
        self.resource = provider.resource
        self.sampler = provider.sampler
        self.ids = provider.id_generator

    def start(self, name: str, parent: SpanContext | None, kind: SpanKind = SpanKind.INTERNAL) -> SpanContext:
        """The context of a new span under ``parent`` (None: a trace of its own), sampled as the
        environment's sampler decides (by default: as its parent was, else always)."""
        trace_id = parent.trace_id if parent is not None else self.ids.generate_trace_id()
        context: Context | None = None
        if parent is not None:
            context = set_span_in_context(NonRecordingSpan(parent))
        decision = self.sampler.should_sample(context, trace_id, name, kind).decision
        flags = SAMPLED if decision is Decision.RECORD_AND_SAMPLE else NOT_SAMPLED
        state = parent.trace_state if parent is not None else None
        return SpanContext(trace_id, self.ids.generate_span_id(), False, flags, state)

    def child(self, parent: SpanContext) -> SpanContext:
        """A child span's context: same trace and sampling as ``parent`` (a span of this process)."""
        return SpanContext(parent.trace_id, self.ids.generate_span_id(), False, parent.trace_flags)

    def record(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        start_ns: int,
        end_ns: int,
        attributes: Mapping[str, Any],
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        events: Sequence[Event] = (),
        status: Status = UNSET,
    ) -> None:
        """A span that is over; nothing when it is not sampled."""
        if not context.trace_flags.sampled:
            return
        span = ReadableSpan(
            name,
            context,
            parent,
            resource=self.resource,
            attributes=attributes,
            events=events,
            kind=kind,
            status=status,
            start_time=start_ns,
            end_time=end_ns,
            instrumentation_scope=SCOPE,
        )
        self.processor.on_end(span)


def failed(error: BaseException) -> tuple[Status, dict[str, str]]:
    """A failed span's status and its ``error.type`` attribute."""
    return Status(StatusCode.ERROR, str(error) or type(error).__name__), {"error.type": type(error).__name__}


# -- OTLP protobuf, written directly (opentelemetry/proto/trace/v1/trace.proto) ---------------------

_SMALL = [bytes([n]) for n in range(128)]


def _varint(n: int) -> bytes:
    if n < 128:
        return _SMALL[n]
    out = bytearray()
    while n >= 128:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_TAGS = [_varint(number << 3 | 2) for number in range(17)]  # length-delimited fields 0..16


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (a string, bytes or a message)."""
    size = len(payload)
    return _TAGS[number] + (_SMALL[size] if size < 128 else _varint(size)) + payload


def _string(number: int, text: str) -> bytes:
    return _field(number, text.encode())


def _any_value(value: Any) -> bytes:
    if type(value) is str:  # the common case first, by exact type (a subclass goes the long way)
        return _field(1, value.encode())
    if isinstance(value, str):
        return _field(1, str.encode(value))
    if isinstance(value, bool):  # before int: a bool is an int
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(int(value) & 0xFFFFFFFFFFFFFFFF)  # int64: two's complement, 10 bytes if < 0
    if isinstance(value, float):
        return b"\x21" + struct.pack("<d", value)
    if isinstance(value, bytes):
        return _field(7, value)
    if isinstance(value, Sequence):
        return _field(5, b"".join(_field(1, _any_value(item)) for item in value))
    return _string(1, str(value))


_keys: dict[str, bytes] = {}  # an attribute's key, encoded (the same few dozen keys on every span)


def _attributes(number: int, attributes: Mapping[str, Any] | None) -> bytes:
    if not attributes:
        return b""
    out = []
    for key, value in attributes.items():
        encoded = _keys.get(key)
        if encoded is None:
            encoded = _keys[key] = _string(1, key)
        out.append(_field(number, encoded + _field(2, _any_value(value))))
    return b"".join(out)


_FLAGS_CONTEXT_HAS_IS_REMOTE, _FLAGS_CONTEXT_IS_REMOTE = 0x100, 0x200


def _span(span: ReadableSpan) -> bytes:
    context = span.context
    assert context is not None and span.start_time is not None and span.end_time is not None
    out = [_field(1, context.trace_id.to_bytes(16, "big")), _field(2, context.span_id.to_bytes(8, "big"))]
    if context.trace_state:
        out.append(_string(3, context.trace_state.to_header()))
    flags = _FLAGS_CONTEXT_HAS_IS_REMOTE
    if span.parent is not None:
        out.append(_field(4, span.parent.span_id.to_bytes(8, "big")))
        flags |= _FLAGS_CONTEXT_IS_REMOTE if span.parent.is_remote else 0
    out.append(_string(5, span.name))
    out.append(b"\x30" + _varint(span.kind.value + 1))  # the SDK's kinds start at INTERNAL = 0, OTLP's at 1
    out.append(struct.pack("<BQBQ", 0x39, span.start_time, 0x41, span.end_time))
    out.append(_attributes(9, span.attributes))
    for event in span.events:
        stamp = struct.pack("<BQ", 0x09, event.timestamp)
        out.append(_field(11, stamp + _string(2, event.name) + _attributes(3, event.attributes)))
    status = span.status
    message = _string(2, status.description) if status.description else b""
    code = b"\x18" + _varint(status.status_code.value) if status.status_code.value else b""
    out.append(_field(15, message + code))
    out.append(struct.pack("<BBI", 0x85, 0x01, flags))  # field 16, fixed32
    return b"".join(out)


def encode(spans: Iterable[ReadableSpan]) -> bytes:
    """The ``ExportTraceServiceRequest`` of ``spans``, grouped by resource then scope as the SDK does."""
    # Grouped by identity: a Resource's hash is a JSON dump of its attributes (a fifth of the encoding's
    # time when hashed per span); a process has one resource and one scope.
    groups: dict[int, tuple[Resource, dict[int, tuple[InstrumentationScope, list[ReadableSpan]]]]] = {}
    for span in spans:
        resource, scope = span.resource, span.instrumentation_scope
        assert resource is not None and scope is not None
        scopes = groups.setdefault(id(resource), (resource, {}))[1]
        scopes.setdefault(id(scope), (scope, []))[1].append(span)
    out = []
    for resource, scopes in groups.values():
        body = [_field(1, _attributes(1, resource.attributes))]
        for scope, members in scopes.values():
            named = _string(1, scope.name) + (_string(2, scope.version) if scope.version else b"")
            scope_spans = [_field(1, named), *(_field(2, _span(span)) for span in members)]
            if scope.schema_url:
                scope_spans.append(_string(3, scope.schema_url))
            body.append(_field(2, b"".join(scope_spans)))
        if resource.schema_url:
            body.append(_string(3, resource.schema_url))
        out.append(_field(1, b"".join(body)))
    return b"".join(out)


class OtlpHttpExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP exporter (its settings, transport and retries: its ``_client``, whose
    ``export`` takes the encoded bytes) with ``encode``."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown:
            return SpanExportResult.FAILURE
        sent = self._client.export(encode(spans)).success
        return SpanExportResult.SUCCESS if sent else SpanExportResult.FAILURE


def span_sink(processor: SpanProcessor, resource: Resource) -> SpanSink:
    """A sink whose spans leave through ``processor`` (a batch one: its own thread exports)."""
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(processor)
    return SpanSink(provider, processor)
