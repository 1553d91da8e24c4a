"""WorkerPool scaling and dispatch, on fake workers (no processes: fast and deterministic).

The fake stands in for ``supervisor.SupervisedWorker`` with the same surface the pool uses: a state machine
(STARTING -> READY | FAILED, STOPPED), ``in_flight`` counted by the pool, and ``generate`` that
yields one token, then holds the request until the test opens ``gate``. The real workers are
exercised end to end in ``test_management.py``; the last test here checks that the thread count a
CPU worker is given reaches torch.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from types import SimpleNamespace
from typing import Any, ClassVar, TypeVar, cast

import pluggy
import pytest

from lmi_core.config import ModelConfig, ServerConfig
from lmi_core.engine import (
    EngineStats,
    Finished,
    GenerationEvent,
    GenerationRequest,
    LoraAdapter,
    SamplingParams,
    Token,
)
from lmi_core.errors import (
    BadRequestError,
    ModelNotReadyError,
    QueueFullError,
    RequestTimeoutError,
    TenantBudgetError,
    WorkerFailedError,
)
from lmi_core.launch.devices import plan_allocation
from lmi_core.launch_spec import WorkerSlot, worker_env
from lmi_core.operations import Operation, Tokenize, TokenizeResult
from lmi_core.plugins import new_plugin_manager
from lmi_core.serving import pool as pool_module
from lmi_core.serving.dispatch import finished_after
from lmi_core.serving.observer import PoolObserver, TenantOutcome, Tier, UnloadReason
from lmi_core.serving.pool import WorkerPool
from lmi_core.serving.routing import Decision, Reason, RequestContext
from lmi_core.serving.supervisor import WorkerSnapshot, WorkerState
from lmi_core.serving.tenants import Tenant, TenantSpec
from lmi_core.worker.wire import Loaded

T = TypeVar("T")


class FakeWorker:
    """A worker without a process: loads after ``load_time``, or fails if ``fail_loads``.

    Its requests finish when the test opens the class-wide ``gate`` or this worker's ``release``.
    """

    load_time = 0.05
    fail_loads = False
    connects = True  # whether its ranks connect when it starts (not when a host is unreachable)
    loaded = Loaded(0, 2048, 2047, 13)  # what its engine reports when it loads
    gate: asyncio.Event
    operations: asyncio.Event  # opens every operation
    created: list[FakeWorker]
    served: list[tuple[int, str]]  # (worker id, request id) in dispatch order
    received: dict[str, GenerationRequest]  # request id -> the request as the worker got it

    def __init__(
        self,
        model: ModelConfig,
        server: ServerConfig,
        slot: WorkerSlot,
        pm: pluggy.PluginManager,
        on_change: Callable[[FakeWorker], None],
        on_heartbeat: Callable[[float], None],
    ) -> None:
        self.slot = slot
        self.on_change = on_change
        self.on_heartbeat = on_heartbeat
        self.state = WorkerState.STARTING
        self.in_flight = 0
        self.restarts = 0
        self.last_error: str | None = None
        self.ranks: list[Any] = []
        self.ranks_up = False
        self.first_start: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.broken = asyncio.Event()
        self.release = asyncio.Event()
        self.adapter_messages: list[tuple[str, str]] = []  # (op, adapter) of the ADAPTER messages sent
        self._task: asyncio.Task[None] | None = None
        FakeWorker.created.append(self)

    @property
    def worker_id(self) -> int:
        return self.slot.worker_id

    @property
    def accepting(self) -> bool:
        return self.state is WorkerState.READY and not self.broken.is_set()

    def run(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        self.ranks_up = FakeWorker.connects
        await asyncio.sleep(self.load_time)
        if self.fail_loads:
            self.fail("load failed")
            if not self.first_start.done():  # a restart's load is not the first
                self.first_start.set_exception(RuntimeError("load failed"))
        else:
            self._set(WorkerState.READY)
            if not self.first_start.done():
                self.first_start.set_result(None)

    def _set(self, state: WorkerState) -> None:
        self.state = state
        self.on_change(self)

    def restart(self, reason: str) -> None:
        """Fail as the real worker does when its supervisor restarts it: its in-flight requests fail
        at once, and it starts again (STARTING, READY after ``load_time``)."""
        self.last_error = reason
        self.ranks_up = False
        self.broken.set()
        self.broken = asyncio.Event()
        self.restarts += 1
        self._set(WorkerState.STARTING)
        self.run()

    def fail(self, reason: str) -> None:
        self.last_error = reason
        self.ranks_up = False
        self.broken.set()  # as the real worker does: its in-flight requests fail at once
        self._set(WorkerState.FAILED)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._set(WorkerState.STOPPED)

    async def generate(
        self, request: GenerationRequest, deadline: float | None = None, deadline_source: str | None = None
    ) -> AsyncIterator[GenerationEvent]:
        FakeWorker.served.append((self.worker_id, request.request_id))
        FakeWorker.received[request.request_id] = request
        broken = self.broken  # this start's (a restart makes another)
        yield Token(1, "x", 0.0)
        await self._wait_for(broken, FakeWorker.gate, self.release)
        if broken.is_set():
            raise WorkerFailedError(f"worker {self.worker_id} failed: {self.last_error}")
        yield Finished("length", 1, 1)

    async def perform(
        self, rid: str, operation: Operation[T], deadline: float | None = None, source: str | None = None
    ) -> T:
        """Answer once ``operations`` opens (or fail with the worker): the ids of the prompt's characters."""
        FakeWorker.served.append((self.worker_id, rid))
        broken = self.broken
        await self._wait_for(broken, FakeWorker.operations)
        if broken.is_set():
            raise WorkerFailedError(f"worker {self.worker_id} failed: {self.last_error}")
        assert isinstance(operation, Tokenize) and operation.request.prompt is not None
        return cast(T, TokenizeResult([ord(c) for c in operation.request.prompt]))

    async def _wait_for(self, *events: asyncio.Event) -> None:
        """Until one of ``events`` is set (among them the ``broken`` of the start the caller began on)."""
        waits = {asyncio.ensure_future(e.wait()) for e in events}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    def send_adapter(self, op: str, adapter: LoraAdapter) -> None:
        self.adapter_messages.append((op, adapter.name))

    def describe(self) -> WorkerSnapshot:
        return WorkerSnapshot(
            self.worker_id, self.state, (), (), None, self.in_flight, self.restarts, 0.0, self.last_error, {}
        )


