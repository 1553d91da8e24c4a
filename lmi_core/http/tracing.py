"""Traces of HTTP requests: one SERVER span per request, with OpenTelemetry's GenAI attributes.

Invariant: this module is imported only when tracing is on (``worker.tracing.tracer("server")`` is
not None; ``app.create_app`` decides), so a server that does not trace never imports OpenTelemetry.
Then every HTTP request but the probes and the scrape gets one SERVER span, parented from its W3C
``traceparent`` (and ``tracestate``) header when it has one, and its ``RequestContext`` gets the
``HttpTrace`` that the pool's spans (``lmi.queue``, ``lmi.route``, ``lmi.migration``) hang under. A
generation's request carries the span's ``traceparent`` to the worker (``GenerationRequest``), whose
``lmi.worker.generate`` span is its child. The span is named ``{operation} {model}`` (``chat demo``)
once a generation starts, else ``{method} {route}``; it ends when the response's last byte is sent.
A failed generation, or a 5xx, sets its status to ERROR and ``error.type``; a 4xx sets ``error.type``
only (OpenTelemetry's HTTP server rule: the client's error, not the server's).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncGenerator

from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmi_core.engine import Finished, GenerationEvent, GenerationRequest, Token
from lmi_core.http.common import HttpMiddleware, on_response_start
from lmi_core.http.context import context_of
from lmi_core.http.openai_render import FINISH_REASONS
from lmi_core.http.state import Instrument, ServedModel
from lmi_core.serving.request_trace import Attributes
from lmi_core.serving.routing import RequestContext

# Probes and scrapes come every few seconds (the endpoint picker's every 50 ms): not traced.
UNTRACED = frozenset({"/metrics", "/ping", "/health", "/live"})
PROPAGATOR = TraceContextTextMapPropagator()  # W3C trace context, whatever OTEL_PROPAGATORS says


def mark_failed(span: Span, error: BaseException) -> None:
    span.set_status(Status(StatusCode.ERROR, str(error) or type(error).__name__))
    span.set_attribute("error.type", type(error).__name__)


class HttpTrace:
    """One traced HTTP request: its SERVER span and what its generations add to it (the
    ``serving.request_trace.RequestTrace`` the pool records into)."""

    def __init__(self, tracer: Tracer, root: Span) -> None:
        self.tracer = tracer
        self.root = root
        self.context = set_span_in_context(root)
        carrier: dict[str, str] = {}
        PROPAGATOR.inject(carrier, context=self.context)
        self.traceparent = carrier.get("traceparent")  # None: no valid context (never sampled in)
        self.started = time.monotonic()
        self.named = False
        self.failed = False
        self.output_tokens = 0
        self.finish_reasons: list[str] = []

    def span(
        self,
        name: str,
        start_ns: int,
        end_ns: int,
        attributes: Attributes,
        error: BaseException | None = None,
    ) -> None:
        span = self.tracer.start_span(name, context=self.context, start_time=start_ns, attributes=attributes)
        if error is not None:
            mark_failed(span, error)
        span.end(end_time=end_ns)

    def generation(self, model: str, request: GenerationRequest) -> None:
        """A generation of this request starts on ``model`` (n > 1 choices: one each)."""
        operation = "chat" if request.messages is not None else "text_completion"
        if not self.named:
            self.root.update_name(f"{operation} {model}")
            self.named = True
        params = request.params
        attributes: dict[str, str | int | float] = {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": model,
            "gen_ai.request.max_tokens": params.max_new_tokens,
        }
        if not params.greedy:
            attributes["gen_ai.request.temperature"] = params.temperature
            attributes["gen_ai.request.top_p"] = params.top_p
        if params.seed is not None:
            attributes["gen_ai.request.seed"] = params.seed
        if request.adapter is not None:
            attributes["lmi.lora_adapter"] = request.adapter.name
        self.root.set_attributes(attributes)

    def finished(self, event: Finished, first_token_at: float | None) -> None:
        """A generation finished: usage (summed over choices), finish reasons, TTFT and duration."""
        self.output_tokens += event.generated_tokens
        self.finish_reasons.append(FINISH_REASONS.get(event.finish_reason, event.finish_reason))
        now = time.monotonic()
        attributes: dict[str, int | float | list[str]] = {
            "gen_ai.usage.input_tokens": event.prompt_tokens,
            "gen_ai.usage.output_tokens": self.output_tokens,
            "gen_ai.response.finish_reasons": self.finish_reasons,
            "gen_ai.server.request.duration": now - self.started,
        }
        if first_token_at is not None:
            attributes["gen_ai.server.time_to_first_token"] = first_token_at - self.started
        self.root.set_attributes(attributes)

    def fail(self, error: BaseException) -> None:
        mark_failed(self.root, error)
        self.failed = True


def traced_instrument(inner: Instrument) -> Instrument:
    """``inner`` (the metrics' instrument), recording each generation of a traced request on its
    span and handing the span's ``traceparent`` to the worker."""

    def instrument(
        model: ServedModel, request: GenerationRequest, context: RequestContext | None
    ) -> AsyncGenerator[GenerationEvent, None]:
        trace = context.trace if context is not None else None
        if not isinstance(trace, HttpTrace):  # an untraced path: as it is
            return inner(model, request, context)
        return _traced(inner, trace, model, request, context)

    return instrument


async def _traced(
    inner: Instrument,
    trace: HttpTrace,
    model: ServedModel,
    request: GenerationRequest,
    context: RequestContext | None,
) -> AsyncGenerator[GenerationEvent, None]:
    trace.generation(model.name, request)
    if trace.traceparent is not None:
        request = dataclasses.replace(request, traceparent=trace.traceparent)
    first_token_at: float | None = None
    events = inner(model, request, context)
    try:
        async for event in events:
            if first_token_at is None and isinstance(event, Token):
                first_token_at = time.monotonic()
            elif isinstance(event, Finished):
                trace.finished(event, first_token_at)
            yield event
    except Exception as exc:
        trace.fail(exc)
        raise
    finally:
        await events.aclose()


class TracingMiddleware(HttpMiddleware):
    """A SERVER span around every HTTP request but ``UNTRACED``'s; inside the request context's
    middleware (it puts its ``HttpTrace`` on the context), outside the error boundary (it sees the
    status the client gets)."""

    def __init__(self, app: ASGIApp, tracer: Tracer) -> None:
        super().__init__(app)
        self.tracer = tracer

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        context = context_of(scope)
        path = scope["path"]
        if path in UNTRACED or context is None:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        carrier = {
            name: headers[name.encode()].decode("latin-1")
            for name in ("traceparent", "tracestate")
            if name.encode() in headers
        }
        method = scope["method"]
        root = self.tracer.start_span(
            f"{method} {path}",
            context=PROPAGATOR.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path, "url.scheme": scope["scheme"]},
        )
        trace = HttpTrace(self.tracer, root)
        context.trace = trace
        status = 500  # unless a response starts

        def started(message: Message) -> None:
            nonlocal status
            status = message["status"]

        try:
            await self.app(scope, receive, on_response_start(send, started))
        except Exception as exc:
            trace.fail(exc)
            raise
        finally:
            route = getattr(scope.get("route"), "path", None)
            if route is not None:
                root.set_attribute("http.route", route)
                if not trace.named:
                    root.update_name(f"{method} {route}")
            root.set_attribute("http.response.status_code", status)
            if status >= 400 and not trace.failed:
                root.set_attribute("error.type", str(status))
                if status >= 500:
                    root.set_status(Status(StatusCode.ERROR))
            root.end()
