"""The worker's span around one generation in its engine: the trace's span from another process.

Invariant: a worker traces a request only when it came with a ``traceparent`` (the server traced it:
``GenerationRequest.traceparent``) and this process traces (``telemetry``: the same environment as
the server's); an untraced request costs one ``None`` test and no wrapper, and OpenTelemetry is
imported only in a worker that traces (at load, ``rank_server``). The engine gets the span's own
``traceparent`` to hang its spans under (vLLM's ``llm_request``). Standard library only at import:
this module runs in worker processes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING

from lmi_core import telemetry
from lmi_core.engine import Finished, GenerationEvent, GenerationRequest, Token

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

WORKER_SPAN = "lmi.worker.generate"


def traced_generation(
    request: GenerationRequest,
    rank: int,
    run: Callable[[GenerationRequest], AsyncGenerator[GenerationEvent, None]],
) -> AsyncGenerator[GenerationEvent, None]:
    """``run(request)``, inside a ``lmi.worker.generate`` span under the request's ``traceparent``
    when it has one and this worker traces; the engine gets the span's own ``traceparent`` to hang its
    spans under. Untraced: ``run(request)`` itself, no wrapper."""
    if request.traceparent is None:
        return run(request)
    worker_tracer = telemetry.tracer("worker")
    if worker_tracer is None:
        return run(dataclasses.replace(request, traceparent=None))
    return _generate_in_span(worker_tracer, request, rank, run)


async def _generate_in_span(
    worker_tracer: Tracer,
    request: GenerationRequest,
    rank: int,
    run: Callable[[GenerationRequest], AsyncGenerator[GenerationEvent, None]],
) -> AsyncGenerator[GenerationEvent, None]:
    from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    propagator = TraceContextTextMapPropagator()
    parent = propagator.extract({"traceparent": request.traceparent or ""})
    span = worker_tracer.start_span(
        WORKER_SPAN,
        context=parent,
        kind=SpanKind.INTERNAL,
        attributes={"lmi.rank": rank, "gen_ai.request.id": request.request_id},
    )
    if request.resume_ids:  # moved here from a worker that failed under it
        span.add_event("migrated", {"lmi.resumed_tokens": len(request.resume_ids)})
    carrier: dict[str, str] = {}
    propagator.inject(carrier, context=set_span_in_context(span))
    events = run(dataclasses.replace(request, traceparent=carrier.get("traceparent")))
    first = True
    try:
        async for event in events:
            if first and isinstance(event, Token):
                first = False
                span.add_event("first_token")
            elif isinstance(event, Finished):
                span.set_attributes(
                    {
                        "gen_ai.usage.input_tokens": event.prompt_tokens,
                        "gen_ai.usage.output_tokens": event.generated_tokens,
                        "gen_ai.response.finish_reasons": [event.finish_reason],
                    }
                )
            yield event
    except Exception as exc:
        span.set_status(Status(StatusCode.ERROR, str(exc)))
        span.set_attribute("error.type", type(exc).__name__)
        raise
    finally:
        await events.aclose()
        span.end()