@pytest.fixture(autouse=True)
def fake_workers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(pool_module, "SupervisedWorker", FakeWorker)
    monkeypatch.setattr(pool_module, "SCALE_INTERVAL", 0.02)
    monkeypatch.setattr(pool_module, "REPLACE_BACKOFF_MIN", 0.2)
    monkeypatch.setattr(FakeWorker, "fail_loads", False)
    monkeypatch.setattr(FakeWorker, "load_time", 0.05)
    monkeypatch.setattr(FakeWorker, "connects", True)
    FakeWorker.gate = asyncio.Event()
    FakeWorker.operations = asyncio.Event()
    FakeWorker.created = []
    FakeWorker.served = []
    FakeWorker.received = {}
    yield


def make_pool(
    min_workers: int, max_workers: int, observe: PoolObserver | None = None, **options: Any
) -> WorkerPool:
    server = ServerConfig(drain_timeout=options.pop("drain_timeout", 5.0))
    config = ModelConfig(name="m", model_id="fake", **{"max_rolling_batch_size": 1, **options})
    plan = plan_allocation([], 1, 1, min_workers, max_workers, cpu_count=4)
    pm = new_plugin_manager(load_entry_points=False)
    return WorkerPool(config, server, pm, plan, "/nonexistent/m", observe)


async def until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def run(
    pool: WorkerPool, request_id: str | None = None, context: RequestContext | None = None, priority: int = 0
) -> list[GenerationEvent]:
    request = GenerationRequest(request_id or uuid.uuid4().hex, prompt="hi", priority=priority)
    return [event async for event in pool.generate(request, context)]


def states(pool: WorkerPool) -> dict[int, str]:
    return {w.worker_id: "UNLOADING" if w.retiring else w.state.value for w in pool.describe().workers}


async def test_scales_up_under_pressure_retires_idle_workers_and_never_reuses_ids() -> None:
    pool = make_pool(1, 2, max_idle_time=0.3)
    await pool.start()
    assert states(pool) == {0: "READY"}
    requests = [asyncio.ensure_future(run(pool)) for _ in range(3)]
    await until(lambda: states(pool) == {0: "READY", 1: "READY"}, what="a second worker under pressure")
    await until(lambda: pool.waiting == 1 and all(w.in_flight == 1 for w in pool.workers.values()))
    FakeWorker.gate.set()
    assert all(isinstance(events[-1], Finished) for events in await asyncio.gather(*requests))
    assert len(pool.workers) == 2  # not retired before max_idle_time
    await until(lambda: len(pool.workers) == 1, what="idle retirement")
    assert list(pool.workers) == [0]  # the younger worker retires; the oldest stays warm
    FakeWorker.gate.clear()
    requests = [asyncio.ensure_future(run(pool)) for _ in range(2)]
    await until(lambda: states(pool) == {0: "READY", 2: "READY"}, what="scale-up with a fresh id")
    FakeWorker.gate.set()
    await asyncio.gather(*requests)
    await pool.stop()
    assert [w.worker_id for w in FakeWorker.created] == [0, 1, 2]


