"""An example engine plugin: answers with the prompt's words, one token per word.

Everything a third-party engine needs: a backend name and a loader that returns an
``lmi_core.Engine`` (``generate``, ``stats``, ``shutdown``); lmi-core's built-in worker hooks run its
requests. Installed with ``pip install``, it is found through the ``lmi`` entry-point group; select
it with ``option.backend=echo``.
"""

from __future__ import annotations

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


class EchoEngine:
    def __init__(self, context: WorkerContext) -> None:
        self.prefix = context.options.get("echo_prefix", "")
        self.requests = RequestCounts()

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        return self.requests.relay(self._echo(request))

    async def _echo(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        words = [*self.prefix.split(), *(request.prompt or "").split()][: request.params.max_new_tokens]
        for i, word in enumerate(words):
            yield Token(id=i, text=(" " if i else "") + word, log_prob=0.0, last=i == len(words) - 1)
        yield Finished("length", len(words), len(words), request.prompt or "")

    def stats(self) -> EngineStats:
        return self.requests.stats()

    def shutdown(self) -> None:
        pass


@hookimpl
def register_backends() -> list[BackendSpec]:
    return [BackendSpec(name="echo", default_mode="python", description="echoes the prompt")]


@hookimpl
def load_engine(context: WorkerContext) -> EchoEngine | None:
    return EchoEngine(context) if context.backend == "echo" else None
