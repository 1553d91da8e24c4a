"""Traces of HTTP requests: one SERVER span per request, with OpenTelemetry's GenAI attributes.

Invariant: this module is imported only when tracing is on (``telemetry.span_sink("server")`` is
not None; ``app.create_app`` decides), so a server that does not trace never imports OpenTelemetry.
Then every HTTP request but the probes and the scrape gets one SERVER span, parented from its W3C
``traceparent`` (and ``tracestate``) header when it has one, and its ``RequestContext`` gets the
``HttpTrace`` that the pool's spans (``lmi.queue``, ``lmi.route``, ``lmi.migration``) hang under. A
generation's request carries the span's ``traceparent`` to the worker (``GenerationRequest``), whose
``lmi.worker.generate`` span is its child. The span is named ``{operation} {model}`` (``chat demo``)
once a generation starts, else ``{method} {route}``; it ends when the response's last byte is sent,
and is recorded then, whole (``otel.SpanSink``: no live span object per request).
A failed generation, or a 5xx, sets its status to ERROR and ``error.type``; a 4xx sets ``error.type``
only (OpenTelemetry's HTTP server rule: the client's error, not the server's).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from opentelemetry.trace import SpanContext, SpanKind
from opentelemetry.trace.status import Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmi_core.engine import Finished, GenerationRequest
from lmi_core.http.common import HttpMiddleware, on_response_start
from lmi_core.http.context import context_of
from lmi_core.http.openai_render import FINISH_REASONS
from lmi_core.otel import UNSET, SpanSink, failed, parent_context, traceparent_of
from lmi_core.serving.request_trace import Attributes

# Probes and scrapes come every few seconds (the endpoint picker's every 50 ms): not traced.
UNTRACED = frozenset({"/metrics", "/ping", "/health", "/live"})


class HttpTrace:
    """One traced HTTP request: its SERVER span, recorded when the response ends, and what its
    generations add to it (the ``serving.request_trace.RequestTrace`` the pool records into)."""

    def __init__(
        self, sink: SpanSink, name: str, parent: SpanContext | None, attributes: dict[str, Any]
    ) -> None:
        self.sink = sink
        self.name = name
        self.parent = parent
        self.context = sink.start(name, parent, SpanKind.SERVER)
        self.traceparent = traceparent_of(self.context)  # the worker's parent (sampled or not)
        self.attributes = attributes
        self.start_ns = time.time_ns()
        self.started = time.monotonic()
        self.named = False
        self.status = UNSET
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
        status = UNSET
        if error is not None:
            status, error_type = failed(error)
            attributes = {**attributes, **error_type}
        context = self.sink.child(self.context)
        self.sink.record(name, context, self.context, start_ns, end_ns, attributes, status=status)

    def generation(self, model: str, request: GenerationRequest) -> GenerationRequest:
        """A generation of this request starts on ``model`` (n > 1 choices: one each): ``request``
        carrying this span's ``traceparent`` to the worker."""
        operation = "chat" if request.messages is not None else "text_completion"
        if not self.named:
            self.name = f"{operation} {model}"
            self.named = True
        params = request.params
        attributes = self.attributes
        attributes["gen_ai.operation.name"] = operation
        attributes["gen_ai.request.model"] = model
        attributes["gen_ai.request.max_tokens"] = params.max_new_tokens
        if not params.greedy:
            attributes["gen_ai.request.temperature"] = params.temperature
            attributes["gen_ai.request.top_p"] = params.top_p
        if params.seed is not None:
            attributes["gen_ai.request.seed"] = params.seed
        if request.adapter is not None:
            attributes["lmi.lora_adapter"] = request.adapter.name
        return dataclasses.replace(request, traceparent=self.traceparent)

    def finished(self, event: Finished, first_token_at: float | None) -> None:
        """A generation finished: usage (summed over choices), finish reasons, TTFT and duration
        (``first_token_at``: ``time.monotonic()`` of its first token)."""
        self.output_tokens += event.generated_tokens
        self.finish_reasons.append(FINISH_REASONS.get(event.finish_reason, event.finish_reason))
        attributes = self.attributes
        attributes["gen_ai.usage.input_tokens"] = event.prompt_tokens
        attributes["gen_ai.usage.output_tokens"] = self.output_tokens
        attributes["gen_ai.response.finish_reasons"] = tuple(self.finish_reasons)
        attributes["gen_ai.server.request.duration"] = time.monotonic() - self.started
        if first_token_at is not None:
            attributes["gen_ai.server.time_to_first_token"] = first_token_at - self.started

    def fail(self, error: BaseException) -> None:
        self.status, error_type = failed(error)
        self.attributes.update(error_type)

    @property
    def failed(self) -> bool:
        return self.status is not UNSET

    def end(self) -> None:
        """The response's last byte is sent: the SERVER span is over."""
        self.sink.record(
            self.name, self.context, self.parent, self.start_ns, time.time_ns(), self.attributes,
            kind=SpanKind.SERVER, status=self.status,
        )  # fmt: skip


class TracingMiddleware(HttpMiddleware):
    """A SERVER span around every HTTP request but ``UNTRACED``'s; inside the request context's
    middleware (it puts its ``HttpTrace`` on the context), outside the error boundary (it sees the
    status the client gets)."""

    def __init__(self, app: ASGIApp, sink: SpanSink) -> None:
        super().__init__(app)
        self.sink = sink

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        context = context_of(scope)
        path = scope["path"]
        if path in UNTRACED or context is None:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        traceparent, tracestate = headers.get(b"traceparent"), headers.get(b"tracestate")
        parent = parent_context(
            traceparent.decode("latin-1") if traceparent else None,
            tracestate.decode("latin-1") if tracestate else None,
        )
        method = scope["method"]
        attributes = {"http.request.method": method, "url.path": path, "url.scheme": scope["scheme"]}
        trace = HttpTrace(self.sink, f"{method} {path}", parent, attributes)
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
                attributes["http.route"] = route
                if not trace.named:
                    trace.name = f"{method} {route}"
            attributes["http.response.status_code"] = status
            if status >= 400 and not trace.failed:
                attributes["error.type"] = str(status)
                if status >= 500:
                    trace.status = Status(StatusCode.ERROR)
            trace.end()