async def test_the_pool_shows_the_context_length_its_workers_engine_reported() -> None:
    pool = make_pool(1, 1)
    assert pool.max_model_len is None  # before any worker has loaded
    await pool.start()
    assert pool.max_model_len == 2048
    await pool.stop()


async def test_a_prompt_that_cannot_fit_is_refused_before_it_reaches_a_worker() -> None:
    """The limits its workers' engine reported (2047 prompt tokens, 13 bytes a token at most): a
    prompt of 13 x 2047 + 1 bytes has at least 2048 tokens. Before: it crossed the worker socket and
    was tokenized whole first (30 MB: over 120 s)."""
    pool = make_pool(1, 1)
    await pool.start()
    huge = "x" * (13 * 2047 + 1)
    for request, message in (
        (GenerationRequest("a", huge), "the prompt has at least 2048 tokens; at most 2047 fit"),
        (GenerationRequest("b", prompt_ids=[1] * 2048), "the prompt has 2048 tokens; at most 2047 fit"),
    ):
        with pytest.raises(BadRequestError, match=message) as refused:
            await anext(pool.generate(request))
        assert refused.value.param == "inputs" and "this model's context is 2048" in str(refused.value)
    assert FakeWorker.served == []  # nothing was sent
    # What may fit goes on: at the bound, chat messages (the template decides), truncate (it cuts).
    FakeWorker.gate.set()
    fits = [
        GenerationRequest("c", "x" * (13 * 2047)),
        GenerationRequest("d", messages=[{"role": "user", "content": huge}]),
        GenerationRequest("e", huge, params=SamplingParams(truncate=100)),
    ]
    for request in fits:
        assert [e async for e in pool.generate(request)]
    assert [rid for _, rid in FakeWorker.served] == ["c", "d", "e"]
    await pool.stop()


async def test_least_loaded_dispatch_then_first_come_first_served() -> None:
    pool = make_pool(2, 2, max_rolling_batch_size=2)
    await pool.start()
    running = [asyncio.ensure_future(run(pool, f"r{i}")) for i in range(4)]
    await until(lambda: len(FakeWorker.served) == 4)
    # Least loaded first, ties to the lower id: 0, 1, then 0 and 1 again.
    assert FakeWorker.served == [(0, "r0"), (1, "r1"), (0, "r2"), (1, "r3")]
    waiting = []
    for i in range(4, 7):
        waiting.append(asyncio.ensure_future(run(pool, f"r{i}")))
        await until(lambda i=i: pool.waiting == i - 3)
    FakeWorker.gate.set()
    await asyncio.gather(*running, *waiting)
    assert [rid for _, rid in FakeWorker.served[4:]] == ["r4", "r5", "r6"]  # arrival order
    await pool.stop()


async def test_scale_down_under_load_drains_the_retiring_worker_and_sends_it_nothing_new() -> None:
    pool = make_pool(2, 2)
    await pool.start()
    busy = [asyncio.ensure_future(run(pool, f"busy{i}")) for i in range(2)]
    queued = asyncio.ensure_future(run(pool, "queued"))
    await until(lambda: pool.waiting == 1)
    await pool.resize(plan_allocation([], 1, 1, 1, 1, cpu_count=4), wait=False)
    assert states(pool) == {0: "READY", 1: "UNLOADING"}  # the younger one, equally loaded
    assert pool.workers[1].state is WorkerState.READY and pool.workers[1].in_flight == 1
    pool.workers[1].release.set()
    assert isinstance((await busy[1])[-1], Finished)  # the retiring worker finishes its request...
    await until(lambda: list(pool.workers) == [0], what="the retired worker to stop")
    assert FakeWorker.created[1].state is WorkerState.STOPPED
    assert pool.waiting == 1  # ...but is given no new one
    FakeWorker.gate.set()
    await asyncio.gather(busy[0], queued)
    assert FakeWorker.served[-1] == (0, "queued")
    await pool.stop()


