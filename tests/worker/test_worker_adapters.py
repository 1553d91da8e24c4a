"""LoRA adapters on the worker side: the built-in ``load_adapter`` / ``unload_adapter`` hooks forward to an
``AdapterEngine`` and refuse other engines with a 400, and ``RankServer`` runs ``adapter`` messages in tasks
that never hold up the loop (pings and requests go on while an adapter loads)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from lmi_core.engine import (
    AdapterEngine,
    EngineStats,
    Finished,
    GenerationEvent,
    GenerationRequest,
    LoraAdapter,
    SamplingParams,
    Token,
)
from lmi_core.errors import EngineError
from lmi_core.plugins import new_plugin_manager
from lmi_core.worker import wire
from lmi_core.worker.rank_server import RankServer


class PlainEngine:
    """An engine without adapters: one token per request."""

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        yield Token(1, "x", None, last=True)
        yield Finished("length", 1, 1)

    def stats(self) -> EngineStats:
        return EngineStats()

    def shutdown(self) -> None:
        pass


class LoraEngine(PlainEngine):
    """A unit-test double of an ``AdapterEngine``: a load waits for ``release`` (a slow read)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls: list[tuple[str, str]] = []

    async def load_adapter(self, adapter: LoraAdapter) -> None:
        self.calls.append(("load", adapter.name))
        await self.release.wait()
        self.calls.append(("loaded", adapter.name))

    async def unload_adapter(self, name: str) -> None:
        self.calls.append(("unload", name))


ADAPTER = LoraAdapter("a", "/adapters/a")


def test_the_protocol_tells_the_engines_apart() -> None:
    assert isinstance(LoraEngine(), AdapterEngine)
    assert not isinstance(PlainEngine(), AdapterEngine)


async def test_the_built_in_hooks_forward_to_an_adapter_engine() -> None:
    pm = new_plugin_manager(load_entry_points=False)
    engine = LoraEngine()
    engine.release.set()
    await pm.hook.load_adapter(engine=engine, adapter=ADAPTER)
    await pm.hook.unload_adapter(engine=engine, name="a")
    assert engine.calls == [("load", "a"), ("loaded", "a"), ("unload", "a")]


def test_an_engine_without_adapters_refuses_them_with_a_400() -> None:
    pm = new_plugin_manager(load_entry_points=False)
    engine = PlainEngine()
    for call in (
        lambda: pm.hook.load_adapter(engine=engine, adapter=ADAPTER),
        lambda: pm.hook.unload_adapter(engine=engine, name="a"),
        lambda: pm.hook.handle_request(engine=engine, request=GenerationRequest("r", "x", adapter=ADAPTER)),
    ):
        with pytest.raises(EngineError) as info:
            call()
        assert info.value.status == 400
        assert "'a'" in str(info.value) and "does not serve LoRA adapters" in str(info.value)


_serving: set[asyncio.Task[None]] = set()


async def started(engine: Any) -> tuple[RankServer, asyncio.StreamReader, asyncio.StreamWriter]:
    ours, theirs = socket.socketpair()
    worker = RankServer(0, new_plugin_manager(load_entry_points=False))
    worker.engine = engine
    worker_reader, worker_writer = await asyncio.open_connection(sock=theirs)
    task = asyncio.get_running_loop().create_task(worker.serve(worker_reader, worker_writer))
    _serving.add(task)
    task.add_done_callback(_serving.discard)
    reader, writer = await asyncio.open_connection(sock=ours)
    return worker, reader, writer


def adapter_message(op: wire.AdapterOp, adapter: LoraAdapter = ADAPTER) -> bytes:
    return wire.Adapter(op, adapter).to_frame()


async def next_message(reader: asyncio.StreamReader) -> wire.Message:
    message = await asyncio.wait_for(wire.read_message(reader), 5)
    assert message is not None
    return message


async def test_a_slow_load_runs_in_a_task_while_pings_and_requests_are_answered() -> None:
    engine = LoraEngine()
    worker, reader, writer = await started(engine)
    writer.write(adapter_message("load"))
    writer.write(wire.Ping(1).to_frame())
    request = GenerationRequest("r", "x", params=SamplingParams(max_new_tokens=1))
    writer.write(wire.Req("r", request).to_frame())
    kinds = [(await next_message(reader)).t for _ in range(3)]
    assert sorted(kinds) == sorted([wire.Pong.t, wire.Toks.t, wire.Done.t])
    assert engine.calls == [("load", "a")] and len(worker.adapter_tasks) == 1  # still loading
    engine.release.set()
    writer.write(adapter_message("unload"))
    while len(engine.calls) < 3:
        await asyncio.sleep(0.01)
    assert engine.calls == [("load", "a"), ("loaded", "a"), ("unload", "a")]
    while worker.adapter_tasks:
        await asyncio.sleep(0.01)


async def test_a_failed_load_is_logged_and_the_worker_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    worker, reader, writer = await started(PlainEngine())
    with caplog.at_level(logging.ERROR, logger="lmi_core.worker"):
        writer.write(adapter_message("load"))
        writer.write(wire.Ping(7).to_frame())
        assert isinstance(await next_message(reader), wire.Pong)
        while worker.adapter_tasks:
            await asyncio.sleep(0.01)
    assert "adapter load failed: EngineError" in caplog.text and "does not serve LoRA" in caplog.text
    # A request for an adapter on this engine: that request's 400, not a crash of the worker.
    writer.write(wire.Req("r", GenerationRequest("r", "x", adapter=ADAPTER)).to_frame())
    error = await next_message(reader)
    assert isinstance(error, wire.Err) and error.id == "r" and error.error.status == 400
