"""The lean span path: ``encode`` against the SDK's own OTLP encoder, and ``SpanSink``'s sampling."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.span import TraceState
from opentelemetry.trace.status import Status, StatusCode

from lmi_core.otel import SCOPE, SpanSink, encode, failed, parent_context, span_sink, traceparent_of

TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SERVER = Resource.create({"service.name": "lmi-core", "process.pid": 7, "lmi.process": "server"})
WORKER = Resource.create({"service.name": "lmi-core", "process.pid": 8, "lmi.process": "worker"})


def context(span_id: int, remote: bool = False, state: TraceState | None = None) -> SpanContext:
    return SpanContext(TRACE, span_id, remote, TraceFlags(TraceFlags.SAMPLED), state)


def spans() -> list[ReadableSpan]:
    """Every shape lmi-core records: a SERVER span under a remote parent with a trace state, its
    children (one failed), a worker span with events, a root span, every attribute type."""
    remote = context(0x00F067AA0BA902B7, remote=True, state=TraceState([("vendor", "opaque1")]))
    root = context(0x1111, state=remote.trace_state)
    attributes = {
        "text": "chat demo",
        "unicode": "héllo ✓",
        "count": 64,
        "negative": -3,
        "large": 2**62,
        "ratio": 0.25,
        "flag": True,
        "off": False,
        "reasons": ("stop", "length"),
        "numbers": [1, 2, 3],
    }
    status, error_type = failed(RuntimeError("engine died"))
    return [
        ReadableSpan("chat demo", root, remote, resource=SERVER, attributes=attributes, kind=SpanKind.SERVER,
                     start_time=1_700_000_000_000_000_000, end_time=1_700_000_000_500_000_000,
                     instrumentation_scope=SCOPE),
        ReadableSpan("lmi.queue", context(0x2222), root, resource=SERVER, attributes={"lmi.worker": 0},
                     start_time=1, end_time=2, instrumentation_scope=SCOPE),
        ReadableSpan("lmi.migration", context(0x3333), root, resource=SERVER, attributes=error_type,
                     status=status, start_time=3, end_time=4, instrumentation_scope=SCOPE),
        ReadableSpan("lmi.worker.generate", context(0x4444), context(0x1111, remote=True), resource=WORKER,
                     attributes={"lmi.rank": 0}, events=[Event("migrated", {"lmi.resumed_tokens": 5}, 10),
                     Event("first_token", timestamp=11)], status=Status(StatusCode.OK), start_time=5,
                     end_time=12, instrumentation_scope=InstrumentationScope("lmi_core", "0.1", "https://s")),
        ReadableSpan("GET /v1/models", context(0x5555), None, resource=SERVER, kind=SpanKind.SERVER,
                     start_time=6, end_time=7, instrumentation_scope=SCOPE),
    ]  # fmt: skip


def test_encode_writes_what_the_sdks_encoder_writes() -> None:
    ours = ExportTraceServiceRequest.FromString(encode(spans()))
    theirs = encode_spans(spans())
    assert text_format.MessageToString(ours) == text_format.MessageToString(theirs)
    assert len(ours.resource_spans) == 2  # grouped by resource, then scope, like the SDK


def sink(environ: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> tuple[SpanSink, InMemorySpanExporter]:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    exporter = InMemorySpanExporter()
    return span_sink(SimpleSpanProcessor(exporter), SERVER), exporter


def test_a_span_is_recorded_whole_under_its_parent_and_propagated(monkeypatch: pytest.MonkeyPatch) -> None:
    spans_sink, exporter = sink({}, monkeypatch)
    parent = parent_context(f"00-{TRACE:032x}-00f067aa0ba902b7-01", "vendor=opaque1")
    assert parent is not None and parent.is_remote
    own = spans_sink.start("chat demo", parent)
    assert own.trace_id == TRACE and own.trace_flags.sampled and own.trace_state == parent.trace_state
    assert traceparent_of(own) == f"00-{TRACE:032x}-{own.span_id:016x}-01"
    spans_sink.record("chat demo", own, parent, 1, 2, {"a": 1})
    (span,) = exporter.get_finished_spans()
    assert (span.name, span.parent, span.context) == ("chat demo", parent, own)
    assert dict(span.attributes or {}) == {"a": 1}


@pytest.mark.parametrize(
    ("environ", "traceparent", "sampled"),
    [
        ({}, None, True),
        ({}, f"00-{TRACE:032x}-00f067aa0ba902b7-00", False),  # the caller did not sample it
        ({"OTEL_TRACES_SAMPLER": "always_off"}, None, False),
        ({"OTEL_TRACES_SAMPLER": "always_on"}, f"00-{TRACE:032x}-00f067aa0ba902b7-00", True),
    ],
)
def test_the_environments_sampler_decides_and_an_unsampled_span_is_not_recorded(
    environ: dict[str, str], traceparent: str | None, sampled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    spans_sink, exporter = sink(environ, monkeypatch)
    own = spans_sink.start("chat demo", parent_context(traceparent))
    assert own.trace_flags.sampled is sampled
    assert traceparent_of(own).endswith("-01" if sampled else "-00")  # the worker decides alike
    spans_sink.record("chat demo", own, None, 1, 2, {})
    child = spans_sink.child(own)
    spans_sink.record("lmi.queue", child, own, 1, 2, {})
    assert len(exporter.get_finished_spans()) == (2 if sampled else 0)


VALID = f"00-{TRACE:032x}-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        VALID,
        f" {VALID}\t",
        VALID.replace("-01", "-00"),
        VALID.replace("-01", "-03"),  # flags beyond "sampled" are kept
        VALID.upper(),
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
        f"00-{TRACE:032x}-" + "0" * 16 + "-01",
        "ff" + VALID[2:],
        VALID + "-extra",  # version 00 has exactly four fields
        "01" + VALID[2:] + "-extra",  # a later version may add some
        VALID[:-1],
    ],
)
def test_a_traceparent_is_read_as_opentelemetrys_propagator_reads_it(header: str) -> None:
    from opentelemetry.trace import get_current_span
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {"traceparent": header, "tracestate": "vendor=opaque1"}
    expected = get_current_span(TraceContextTextMapPropagator().extract(carrier)).get_span_context()
    found = parent_context(header, "vendor=opaque1")
    assert found == (expected if expected.is_valid else None)
    if found is not None:
        assert (found.trace_flags, found.trace_state) == (expected.trace_flags, expected.trace_state)
    assert parent_context(None) is None


def test_the_trace_state_is_kept() -> None:
    (root, *_) = spans()
    assert root.context is not None and root.context.trace_state.to_header() == "vendor=opaque1"
    (encoded,) = ExportTraceServiceRequest.FromString(encode([root])).resource_spans
    assert encoded.scope_spans[0].spans[0].trace_state == "vendor=opaque1"