async def test_resize_up_starts_workers_and_waits_for_them() -> None:
    pool = make_pool(1, 1)
    await pool.start()
    await pool.resize(plan_allocation([], 1, 1, 3, 3, cpu_count=4))
    assert states(pool) == {0: "READY", 1: "READY", 2: "READY"}
    assert [w.slot.threads for w in pool.workers.values()] == [4, 1, 1]  # 4 cores: 4 per 1, then 1 per 3
    await pool.stop()


async def test_failed_worker_fails_waiting_requests_and_is_replaced_with_a_new_id() -> None:
    pool = make_pool(1, 1)
    await pool.start()
    busy = asyncio.ensure_future(run(pool))
    waiting = asyncio.ensure_future(run(pool))
    await until(lambda: pool.waiting == 1)
    pool.workers[0].fail("engine crashed")
    with pytest.raises(WorkerFailedError):
        await busy
    with pytest.raises(ModelNotReadyError, match="engine crashed"):
        await waiting  # failed at once, not after predict_timeout
    assert pool.status == "FAILED"
    with pytest.raises(ModelNotReadyError):
        await run(pool)
    await until(lambda: states(pool) == {1: "READY"}, what="a replacement worker")
    assert pool.status == "READY" and pool.last_failure == "engine crashed"
    FakeWorker.gate.set()
    assert isinstance((await run(pool))[-1], Finished)
    await pool.stop()


async def test_replacements_back_off_while_they_keep_failing(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = make_pool(1, 1)
    await pool.start()
    monkeypatch.setattr(FakeWorker, "fail_loads", True)
    pool.workers[0].fail("crashed")
    await asyncio.sleep(1.0)
    # Back-off 0.2, 0.4, 0.8 s (+ load time): three replacements in a second, not fifty.
    assert 2 <= len(FakeWorker.created) - 1 <= 4
    await pool.stop()


async def test_a_model_whose_workers_all_fail_to_load_fails_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeWorker, "fail_loads", True)
    pool = make_pool(1, 1)
    with pytest.raises(RuntimeError, match="load failed"):
        await pool.start()
    await pool.stop()
    assert len(FakeWorker.created) == 1  # no replacement during the first load


async def test_stop_while_loading_returns_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeWorker, "load_time", 60.0)
    pool = make_pool(1, 1)
    starting = asyncio.ensure_future(pool.start())
    await until(lambda: len(pool.workers) == 1)
    await asyncio.wait_for(pool.stop(), timeout=2.0)
    with pytest.raises(ModelNotReadyError, match="stopped while loading"):
        await asyncio.wait_for(starting, timeout=2.0)


async def test_stop_drains_in_flight_requests_and_refuses_new_ones() -> None:
    pool = make_pool(1, 1)
    await pool.start()
    busy = asyncio.ensure_future(run(pool))
    await until(lambda: pool.workers[0].in_flight == 1)
    stopping = asyncio.ensure_future(pool.stop())
    await until(lambda: pool.closing)
    with pytest.raises(ModelNotReadyError, match="shutting down"):
        await run(pool)
    assert not stopping.done()
    FakeWorker.gate.set()
    assert isinstance((await busy)[-1], Finished)
    await stopping
    assert pool.workers == {}


async def test_abandoned_waits_leave_no_trace() -> None:
    pool = make_pool(1, 1)
    await pool.start()
    busy = asyncio.ensure_future(run(pool))
    cancelled = asyncio.ensure_future(run(pool))
    await until(lambda: pool.waiting == 1)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert pool.waiting == 0
    waiting = pool.generate(
        GenerationRequest(uuid.uuid4().hex, prompt="hi"), RequestContext(client_timeout=0.2)
    )
    with pytest.raises(RequestTimeoutError, match=r"waited longer than x-request-timeout=0\.2 s"):
        await anext(waiting)  # the client's timeout, below option.predict_timeout, is the deadline
    pool.config.predict_timeout = 0.2  # for the next request only: busy's deadline is set
    with pytest.raises(RequestTimeoutError, match=r"waited longer than option\.predict_timeout"):
        await run(pool)
    assert pool.waiting == 0 and pool.workers[0].in_flight == 1
    busy.cancel()
    await until(lambda: pool.workers[0].in_flight == 0)
    await pool.stop()


async def test_a_full_queue_refuses_at_once() -> None:
    pool = make_pool(1, 1, job_queue_size=1)
    await pool.start()
    busy = asyncio.ensure_future(run(pool))
    waiting = asyncio.ensure_future(run(pool))
    await until(lambda: pool.waiting == 1)
    with pytest.raises(QueueFullError):
        await run(pool)
    FakeWorker.gate.set()
    await asyncio.gather(busy, waiting)
    await pool.stop()


