"""A synthetic engine plugin that yields tokens as fast as it can: measures the stack, not a model.

Load it with ``LMI_EXTRA_PLUGINS=benchmarks.synthetic_engine`` and ``option.backend=synthetic``.
``option.token_interval=SECONDS`` makes it an engine of fixed speed instead: each request gets one
token per interval, however many run at once (what a scheduler in front of it sees of a real one,
without its batch-size effects).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from lmi_core import (
    BackendSpec,
    EngineStats,
    Finished,
    GenerationEvent,
    GenerationRequest,
    RequestCounts,
    Token,
    WorkerContext,
    hookimpl,
)

NAME = "synthetic"


class SyntheticEngine:
    def __init__(self, interval: float = 0.0) -> None:
        self.requests = RequestCounts()
        self.interval = interval

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        return self.requests.relay(self._tokens(request))

    async def _tokens(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        count = request.params.max_new_tokens
        for i in range(count):
            if self.interval:
                await asyncio.sleep(self.interval)
            yield Token(id=i % 100, text=" tok", log_prob=-1.0, last=i == count - 1)
            if i % 16 == 15:
                await asyncio.sleep(0)  # let other requests and pings in, as a real engine would
        yield Finished("length", 1, count, request.prompt or "")

    def stats(self) -> EngineStats:
        return self.requests.stats()

    def shutdown(self) -> None:
        pass


@hookimpl
def register_backends() -> list[BackendSpec]:
    return [BackendSpec(name=NAME, rolling_batch=(NAME,), auto_priority=1000)]


@hookimpl
def load_engine(context: WorkerContext) -> SyntheticEngine | None:
    if context.backend != NAME:
        return None
    return SyntheticEngine(float(context.options.get("token_interval", 0)))
