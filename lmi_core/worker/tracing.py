"""The worker's span around one generation in its engine: the trace's span from another process.

Invariant: a worker traces a request only when it came with a ``traceparent`` (the server traced it:
``GenerationRequest.traceparent``) and this process traces (``telemetry``: the same environment as
the server's); an untraced request costs one ``None`` test and no wrapper, and OpenTelemetry is
imported only in a worker that traces (at load, ``rank_server``). The span is recorded whole when the
generation ends (``otel.SpanSink``); the engine gets the span's own ``traceparent`` to hang its spans
under (vLLM's ``llm_request``). Standard library only at import: this module runs in worker processes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any

from lmi_core import telemetry
from lmi_core.engine import Finished, GenerationEvent, GenerationRequest, Token

if TYPE_CHECKING:
    from lmi_core.otel import SpanSink

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
    sink = telemetry.span_sink("worker")
    if sink is None:
        return run(dataclasses.replace(request, traceparent=None))
    return generate_in_span(sink, request, rank, run)


async def generate_in_span(
    sink: SpanSink,
    request: GenerationRequest,
    rank: int,
    run: Callable[[GenerationRequest], AsyncGenerator[GenerationEvent, None]],
) -> AsyncGenerator[GenerationEvent, None]:
    """``run(request)`` in a ``lmi.worker.generate`` span of ``sink`` under the request's
    ``traceparent``, recorded when the generation ends (``traced_generation``'s traced case)."""
    from opentelemetry.sdk.trace import Event

    from lmi_core.otel import UNSET, failed, parent_context, traceparent_of

    parent = parent_context(request.traceparent)
    context = sink.start(WORKER_SPAN, parent)
    start_ns = time.time_ns()
    attributes: dict[str, Any] = {"lmi.rank": rank, "gen_ai.request.id": request.request_id}
    events: list[Event] = []
    if request.resume_ids:  # moved here from a worker that failed under it
        events.append(Event("migrated", {"lmi.resumed_tokens": len(request.resume_ids)}, start_ns))
    status = UNSET
    generation = run(dataclasses.replace(request, traceparent=traceparent_of(context)))
    first = True
    try:
        async for event in generation:
            if first and isinstance(event, Token):
                first = False
                events.append(Event("first_token", timestamp=time.time_ns()))
            elif isinstance(event, Finished):
                attributes["gen_ai.usage.input_tokens"] = event.prompt_tokens
                attributes["gen_ai.usage.output_tokens"] = event.generated_tokens
                attributes["gen_ai.response.finish_reasons"] = (event.finish_reason,)
            yield event
    except Exception as exc:
        status, error_type = failed(exc)
        attributes.update(error_type)
        raise
    finally:
        await generation.aclose()
        end_ns = time.time_ns()
        sink.record(WORKER_SPAN, context, parent, start_ns, end_ns, attributes, events=events, status=status)