# -- tenants: priorities, fair shares, budgets --------------------------------------------------------


def tenant(name: str, **settings: Any) -> RequestContext:
    """The context of a request of tenant ``name`` with ``settings`` (weight, priority...)."""
    return RequestContext(tenant=Tenant(TenantSpec(name, **settings), name))


async def backlog(pool: WorkerPool, *requests: tuple[str, RequestContext, int]) -> list[asyncio.Future[Any]]:
    """Queue ``(request id, context, priority)`` requests one after the other behind a busy worker."""
    queued = []
    waiting = pool.waiting
    for rid, context, priority in requests:
        queued.append(asyncio.ensure_future(run(pool, rid, context, priority)))
        waiting += 1
        await until(lambda count=waiting: pool.waiting == count, what=f"{rid} queued")
    return queued


async def test_priorities_reorder_a_backlog_lower_first_clamped_to_the_tenants_range() -> None:
    pool = make_pool(1, 1)  # one place
    await pool.start()
    busy = asyncio.ensure_future(run(pool, "busy"))
    await until(lambda: pool.workers[0].in_flight == 1)
    anyone, other, ranged = tenant("any"), tenant("other"), tenant("ranged", priority=(0, 10))
    queued = await backlog(
        pool, ("low", anyone, 5), ("urgent", other, -1), ("default", anyone, 0), ("clamped", ranged, -7)
    )
    FakeWorker.gate.set()
    await asyncio.gather(busy, *queued)
    # "clamped" asked for -7 but its tenant's range starts at 0: it ranks with "default" (a tie of
    # tenants served nothing yet: the older request first).
    assert [rid for _, rid in FakeWorker.served] == ["busy", "urgent", "default", "clamped", "low"]
    assert FakeWorker.received["clamped"].priority == 0  # the engine gets the clamped priority
    assert FakeWorker.received["urgent"].priority == -1
    await pool.stop()


async def test_a_one_at_a_time_tenant_goes_before_a_flooding_tenants_backlog() -> None:
    pool = make_pool(1, 1)
    await pool.start()
    flood, interactive = tenant("a"), tenant("b")
    busy = asyncio.ensure_future(run(pool, "a0", flood))  # served: a has attained service
    await until(lambda: pool.workers[0].in_flight == 1)
    queued = await backlog(pool, *((f"a{i}", flood, 0) for i in range(1, 5)), ("b0", interactive, 0))
    FakeWorker.gate.set()
    await asyncio.gather(busy, *queued)
    assert [rid for _, rid in FakeWorker.served][:2] == ["a0", "b0"]  # b's first, not after a1-a4
    await pool.stop()


async def test_a_tenant_over_max_concurrency_gets_429_and_another_tenant_none() -> None:
    recorder = Recorder()
    pool = make_pool(1, 1, recorder, max_rolling_batch_size=1)
    await pool.start()
    a, b = tenant("a", max_concurrency=2), tenant("b")
    first = asyncio.ensure_future(run(pool, "a0", a))  # running
    await until(lambda: pool.workers[0].in_flight == 1)
    queued = await backlog(pool, ("a1", a, 0))  # queued: in flight too
    with pytest.raises(TenantBudgetError) as refused:
        await run(pool, "a2", a)
    assert refused.value.status == 429 and refused.value.param == "max_concurrency"
    queued += await backlog(pool, ("b0", b, 0))
    FakeWorker.gate.set()
    await asyncio.gather(first, *queued)
    assert a.tenant is not None and a.tenant.in_flight == 0
    await run(pool, "a3", a)  # room again
    outcomes = collections.Counter(e[2][:2] for e in recorder.events if e[0] == "tenant_finished")  # type: ignore[index]
    assert outcomes == {("a", "served"): 3, ("a", "rejected"): 1, ("b", "served"): 1}
    await pool.stop()


async def test_scaled_to_zero_a_request_starts_a_worker() -> None:
    pool = make_pool(0, 1, max_idle_time=0.1)
    await pool.start()
    assert pool.workers == {} and pool.status == "READY"
    FakeWorker.gate.set()
    assert isinstance((await run(pool))[-1], Finished)
    await until(lambda: pool.workers == {}, what="retirement back to zero")
    await pool.stop()


