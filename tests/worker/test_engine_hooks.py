"""The built-in worker hooks drive any ``Engine``; a plugin's own hook still wins; ``RequestCounts``."""

from __future__ import annotations

import asyncio
import importlib
import sys
from collections.abc import AsyncGenerator
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy
import pytest

from lmi_core import (
    EngineError,
    EngineStats,
    Finished,
    GenerationEvent,
    GenerationRequest,
    RequestCounts,
    Token,
    WorkerContext,
    hookimpl,
)
from lmi_core.plugins import new_plugin_manager

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lmi_echo"


def echo_plugin() -> ModuleType:
    """The example plugin from its source directory (tests/test_third_party_plugin.py installs it)."""
    if str(EXAMPLE) not in sys.path:
        sys.path.append(str(EXAMPLE))
    return importlib.import_module("lmi_echo")


def echo_manager(*extra: object) -> pluggy.PluginManager:
    pm = new_plugin_manager(load_entry_points=False)
    pm.register(echo_plugin(), name="echo")
    for plugin in extra:
        pm.register(plugin)
    return pm


def echo_engine(pm: pluggy.PluginManager) -> Any:
    context = WorkerContext(model_id="none", model_dir=None, backend="echo", options={})
    return pm.hook.load_engine(context=context)


async def texts(events: AsyncGenerator[GenerationEvent, None]) -> list[str]:
    return [e.text if isinstance(e, Token) else e.finish_reason async for e in events]


async def test_a_two_hook_plugin_is_served_by_the_built_in_hooks() -> None:
    pm = echo_manager()
    engine = echo_engine(pm)
    events = pm.hook.handle_request(engine=engine, request=GenerationRequest("r", prompt="a b"))
    assert await texts(events) == ["a", " b", "length"]
    assert pm.hook.engine_stats(engine=engine) == EngineStats(finished_total=1)
    pm.hook.shutdown_engine(engine=engine)


