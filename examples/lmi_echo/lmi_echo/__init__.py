"""An example engine plugin: answers with the prompt's words, one token per word.

Everything a third-party engine needs: a backend name, a loader and a request handler. Installed
with ``pip install``, it is found through the ``lmi`` entry-point group; select it with
``option.backend=echo``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from lmi_core import hookimpl
from lmi_core.backends import BackendSpec
from lmi_core.engine import EngineStats, Finished, GenerationEvent, GenerationRequest, Token, WorkerContext


class EchoEngine:
    def __init__(self, context: WorkerContext) -> None:
        self.prefix = context.options.get("echo_prefix", "")
        self.stats = EngineStats()


@hookimpl
def register_backends() -> list[BackendSpec]:
    return [BackendSpec(name="echo", default_mode="python", description="echoes the prompt")]


@hookimpl
def load_engine(context: WorkerContext) -> EchoEngine | None:
    return EchoEngine(context) if context.backend == "echo" else None


async def _echo(engine: EchoEngine, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
    words = [*engine.prefix.split(), *(request.prompt or "").split()][: request.params.max_new_tokens]
    for i, word in enumerate(words):
        yield Token(id=i, text=(" " if i else "") + word, log_prob=0.0, last=i == len(words) - 1)
    engine.stats.finished_total += 1
    yield Finished("length", len(words), len(words), request.prompt or "")


@hookimpl
def handle_request(engine: Any, request: GenerationRequest) -> AsyncIterator[GenerationEvent] | None:
    return _echo(engine, request) if isinstance(engine, EchoEngine) else None


@hookimpl
def engine_stats(engine: Any) -> EngineStats | None:
    return engine.stats if isinstance(engine, EchoEngine) else None