def test_the_thread_count_of_a_cpu_worker_reaches_torch() -> None:
    # 1, not more: torch caps OMP_NUM_THREADS at the core count, and its default is the core count.
    env = worker_env(WorkerSlot(0, "/nonexistent/w0", (), threads=1))
    code = "import torch; print(torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) == 1


async def test_routing_follows_prefixes_and_sessions_and_forgets_a_failed_worker() -> None:
    pool = make_pool(2, 2, max_rolling_batch_size=4, retry_threshold=0)
    await pool.start()
    FakeWorker.gate.set()

    async def served(prompt: str, session: str | None = None) -> Decision:
        context = RequestContext(session)
        events = pool.generate(GenerationRequest(uuid.uuid4().hex, prompt=prompt), context)
        await anext(events)
        assert len(context.served) == 1  # the worker is known once the first event is
        async for _ in events:
            pass
        return context.served[0]

    shared = {name: f"{name}: " + "a long shared context. " * 10 for name in ("a", "b")}
    first = [(await served(shared[n] + "?", "s" if n == "a" else None)).worker_id for n in ("a", "b")]
    assert first == [0, 1]
    assert (await served(shared["b"] + "again?")).reason == "prefix"
    assert (await served("short", "s")) == Decision(0, "session")
    pool.workers[0].fail("crashed")  # retry_threshold=0: FAILED at once
    moved = await served(shared["a"] + "later?", "s")
    assert (moved.worker_id, moved.reason, moved.moved_from) == (1, "load", 0)
    assert pool.router.index.cached(0) == 0
    await pool.stop()


def heartbeat(worker: FakeWorker, stats: EngineStats) -> None:
    """``worker``'s rank 0 reports ``stats``, decoded as the server's connection decodes a pong."""
    worker.ranks = [SimpleNamespace(last_stats=EngineStats.from_wire(stats.to_wire()))]


# 64-character blocks (routing_block_chars): 10 distinct ones, and a prompt sharing only the first 3.
PROMPT = "".join(chr(ord("A") + i) * 64 for i in range(10))
SHARES_3_OF_10 = PROMPT[: 3 * 64] + "".join(chr(ord("a") + i) * 64 for i in range(7))


@pytest.mark.parametrize(("kv_cache_usage", "worker_id", "reason"), [(None, 0, "prefix"), (0.9, 1, "load")])
async def test_a_third_party_engines_kv_cache_usage_reaches_the_router(
    kv_cache_usage: float | None, worker_id: int, reason: str
) -> None:
    pool = make_pool(2, 2, max_rolling_batch_size=4)
    await pool.start()
    FakeWorker.gate.set()
    heartbeat(pool.workers[0], EngineStats(kv_cache_usage=kv_cache_usage))
    heartbeat(pool.workers[1], EngineStats(kv_cache_usage=0.0 if kv_cache_usage is not None else None))

    async def served(prompt: str) -> Decision:
        hint = RequestContext()
        async for _ in pool.generate(GenerationRequest(uuid.uuid4().hex, prompt=prompt), hint):
            pass
        return hint.served[0]

    assert (await served(PROMPT)).worker_id == 0
    # Worker 0 holds 3 of the 10 blocks: a 0.3 match, unless its KV cache is 90% full
    # (0.3 - routing_kv_weight 0.5 x 0.9 < 0 for the idle, empty worker 1).
    decision = await served(SHARES_3_OF_10)
    assert (decision.worker_id, decision.reason) == (worker_id, reason)
    await pool.stop()


@pytest.mark.parametrize(("kv_cache_tokens", "blocks"), [(None, 10), (32, 2)])
async def test_a_third_party_engines_kv_cache_tokens_size_the_routers_prefix_memory(
    kv_cache_tokens: int | None, blocks: int
) -> None:
    pool = make_pool(1, 1, max_rolling_batch_size=4)
    await pool.start()
    FakeWorker.gate.set()
    # 32 tokens x 4 characters: 2 blocks; not reported: the default budget (routing_cache_blocks).
    heartbeat(pool.workers[0], EngineStats(kv_cache_tokens=kv_cache_tokens))
    async for _ in pool.generate(GenerationRequest(uuid.uuid4().hex, prompt=PROMPT)):
        pass
    assert pool.router.index.cached(0) == blocks
    await pool.stop()


