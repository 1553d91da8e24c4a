"""A synthetic engine plugin that yields tokens as fast as it can: measures the stack, not a model.

Load it with ``LMI_EXTRA_PLUGINS=benchmarks.synthetic_engine`` and ``option.backend=synthetic``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from lmi_core import hookimpl
from lmi_core.backends import BackendSpec
from lmi_core.engine import EngineStats, Finished, GenerationEvent, GenerationRequest, Token, WorkerContext

NAME = "synthetic"


class SyntheticEngine:
    def __init__(self) -> None:
        self.stats = EngineStats()


@hookimpl
def register_backends() -> list[BackendSpec]:
    return [BackendSpec(name=NAME, rolling_batch=(NAME,), auto_priority=1000)]


@hookimpl
def load_engine(context: WorkerContext) -> SyntheticEngine | None:
    return SyntheticEngine() if context.backend == NAME else None


async def _generate(engine: SyntheticEngine, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
    count = request.params.max_new_tokens
    for i in range(count):
        yield Token(id=i % 100, text=" tok", log_prob=-1.0, last=i == count - 1)
        if i % 16 == 15:
            await asyncio.sleep(0)  # let other requests and pings in, as a real engine would
    engine.stats.finished_total += 1
    yield Finished("length", 1, count, request.prompt or "")


@hookimpl
def handle_request(engine: Any, request: GenerationRequest) -> AsyncIterator[GenerationEvent] | None:
    return _generate(engine, request) if isinstance(engine, SyntheticEngine) else None


@hookimpl
def engine_stats(engine: Any) -> EngineStats | None:
    return engine.stats if isinstance(engine, SyntheticEngine) else None
