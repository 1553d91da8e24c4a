"""The built-in worker hooks: start engines on the worker's loop, run requests, read stats, manage
LoRA adapters, answer operations and shut down through the ``Engine`` protocol (``LoopEngine`` for
the start, ``AdapterEngine`` for adapters, ``TokenizerEngine`` for tokenize and detokenize,
``PoolingEngine`` for embed and score, ``HandlerEngine`` for a ``handle(inputs)`` model's requests); a
model's custom formatters run here for every engine (``lmi_core.custom_code``), with the engine's
``tokenizer`` attribute where it has one.

Registered ``trylast`` in ``DEFAULT_PLUGINS`` (datasette's pattern), so every engine that
``load_engine`` returns is driven by these hooks unless a plugin implements one itself: a plugin's
``handle_request``, ``handle_operation``, ``engine_stats``, ``load_adapter`` or ``unload_adapter`` that
returns a value wins (all are ``firstresult``); an engine that is not an ``AdapterEngine`` refuses
adapters with a 400, one without an operation's protocol refuses it with a 501;
every ``shutdown_engine`` runs, a plugin's before this one. A backend plugin therefore needs only
``register_backends`` and ``load_engine``. Standard library and pluggy only (worker side).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable
from typing import Any

from lmi_core import custom_code
from lmi_core.engine import (
    AdapterEngine,
    Engine,
    EngineStats,
    GenerationEvent,
    GenerationRequest,
    LoopEngine,
    LoraAdapter,
)
from lmi_core.errors import EngineError
from lmi_core.hookspecs import hookimpl
from lmi_core.operations import (
    Detokenize,
    Embed,
    FormatInput,
    FormatOutput,
    FormattedInput,
    HandlerEngine,
    Invoke,
    Operation,
    PoolingEngine,
    Score,
    Sleep,
    SleepEngine,
    Tokenize,
    TokenizerEngine,
    WakeUp,
)


def no_adapters(engine: Engine, name: str) -> EngineError:
    return EngineError(
        f"LoRA adapter {name!r}: this backend ({type(engine).__name__}) does not serve LoRA adapters",
        status=400,
    )


@hookimpl(trylast=True)
def start_engine(engine: Engine) -> Awaitable[None] | None:
    return engine.start_on_loop() if isinstance(engine, LoopEngine) else None


@hookimpl(trylast=True)
def handle_request(engine: Engine, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
    if request.adapter is not None and not isinstance(engine, AdapterEngine):
        raise no_adapters(engine, request.adapter.name)
    return engine.generate(request)


@hookimpl(trylast=True)
def handle_operation(engine: Engine, operation: Operation[Any]) -> Awaitable[Any]:
    if isinstance(operation, Tokenize) and isinstance(engine, TokenizerEngine):
        return engine.tokenize(operation)
    if isinstance(operation, Detokenize) and isinstance(engine, TokenizerEngine):
        return engine.detokenize(operation.ids)
    if isinstance(operation, Sleep) and isinstance(engine, SleepEngine):
        return engine.sleep(operation.level)
    if isinstance(operation, WakeUp) and isinstance(engine, SleepEngine):
        return engine.wake_up()
    if isinstance(operation, Embed) and isinstance(engine, PoolingEngine):
        return engine.embed(operation)
    if isinstance(operation, Score) and isinstance(engine, PoolingEngine):
        return engine.score(operation)
    if isinstance(operation, Invoke) and isinstance(engine, HandlerEngine):
        return engine.invoke(operation)
    if isinstance(operation, FormatInput):
        return format_input(engine, operation)
    if isinstance(operation, FormatOutput):  # off the loop: a formatter is the user's code
        return asyncio.to_thread(custom_code.format_output, operation.code, operation.data)
    message = f"this backend ({type(engine).__name__}) does not {operation.op}"
    raise EngineError(message, status=501, type="NotImplemented")


async def format_input(engine: Engine, operation: FormatInput) -> FormattedInput:
    """The custom input formatter, off the loop, with the engine's ``tokenizer`` (None without one)."""
    tokenizer = getattr(engine, "tokenizer", None)
    payload, output = await asyncio.to_thread(
        custom_code.format_input, operation.code, operation.payload, tokenizer
    )
    return FormattedInput(payload, output)


@hookimpl(trylast=True)
def load_adapter(engine: Engine, adapter: LoraAdapter) -> Awaitable[None]:
    if not isinstance(engine, AdapterEngine):
        raise no_adapters(engine, adapter.name)
    return engine.load_adapter(adapter)


@hookimpl(trylast=True)
def unload_adapter(engine: Engine, name: str) -> Awaitable[None]:
    if not isinstance(engine, AdapterEngine):
        raise no_adapters(engine, name)
    return engine.unload_adapter(name)


@hookimpl(trylast=True)
def engine_stats(engine: Engine) -> EngineStats:
    return engine.stats()


@hookimpl(trylast=True)
def shutdown_engine(engine: Engine) -> None:
    engine.shutdown()