async def test_adapters_are_sent_to_every_worker_and_again_to_a_restarted_one() -> None:
    pool = make_pool(2, 2, max_rolling_batch_size=4, retry_threshold=0, options={"enable_lora": "true"})
    await pool.start()
    assert pool.adapters is not None
    pool.adapters.add("a", "/a")
    pool.adapters.add("b", "/b", preload=False)  # not sent: loaded on first use
    pool.adapters.update("a", pin=True)
    pool.adapters.add("c", "/c")
    pool.adapters.remove("c")
    expected = [("load", "a"), ("load", "a"), ("load", "c"), ("unload", "c")]
    assert [w.adapter_messages for w in FakeWorker.created] == [expected, expected]
    pool.workers[0].fail("crashed")
    await until(lambda: len(FakeWorker.created) == 3 and FakeWorker.created[2].state is WorkerState.READY)
    assert FakeWorker.created[2].adapter_messages == [("load", "a")]  # the preloaded/pinned ones, at READY
    await pool.stop()


async def test_requests_for_an_adapter_follow_the_worker_that_has_it() -> None:
    pool = make_pool(2, 2, max_rolling_batch_size=4, routing="least_loaded", options={"enable_lora": "true"})
    await pool.start()
    assert pool.adapters is not None
    pool.adapters.add("b", "/b", preload=False)
    adapter = pool.adapters.get("b").lora
    contexts = [RequestContext() for _ in range(3)]
    streams = [
        pool.generate(GenerationRequest(uuid.uuid4().hex, prompt="hi", adapter=adapter), c) for c in contexts
    ]
    for stream in streams:  # all three in flight at once
        await anext(stream)
    decisions = [c.served[0] for c in contexts]
    # The first goes to the least loaded worker; the others follow it (load permitting: 1 and 2 in
    # flight against 0 is within routing_imbalance_abs=8), though the other worker is idle.
    assert [d.worker_id for d in decisions] == [0, 0, 0]
    assert [d.reason for d in decisions] == ["load", "adapter", "adapter"]
    FakeWorker.gate.set()
    for stream in streams:
        async for _ in stream:
            pass
    await pool.stop()


@pytest.mark.parametrize(
    ("special", "count", "reason"),
    [(True, 3, "eos_token"), (False, 8, "length"), (False, 3, "stop_sequence")],
)
def test_the_finish_of_a_worker_that_died_after_its_last_token(
    special: bool, count: int, reason: str
) -> None:
    from lmi_core.engine import SamplingParams

    first = Token(1, "a", None, prompt_tokens=5)
    last = Token(2, "b", None, special=special, last=True)
    request = GenerationRequest("r", prompt="p", params=SamplingParams(max_new_tokens=8))
    assert finished_after(first, last, count, request) == Finished(reason, 5, count)


class Recorder:
    """A ``PoolObserver`` that lists the events it gets."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, object]] = []

    def queue_time(self, model: str, seconds: float) -> None:
        self.events.append(("queue_time", model, seconds >= 0))

    def worker_restart(self, model: str) -> None:
        self.events.append(("worker_restart", model, None))

    def migration(self, model: str) -> None:
        self.events.append(("migration", model, None))

    def heartbeat(self, model: str, seconds: float) -> None:
        self.events.append(("heartbeat", model, seconds))

    def routed(self, model: str, reason: Reason) -> None:
        self.events.append(("routed", model, reason))

    def tenant_queued(self, model: str, tenant: str, change: int) -> None:
        self.events.append(("tenant_queued", model, (tenant, change)))

    def tenant_finished(
        self, model: str, tenant: str, outcome: TenantOutcome, prompt_tokens: int, generated_tokens: int
    ) -> None:
        self.events.append(("tenant_finished", model, (tenant, outcome, prompt_tokens, generated_tokens)))

    def model_load(self, model: str, tier: Tier, seconds: float) -> None:
        self.events.append(("model_load", model, tier))

    def model_unload(self, model: str, reason: UnloadReason, tier: Tier) -> None:
        self.events.append(("model_unload", model, reason))


async def test_the_pool_tells_its_observer_each_event_by_name() -> None:
    recorder = Recorder()
    pool = make_pool(1, 1, recorder, max_rolling_batch_size=1)
    await pool.start()
    first = asyncio.ensure_future(run(pool))
    await until(lambda: pool.workers[0].in_flight == 1)
    second = asyncio.ensure_future(run(pool))
    await until(lambda: pool.waiting == 1)
    FakeWorker.gate.set()
    await asyncio.gather(first, second)
    served = ("tenant_finished", "m", ("default", "served", 1, 1))  # "hi": 1 prompt token, 1 generated
    assert recorder.events == [
        ("routed", "m", "load"),
        ("queue_time", "m", True),
        ("tenant_queued", "m", ("default", 1)),
        ("routed", "m", "load"),  # the first one's place, handed to the second as the first ends
        ("tenant_queued", "m", ("default", -1)),
        served,
        ("queue_time", "m", True),
        served,
    ]
    recorder.events.clear()
    worker = FakeWorker.created[0]
    worker.on_heartbeat(0.25)
    worker.restarts = 1
    worker._set(WorkerState.STARTING)
    assert recorder.events == [("heartbeat", "m", 0.25), ("worker_restart", "m", None)]
    worker._set(WorkerState.READY)
    await pool.stop()


# -- operations ------------------------------------------------------------------------------------


@dataclasses.dataclass
class SlotTokenize(Tokenize):
    """A tokenize that holds one of its worker's places, as a pooling operation does."""

    takes_slot: ClassVar[bool] = True


