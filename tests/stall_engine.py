"""A test engine plugin (``option.backend=stall``) whose behaviour the prompt chooses.

``stall``: one token, then it stops yielding for ever while the worker keeps answering pings (a
wedged engine: a hung all-reduce, a stuck kernel), unless the request is resumed (it migrated: the
next worker is healthy); ``wedged``: the same, resumed or not. ``slow``: a token every 50 ms.
Anything else: ``max_new_tokens`` tokens at once. Token ``i`` is `` t<i>``; a resumed request
continues after its ``resume_ids``. Load it with ``LMI_EXTRA_PLUGINS=tests.stall_engine``.
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

NAME = "stall"
SLOW_INTERVAL = 0.05


class StallEngine:
    def __init__(self) -> None:
        self.requests = RequestCounts()

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        return self.requests.relay(self._tokens(request))

    async def _tokens(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        prompt = request.prompt or ""
        count = request.params.max_new_tokens
        stalls = prompt == "wedged" or (prompt == "stall" and not request.resume_ids)
        for i in range(len(request.resume_ids), count):
            yield Token(id=i, text=f" t{i}", log_prob=-1.0, last=i == count - 1)
            if stalls:
                await asyncio.Event().wait()  # never set: no more tokens, pings still answered
            await asyncio.sleep(SLOW_INTERVAL if prompt == "slow" else 0)
        yield Finished("length", 1, count, prompt)

    def stats(self) -> EngineStats:
        return self.requests.stats()

    def shutdown(self) -> None:
        pass


@hookimpl
def register_backends() -> list[BackendSpec]:
    return [BackendSpec(name=NAME, rolling_batch=(NAME,), auto_priority=1000, resumes_streams=True)]


@hookimpl
def load_engine(context: WorkerContext) -> StallEngine | None:
    return StallEngine() if context.backend == NAME else None
