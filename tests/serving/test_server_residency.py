"""``ModelServer``'s residency on fake workers (``tests/serving/test_pool.py``'s: no processes, fast and
deterministic): load on demand, one shared load, eviction by budget, pinned models, idle and
keep_alive unloads, a held model never unloaded. The same with real ``lmi serve`` processes and
demo models: ``tests/test_residency.py``."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from lmi_core.config import ModelConfig, ServerConfig, build_model_config
from lmi_core.engine import Finished, GenerationEvent, GenerationRequest, Token
from lmi_core.errors import ModelNotFoundError, ModelNotReadyError, NoRoomError, QueueTimeoutError
from lmi_core.serving.pool import ModelStatus
from lmi_core.serving.registry import ModelState
from lmi_core.serving.routing import RequestContext
from lmi_core.serving.server import ModelServer
from tests.serving.test_pool import FakeWorker, Recorder, fake_workers, until

__all__ = ["fake_workers"]  # the fake workers stand in for SupervisedWorker in every test here


def config(name: str, **properties: str) -> ModelConfig:
    props = {"option.model_id": f"/models/{name}", "option.rolling_batch": "disable", "maxWorkers": "1"}
    props.update({k.replace("__", "."): v for k, v in properties.items()})
    return build_model_config(props, name=name, environ={})


ON_DEMAND = {"option__load_on_startup": "false"}


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def server(
    tmp_path: Path, recorder: Recorder, request: pytest.FixtureRequest
) -> AsyncIterator[ModelServer]:
    settings: dict[str, Any] = getattr(request, "param", {"max_loaded_models": 1})
    made = ModelServer(ServerConfig(runtime_dir=str(tmp_path), **settings), observe=recorder)
    made._gpus = []  # CPU
    yield made
    FakeWorker.gate.set()
    await made.shutdown()


async def on_demand(server: ModelServer, names: str) -> None:
    """Register one model per letter of ``names``, each to load on its first request."""
    for name in names:
        await server.load(config(name, **ON_DEMAND))


def generate(
    server: ModelServer, name: str, context: RequestContext | None = None
) -> AsyncIterator[GenerationEvent]:
    return server.get(name).generate(GenerationRequest(uuid.uuid4().hex, prompt="hi"), context)


async def answer(server: ModelServer, name: str, keep_alive: float | None = None) -> list[GenerationEvent]:
    return [event async for event in generate(server, name, RequestContext(keep_alive=keep_alive))]


def state(server: ModelServer, name: str) -> ModelState:
    return server.describe(name).residency.state


def events(recorder: Recorder, kind: str) -> list[tuple[str, object]]:
    return [(model, what) for event, model, what in recorder.events if event == kind]


async def test_a_registered_model_is_servable_and_its_first_requests_share_one_load(
    server: ModelServer, recorder: Recorder
) -> None:
    await server.load(config("a", **ON_DEMAND))
    assert state(server, "a") is ModelState.REGISTERED and server.health("a").status is ModelStatus.READY
    assert [m.name for m in server.served()] == ["a"] and server.default("model").name == "a"
    FakeWorker.gate.set()
    first, second = await asyncio.gather(answer(server, "a"), answer(server, "a"))
    assert isinstance(first[-1], Finished) and isinstance(second[-1], Finished)
    assert events(recorder, "model_load") == [("a", "cold")] and len(FakeWorker.created) == 1
    assert state(server, "a") is ModelState.LOADED and server.describe("a").residency.loads == 1


async def test_a_request_counts_its_wait_for_room_in_its_queue_time(
    server: ModelServer, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list[tuple[str, float]] = []
    monkeypatch.setattr(recorder, "queue_time", lambda model, seconds: waits.append((model, seconds)))
    await on_demand(server, "ab")
    stream = generate(server, "a")
    await anext(stream)  # a holds the only room
    waiting = asyncio.ensure_future(answer(server, "b"))
    await until(lambda: state(server, "b") is ModelState.LOADING)
    await asyncio.sleep(0.3)  # b waits for room, before it has a pool to queue in
    FakeWorker.gate.set()
    assert isinstance([e async for e in stream][-1], Finished)
    assert isinstance((await waiting)[-1], Finished)
    assert [seconds >= 0.3 for model, seconds in waits if model == "b"] == [True]  # from its arrival


async def test_a_load_evicts_the_least_recently_used_idle_model_and_waits_for_a_held_one(
    server: ModelServer, recorder: Recorder
) -> None:
    await on_demand(server, "abc")
    FakeWorker.gate.set()
    await answer(server, "a")
    await answer(server, "b")  # evicts a: the budget is one model
    assert events(recorder, "model_unload") == [("a", "evicted")]
    FakeWorker.gate.clear()
    stream = generate(server, "b")
    assert isinstance(await anext(stream), Token)  # b is held by a running stream
    waiting = asyncio.ensure_future(answer(server, "c"))
    await until(lambda: state(server, "c") is ModelState.LOADING)
    assert server.describe("c").residency.waiting == 1 and server.describe("b").residency.in_use == 1
    await asyncio.sleep(0.1)  # time for a wrong eviction to happen: b stays under its stream
    assert state(server, "b") is ModelState.LOADED and not waiting.done()
    FakeWorker.gate.set()
    assert isinstance([e async for e in stream][-1], Finished)  # the stream kept its model to the end
    assert isinstance((await waiting)[-1], Finished)
    assert events(recorder, "model_unload") == [("a", "evicted"), ("b", "evicted")]


@pytest.mark.parametrize("server", [{"max_loaded_models": 1}], indirect=True)
async def test_a_wait_for_room_is_bounded_by_the_queue_deadline(server: ModelServer) -> None:
    await server.load(config("a", **ON_DEMAND))
    await server.load(config("b", option__queue_timeout="0.2", **ON_DEMAND))
    stream = generate(server, "a")
    await anext(stream)  # a is held
    with pytest.raises(QueueTimeoutError, match=r"load of model b finished within option\.queue_timeout"):
        await answer(server, "b")
    FakeWorker.gate.set()
    await stream.aclose()


async def test_a_pinned_model_is_never_evicted_so_a_load_without_room_is_refused_at_once(
    server: ModelServer, recorder: Recorder
) -> None:
    await server.load(config("p", option__pinned="true"))  # loads at registration
    await server.load(config("q", **ON_DEMAND))
    with pytest.raises(NoRoomError, match="max_loaded_models=1 reached; held by p") as refused:
        await answer(server, "q")
    assert refused.value.status == 503  # with Retry-After (a QueueFullError)
    assert state(server, "p") is ModelState.LOADED and state(server, "q") is ModelState.REGISTERED
    assert events(recorder, "model_unload") == []


@pytest.mark.parametrize("server", [{"memory_budget": "500MiB"}], indirect=True)
async def test_the_memory_budget_evicts_by_each_models_footprint(
    server: ModelServer, recorder: Recorder
) -> None:
    # No weights on disk and no process to measure: each holds its estimate, one rank's 300 MiB.
    await on_demand(server, "ab")
    FakeWorker.gate.set()
    await answer(server, "a")
    await answer(server, "b")
    assert events(recorder, "model_unload") == [("a", "evicted")]


async def test_a_failed_load_answers_every_waiter_and_the_model_stays_registered(
    server: ModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    await server.load(config("a", **ON_DEMAND))
    monkeypatch.setattr(FakeWorker, "fail_loads", True)
    outcomes = await asyncio.gather(*(answer(server, "a") for _ in range(3)), return_exceptions=True)
    assert all(isinstance(o, ModelNotReadyError) and "load failed" in str(o) for o in outcomes), outcomes
    await until(lambda: state(server, "a") is ModelState.REGISTERED, what="the failed load's workers to stop")
    residency = server.describe("a").residency
    assert residency.state is ModelState.REGISTERED and residency.last_error == "load failed"
    assert server.health("a").status is ModelStatus.READY  # not a failure of the server: it may retry
    monkeypatch.setattr(FakeWorker, "fail_loads", False)
    FakeWorker.gate.set()
    assert isinstance((await answer(server, "a"))[-1], Finished)  # the next request tries again
    assert server.describe("a").residency.last_error is None


@pytest.mark.parametrize("server", [{}], indirect=True)
async def test_idle_models_unload_by_keep_alive_or_idle_timeout_never_while_held(
    server: ModelServer, recorder: Recorder
) -> None:
    await server.load(config("a", **ON_DEMAND))
    await server.load(config("b", option__idle_timeout="0.2", **ON_DEMAND))
    FakeWorker.gate.set()
    await answer(server, "a", keep_alive=0.0)
    await until(lambda: state(server, "a") is ModelState.REGISTERED, what="a to unload after its response")
    await answer(server, "b")
    expires = server.describe("b").residency.expires_in
    assert expires is not None and expires <= 0.2
    await until(lambda: state(server, "b") is ModelState.REGISTERED, what="b to unload idle")
    assert events(recorder, "model_unload") == [("a", "keep_alive"), ("b", "idle")]
    await answer(server, "b", keep_alive=math.inf)  # -1: never, whatever its idle timeout
    assert server.describe("b").residency.expires_in is None
    FakeWorker.gate.clear()
    stream = generate(server, "b")  # no keep_alive: its idle timeout again
    await anext(stream)
    await asyncio.sleep(0.4)  # twice its idle timeout, held by the stream: it stays
    assert state(server, "b") is ModelState.LOADED
    FakeWorker.gate.set()
    assert isinstance([e async for e in stream][-1], Finished)
    await until(lambda: state(server, "b") is ModelState.REGISTERED, what="b to unload idle again")


async def test_unregistering_a_model_that_waits_for_room_ends_its_load_and_its_waiters(
    server: ModelServer, recorder: Recorder
) -> None:
    await on_demand(server, "ab")
    stream = generate(server, "a")
    await anext(stream)  # a holds the only room
    waiting = asyncio.ensure_future(answer(server, "b"))
    await until(lambda: state(server, "b") is ModelState.LOADING)
    await server.unload("b")
    with pytest.raises(ModelNotFoundError, match="unregistered"):
        await waiting
    assert server.names() == ["a"] and state(server, "a") is ModelState.LOADED
    with pytest.raises(ModelNotFoundError):
        server.get("b")
    FakeWorker.gate.set()
    await stream.aclose()
    await server.unload("a")
    assert events(recorder, "model_unload") == [("a", "api")]