def tokenize(text: str, kind: type[Tokenize] = Tokenize) -> Tokenize:
    return kind(GenerationRequest(uuid.uuid4().hex, prompt=text))


async def test_a_light_operation_needs_no_free_place_and_a_slot_one_waits_for_one() -> None:
    pool = make_pool(1, 1)  # one worker, one place
    await pool.start()
    busy = asyncio.ensure_future(run(pool))
    await until(lambda: pool.workers[0].in_flight == 1, what="the place taken")
    FakeWorker.operations.set()
    assert (await pool.perform(tokenize("hi"))).ids == [104, 105]
    slot = asyncio.ensure_future(pool.perform(tokenize("ok", SlotTokenize)))
    await until(lambda: pool.waiting == 1, what="the slot operation queued behind the generation")
    FakeWorker.gate.set()
    await busy
    assert (await slot).ids == [111, 107]
    await pool.stop()


async def test_an_operation_whose_worker_fails_runs_again_on_another() -> None:
    recorder = Recorder()
    pool = make_pool(2, 2, recorder)
    await pool.start()
    context = RequestContext()
    first = asyncio.ensure_future(pool.perform(tokenize("hi"), context))
    await until(lambda: len(FakeWorker.served) == 1, what="the operation sent")
    failed = FakeWorker.served[0][0]
    pool.workers[failed].fail("killed")
    await until(lambda: len(FakeWorker.served) == 2, what="the operation sent again")
    FakeWorker.operations.set()
    assert (await first).ids == [104, 105]
    assert [d.worker_id for d in context.served] == [failed, 1 - failed]
    assert recorder.events.count(("migration", "m", None)) == 1


@pytest.mark.parametrize("connects", [False, True])
async def test_a_moved_request_waits_only_while_a_worker_is_coming(connects: bool) -> None:
    """Its worker failed mid-stream; the replacement's ranks never connect (a partitioned host) or
    do and it loads for longer than option.migration_timeout. Before: the stream waited for ever
    (until predict_timeout) on a job that could not start."""
    pool = make_pool(1, 1, migration_timeout=0.3, predict_timeout=60)
    pool.dispatcher.resumes_streams = True  # the engine can continue a stream after its tokens
    await pool.start()
    FakeWorker.load_time, FakeWorker.connects = 1.0, connects
    events = pool.generate(GenerationRequest("r", "hi"))
    assert isinstance(await anext(events), Token)
    FakeWorker.created[0].restart("rank 1's host is unreachable")
    if connects:  # loading: it takes the request once READY, and the stream goes on there
        FakeWorker.gate.set()
        rest = [event async for event in events]
        assert isinstance(rest[0], Token) and FakeWorker.created[0].state is WorkerState.READY
    else:
        with pytest.raises(WorkerFailedError, match=r"rank 1's host.*migration_timeout=0.3 s") as failed:
            await anext(events)
        assert failed.value.status == 503
    await pool.stop()


async def test_a_moved_operation_waits_only_while_a_worker_is_coming() -> None:
    """As a moved stream: an operation (it takes a place, as pooling does) whose worker restarts
    and whose ranks never connect ends with its worker's error once option.migration_timeout passes."""
    pool = make_pool(1, 1, migration_timeout=0.3, predict_timeout=60)
    await pool.start()
    FakeWorker.load_time, FakeWorker.connects = 1.0, False
    operation = asyncio.ensure_future(pool.perform(tokenize("hi", SlotTokenize)))
    await until(lambda: len(FakeWorker.served) == 1, what="the operation sent")
    FakeWorker.created[0].restart("rank 1's host is unreachable")
    with pytest.raises(WorkerFailedError, match=r"rank 1's host.*migration_timeout=0.3 s"):
        await operation
    await pool.stop()
