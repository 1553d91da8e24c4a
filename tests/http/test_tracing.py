"""The SERVER span per request (``http.tracing``) over a fake ``ModelService``, spans caught in memory;
when tracing is on (``telemetry``) and what a worker does with a request's ``traceparent``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.testclient import TestClient

from lmi_core import telemetry
from lmi_core.config import ServerConfig
from lmi_core.engine import Finished, GenerationEvent, GenerationRequest
from lmi_core.errors import ConfigError, EngineError
from lmi_core.http.app import build_app
from lmi_core.http.metrics import Metrics
from lmi_core.http.state import AppState
from lmi_core.otel import span_sink
from lmi_core.worker.tracing import traced_generation
from tests.http.fakes import FakeModels, model, pool, worker

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT}-01"


def traced(models: FakeModels) -> tuple[TestClient, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    metrics = Metrics()
    state = AppState(ServerConfig(), models, instrument=metrics.instrument)
    app = build_app(state, metrics, spans=span_sink(SimpleSpanProcessor(exporter), Resource.create({})))
    return TestClient(app, raise_server_exceptions=False), exporter


def fakes() -> FakeModels:
    return FakeModels(model("a", pool("a", worker(0))))


def only_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    (span,) = exporter.get_finished_spans()
    return span


def test_a_request_gets_a_server_span_under_its_traceparent_and_hands_its_own_to_the_worker() -> None:
    models = fakes()
    client, exporter = traced(models)
    body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    response = client.post("/v1/chat/completions", json=body, headers={"traceparent": TRACEPARENT})
    assert response.status_code == 200
    span = only_span(exporter)
    assert (span.name, span.kind) == ("chat a", SpanKind.SERVER)
    assert span.context is not None and span.parent is not None
    assert (format(span.context.trace_id, "032x"), format(span.parent.span_id, "016x")) == (TRACE_ID, PARENT)
    usage = response.json()["usage"]
    assert span.attributes is not None
    assert dict(span.attributes) | {
        "gen_ai.server.request.duration": 0,
        "gen_ai.server.time_to_first_token": 0,
    } == {
        "http.request.method": "POST",
        "url.path": "/v1/chat/completions",
        "url.scheme": "http",
        "http.route": "/v1/chat/completions",
        "http.response.status_code": 200,
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "a",
        "gen_ai.request.max_tokens": 5,
        "gen_ai.request.temperature": 1.0,
        "gen_ai.request.top_p": 1.0,
        "gen_ai.usage.input_tokens": usage["prompt_tokens"],
        "gen_ai.usage.output_tokens": usage["completion_tokens"],
        "gen_ai.response.finish_reasons": ("length",),
        "gen_ai.server.request.duration": 0,
        "gen_ai.server.time_to_first_token": 0,
    }
    # The worker's parent is this span, in the same trace.
    sent = models.served_models["a"].requests[-1].traceparent
    assert sent == f"00-{TRACE_ID}-{format(span.context.span_id, '016x')}-01"


def test_a_failed_generation_fails_its_span_with_the_error_type() -> None:
    models = fakes()
    models.served_models["a"].error = EngineError("engine died", status=500)
    client, exporter = traced(models)
    assert client.post("/v1/completions", json={"model": "a", "prompt": "hi"}).status_code == 500
    span = only_span(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None and span.attributes["error.type"] == "EngineError"
    assert span.context is not None and span.parent is None  # no traceparent: a trace of its own


def test_a_client_error_names_its_status_without_failing_the_span_and_probes_are_not_traced() -> None:
    client, exporter = traced(fakes())
    assert client.post("/v1/completions", json={"model": "a", "prompt": 1}).status_code == 400
    span = only_span(exporter)
    assert span.name == "POST /v1/completions" and span.status.status_code is StatusCode.UNSET
    assert span.attributes is not None and span.attributes["error.type"] == "400"
    exporter.clear()
    assert client.get("/ping").status_code == 200 and client.get("/metrics").status_code == 200
    assert exporter.get_finished_spans() == ()


@pytest.mark.parametrize(
    ("environ", "exporter"),
    [
        ({}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "otlp"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, "otlp"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, None),
        ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, "otlp"),
    ],
)
def test_tracing_is_off_unless_the_environment_asks(environ: dict[str, str], exporter: str | None) -> None:
    assert telemetry.exporter_name(environ) == exporter


def test_an_unknown_exporter_is_a_config_error_and_engines_get_the_sdks_endpoint() -> None:
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER"):
        telemetry.exporter_name({"OTEL_TRACES_EXPORTER": "zipkin"})
    assert (
        telemetry.traces_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"})
        == "http://c:4318/v1/traces"
    )
    assert telemetry.traces_endpoint({"OTEL_TRACES_EXPORTER": "otlp"}) == "http://localhost:4318/v1/traces"
    explicit = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t/x", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}
    assert telemetry.traces_endpoint(explicit) == "http://t/x"
    assert telemetry.traces_endpoint({"OTEL_TRACES_EXPORTER": "console"}) is None


def test_a_worker_runs_an_untraced_request_as_is_and_drops_a_traceparent_it_cannot_follow() -> None:
    seen: list[GenerationRequest] = []

    async def run(request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        seen.append(request)
        yield Finished("length", 1, 0, "")

    untraced = GenerationRequest("r", prompt="p")
    events = run(untraced)
    assert traced_generation(untraced, 0, lambda _: events) is events  # no wrapper
    telemetry.span_sink.cache_clear()
    try:  # this test's process does not trace: the worker would have no span to parent vLLM's under
        with pytest.MonkeyPatch.context() as patch:
            for name in (
                "OTEL_TRACES_EXPORTER",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            ):
                patch.delenv(name, raising=False)
            asyncio.run(
                anext(traced_generation(GenerationRequest("r", prompt="p", traceparent=TRACEPARENT), 0, run))
            )
    finally:
        telemetry.span_sink.cache_clear()
    assert seen[-1].traceparent is None


def test_a_request_its_caller_did_not_sample_records_no_span_and_passes_that_on() -> None:
    models = fakes()
    client, exporter = traced(models)
    unsampled = f"00-{TRACE_ID}-{PARENT}-00"
    body = {"model": "a", "prompt": "hi", "max_tokens": 2}
    assert client.post("/v1/completions", json=body, headers={"traceparent": unsampled}).status_code == 200
    assert exporter.get_finished_spans() == ()
    sent = models.served_models["a"].requests[-1].traceparent
    assert sent is not None and sent.startswith(f"00-{TRACE_ID}-") and sent.endswith("-00")