class Override:
    """A plugin that runs the requests of engines with a ``shout`` attribute itself."""

    @hookimpl
    def handle_request(
        self, engine: Any, request: GenerationRequest
    ) -> AsyncGenerator[GenerationEvent, None] | None:
        return self._shout(request) if getattr(engine, "shout", False) else None

    async def _shout(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        yield Token(0, (request.prompt or "").upper(), None, last=True)
        yield Finished("length", 1, 1)


async def test_a_plugins_own_handle_request_wins_and_none_falls_through() -> None:
    pm = echo_manager(Override())
    engine = echo_engine(pm)
    request = GenerationRequest("r", prompt="a b")
    assert await texts(pm.hook.handle_request(engine=engine, request=request)) == ["a", " b", "length"]
    engine.shout = True
    assert await texts(pm.hook.handle_request(engine=engine, request=request)) == ["A B", "length"]


async def test_every_shutdown_runs_the_engines_own_last() -> None:
    calls: list[str] = []

    class Recorder:
        @hookimpl
        def shutdown_engine(self, engine: Any) -> None:
            calls.append("plugin")

    pm = echo_manager(Recorder())
    engine = echo_engine(pm)
    engine.shutdown = lambda: calls.append("engine")
    pm.hook.shutdown_engine(engine=engine)
    assert calls == ["plugin", "engine"]


# -- RequestCounts ---------------------------------------------------------------------------------


class Stream:
    """A request's events; records whether its generator was closed (the engine frees it there)."""

    def __init__(self, tokens: int, fail: bool = False) -> None:
        self.tokens = tokens
        self.fail = fail
        self.closed = False

    async def events(self) -> AsyncGenerator[GenerationEvent, None]:
        try:
            for i in range(self.tokens):
                yield Token(i, "x", None)
                await asyncio.sleep(0)
            if self.fail:
                raise EngineError("engine broke")
            yield Finished("length", 1, self.tokens)
        finally:
            self.closed = True


async def test_request_counts_count_each_request_once_by_how_it_ended() -> None:
    counts = RequestCounts()
    done = Stream(2)
    assert len([e async for e in counts.relay(done.events())]) == 3
    assert (counts.in_flight, counts.finished_total, counts.cancelled_total) == (0, 1, 0)

    early = Stream(100)
    relay = counts.relay(early.events())
    await anext(relay)
    assert counts.stats() == EngineStats(running=1, finished_total=1)
    await relay.aclose()  # the client left
    assert early.closed and (counts.in_flight, counts.cancelled_total) == (0, 1)

    broken = Stream(1, fail=True)
    with pytest.raises(EngineError):
        _ = [e async for e in counts.relay(broken.events())]
    assert broken.closed and counts.stats() == EngineStats(finished_total=1, cancelled_total=2)


async def test_a_cancelled_task_closes_the_relayed_stream() -> None:
    counts = RequestCounts()
    stream = Stream(10**6)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in counts.relay(stream.events()):
            first.set()

    task = asyncio.ensure_future(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stream.closed and counts.stats() == EngineStats(cancelled_total=1)


# -- start_engine: a LoopEngine starts on the worker's loop before "loaded" --------------------------


class LoopBound:
    """An engine that starts on a loop and serves only from that one; its start may fail."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.loop: asyncio.AbstractEventLoop | None = None
        self.shut_down = False

    async def start_on_loop(self) -> None:
        await asyncio.sleep(0)
        if self.fail:
            raise RuntimeError("warmup failed")
        self.loop = asyncio.get_running_loop()

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        assert self.loop is asyncio.get_running_loop()
        yield Finished("length", 1, 0)

    def stats(self) -> EngineStats:
        return EngineStats()

    def shutdown(self) -> None:
        self.shut_down = True


class LoopBoundPlugin:
    def __init__(self, engine: LoopBound) -> None:
        self.engine = engine

    @hookimpl
    def load_engine(self, context: WorkerContext) -> LoopBound:
        assert not _loop_running()  # in the load thread
        return self.engine


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def init(engine: LoopBound) -> tuple[Any, list[Any]]:
    """A ``RankServer`` that loaded ``engine`` (``init``), and the messages it sent."""
    from lmi_core.worker import wire
    from lmi_core.worker.rank_server import RankServer

    pm = new_plugin_manager(load_entry_points=False)
    pm.register(LoopBoundPlugin(engine))
    worker = RankServer(0, pm)
    sent: list[wire.WorkerMessage] = []
    worker.send = sent.append  # type: ignore[method-assign]
    await worker.on_init(
        wire.Init(WorkerContext(model_id="none", model_dir=None, backend="loop", options={}))
    )
    return worker, sent


@pytest.mark.parametrize("fail", [False, True])
async def test_the_worker_starts_a_loop_engine_on_its_loop_before_it_reports_loaded(fail: bool) -> None:
    from lmi_core.worker import wire

    engine = LoopBound(fail)
    worker, sent = await init(engine)
    if fail:  # the load fails with the start's error, and the engine is released
        assert len(sent) == 1 and isinstance(sent[0], wire.Err) and sent[0].id is None
        assert "warmup failed" in str(sent[0].error)
        assert worker.engine is None and engine.shut_down
    else:
        assert sent == [wire.Loaded(0, None)]  # an engine without max_model_len does not report one
        assert engine.loop is asyncio.get_running_loop() and worker.engine is engine


class KnowsItsContext(LoopBound):
    """A ``ContextEngine``."""

    def __init__(self) -> None:
        super().__init__(fail=False)
        self.max_model_len = 321


async def test_the_loaded_message_carries_the_engines_context_length() -> None:
    from lmi_core.engine import ContextEngine
    from lmi_core.worker import wire

    assert isinstance(KnowsItsContext(), ContextEngine) and not isinstance(LoopBound(False), ContextEngine)
    _, sent = await init(KnowsItsContext())
    assert sent == [wire.Loaded(0, 321)]


class KnowsItsInputLimits(KnowsItsContext):
    """An ``InputLimitEngine`` too."""

    def __init__(self) -> None:
        super().__init__()
        self.max_input_length = 300
        self.max_token_bytes = 17


async def test_the_loaded_message_carries_the_engines_input_limits() -> None:
    from lmi_core.engine import InputLimitEngine
    from lmi_core.worker import wire

    assert isinstance(KnowsItsInputLimits(), InputLimitEngine)
    assert not isinstance(KnowsItsContext(), InputLimitEngine)
    _, sent = await init(KnowsItsInputLimits())
    assert sent == [wire.Loaded(0, 321, 300, 17)]
