"""One supervised worker: its process group, its rank connections, health checks and restarts.

A worker is a unit: one process in Python mode, one ``mpirun`` job of N ranks in MPI mode. Any rank
dying, closing its socket, missing a heartbeat deadline or reporting itself unhealthy fails the whole
worker: every in-flight request gets a terminal error at once, the process group is killed, and the
worker starts again unless it has failed more than ``retry_threshold`` times in a row.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import signal
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pluggy

from lmi_core.config import ModelConfig, ServerConfig
from lmi_core.engine import (
    EngineStats,
    Finished,
    GenerationEvent,
    GenerationRequest,
    LoraAdapter,
    WorkerContext,
)
from lmi_core.errors import (
    EngineError,
    RequestTimeoutError,
    ServiceError,
    WorkerFailedError,
    WorkerStalledError,
)
from lmi_core.launch.process import WorkerProcess
from lmi_core.launch_spec import LaunchSpec, WorkerSlot
from lmi_core.operations import Operation
from lmi_core.serving.connection import RankConnection
from lmi_core.serving.request_stream import RequestStream, StallTimer
from lmi_core.worker import wire

logger = logging.getLogger(__name__)

T = TypeVar("T")


class WorkerState(str, enum.Enum):
    STARTING = "STARTING"
    READY = "READY"
    FAILED = "FAILED"
    STOPPED = "STOPPED"


@dataclass(frozen=True)
class WorkerSnapshot:
    """One worker at one instant (``SupervisedWorker.describe``): plain data, no wire names."""

    worker_id: int
    state: WorkerState
    pids: tuple[int, ...]  # its process; in MPI mode the mpirun job
    devices: tuple[str, ...]
    threads: int | None  # OMP_NUM_THREADS on CPU
    in_flight: int
    restarts: int
    started_at: float  # time.time()
    last_error: str | None
    engine_stats: EngineStats  # rank 0's counters from its last heartbeat (zeros before the first)
    retiring: bool = False  # set by the pool: scaled down or unloading, it gets no new request


def describe_exit(code: int) -> str:
    """``-9`` -> ``was killed by SIGKILL``; ``1`` -> ``exited with code 1`` (asyncio's return codes)."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class LoadError(WorkerFailedError):
    """The engine itself refused to load (bad model, missing package): restarting will not help."""


class SupervisedWorker:
    """A worker of one model, kept alive by its supervisor task."""

    def __init__(
        self,
        model: ModelConfig,
        server: ServerConfig,
        slot: WorkerSlot,
        pm: pluggy.PluginManager,
        on_change: Callable[[SupervisedWorker], None] = lambda worker: None,
        on_heartbeat: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        self.model = model
        self.on_heartbeat = on_heartbeat  # each rank's ping round trip, in seconds
        self.server = server
        self.slot = slot
        self.pm = pm
        self.on_change = on_change
        self.state = WorkerState.STARTING
        self.process: WorkerProcess | None = None
        self.ranks: list[RankConnection] = []
        self.in_flight = 0  # counted by the pool, which reserves capacity before dispatch
        self.restarts = 0
        self.failures = 0  # consecutive; reset by a request that completes
        self.last_error: str | None = None
        self.started_at = time.time()
        # Rank 0's engine's context length, as its last load reported it (None: the engine did not say).
        self.max_model_len: int | None = None
        self.first_start: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Set (with the reason) by a request that saw no token within option.stall_timeout.
        self._stalled: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None

    @property
    def worker_id(self) -> int:
        return self.slot.worker_id

    @property
    def pids(self) -> list[int]:
        return [self.process.pid] if self.process and self.process.pid else []

    @property
    def accepting(self) -> bool:
        """READY and not failing: between a rank's connection breaking (or a stall) and the teardown
        that marks the worker STARTING, its state still says READY but it must get no request."""
        return (
            self.state is WorkerState.READY
            and bool(self.ranks)
            and not self._stalled.done()
            and not any(conn.closed.done() for conn in self.ranks)
        )

    def run(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    def _set_state(self, state: WorkerState) -> None:
        self.state = state
        self.on_change(self)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def _supervise(self) -> None:
        retry_threshold = self.model.retry_threshold
        if retry_threshold is None:
            retry_threshold = self.server.retry_threshold
        while True:
            try:
                await self._start()
                self._stalled = asyncio.get_running_loop().create_future()  # before READY: accepting
                self._set_state(WorkerState.READY)
                if not self.first_start.done():
                    self.first_start.set_result(None)
                reason = await self._watch()
            except LoadError as exc:
                reason = await self._teardown(str(exc))
                self.last_error = reason
                self._set_state(WorkerState.FAILED)
                if not self.first_start.done():
                    self.first_start.set_exception(LoadError(reason))
                return
            except WorkerFailedError as exc:
                reason = str(exc)
            except asyncio.CancelledError:
                await self._teardown("worker stopped")
                raise
            reason = await self._teardown(reason)
            self.last_error = reason
            self.failures += 1
            if self.failures > retry_threshold:
                logger.error(
                    "worker %d failed %d times in a row; giving up: %s", self.worker_id, self.failures, reason
                )
                self._set_state(WorkerState.FAILED)
                if not self.first_start.done():
                    self.first_start.set_exception(WorkerFailedError(reason))
                return
            self.restarts += 1
            logger.warning(
                "worker %d failed (%s); restarting (%d of %d)",
                self.worker_id,
                reason,
                self.failures,
                retry_threshold,
            )
            self._set_state(WorkerState.STARTING)
            await asyncio.sleep(min(0.5 * self.failures, 5.0))

    async def _start(self) -> None:
        """Start once; an error nobody expected (a wrong ``option.pythonExecutable``, no ``mpirun``, a
        bad host list: ``OSError``, ``ValueError``...) is final like a load error: it names the cause
        to the user instead of ending this task silently with ``start()`` waiting for ever."""
        try:
            await self._start_once()
        except (ServiceError, asyncio.CancelledError):
            raise
        except Exception as exc:
            logger.exception("worker %d could not start", self.worker_id)
            raise LoadError(f"worker could not start: {exc.__class__.__name__}: {exc}") from exc

    async def _start_once(self) -> None:
        specs: list[LaunchSpec] | None = self.pm.hook.launch_workers(
            config=self.model, allocation=[self.slot]
        )
        if not specs:
            raise LoadError(f"no plugin launches workers for mode {self.model.mode!r}")
        spec = specs[0]
        self.process = WorkerProcess(spec)
        await self.process.start()
        logger.info(
            "worker %d: started %s pid %s (%d rank(s))",
            self.worker_id,
            spec.mode,
            self.process.pid,
            len(spec.rank_addresses),
        )
        deadline = time.monotonic() + self.model.model_loading_timeout
        process = self.process
        exited = asyncio.ensure_future(process.wait())
        try:
            self.ranks = []
            for rank, address in enumerate(spec.rank_addresses):
                label = f"model {self.model.name} worker {self.worker_id} rank {rank}"
                connect = RankConnection.connect(
                    rank, address, deadline, alive=lambda: process.returncode is None, label=label
                )
                self.ranks.append(await self._unless_exited(connect, exited, deadline))
            init = wire.Init(self._context(len(spec.rank_addresses)))
            for conn in self.ranks:
                conn.send(init)
            # All ranks at once, failing on the first error: a rank that fails may leave the others
            # blocked in a collective (the torch.distributed rendezvous) that never completes.
            loaded = asyncio.gather(*(self._loaded(conn) for conn in self.ranks))
            self.max_model_len = (await self._unless_exited(loaded, exited, deadline))[0].max_model_len
        finally:
            exited.cancel()

    async def _loaded(self, conn: RankConnection) -> wire.Loaded:
        report = await conn.control.get()
        if not isinstance(report, wire.Loaded):
            raise LoadError(f"model load failed on rank {conn.rank}: {report}")
        return report

    async def _unless_exited(
        self, awaitable: Awaitable[T], exited: asyncio.Future[int], deadline: float
    ) -> T:
        """Await ``awaitable`` unless the process exits or the load deadline passes first."""
        task = asyncio.ensure_future(awaitable)
        racing: set[asyncio.Future[Any]] = {task, exited}
        done, _ = await asyncio.wait(
            racing, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
        )
        if task in done:
            return task.result()
        task.cancel()
        assert self.process is not None
        tail = "\n".join(self.process.tail[-15:])
        if exited in done:
            raise WorkerFailedError(f"worker exited with code {exited.result()} while starting:\n{tail}")
        limit = self.model.model_loading_timeout
        raise WorkerFailedError(f"worker not loaded within option.model_loading_timeout={limit:g} s:\n{tail}")

    def _context(self, world_size: int) -> WorkerContext:
        tp = self.model.tensor_parallel_degree
        return WorkerContext(
            model_id=self.model.model_id,
            model_dir=self.model.model_dir,
            backend=self.model.backend,
            options=dict(self.model.options),
            mode=self.model.mode,
            world_size=world_size,
            tensor_parallel_degree=tp if isinstance(tp, int) else world_size,
            pipeline_parallel_degree=self.model.pipeline_parallel_degree,
            device="cuda" if self.slot.devices else "cpu",
            max_batch_size=self.model.max_rolling_batch_size,
            dtype=self.model.dtype,
            trust_remote_code=self.model.trust_remote_code,
            entry_point=self.model.entry_point,
        )

    async def _watch(self) -> str:
        """Return the reason the worker failed: exit, lost connection, missed heartbeat, unhealthy."""
        assert self.process is not None
        watchers: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(self.process.wait()),
            asyncio.ensure_future(self._heartbeat()),
            asyncio.shield(self._stalled),
        ]
        # Shielded: cancelling the watchers below must not cancel a live rank's ``closed`` future,
        # or its ``fail`` would see it done and leave that rank's in-flight requests hanging.
        watchers += [asyncio.shield(conn.closed) for conn in self.ranks]
        watchers += [asyncio.ensure_future(self._unhealthy(conn)) for conn in self.ranks]
        try:
            done, _ = await asyncio.wait(watchers, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for watcher in watchers:
                watcher.cancel()
        first = done.pop()
        result = first.result() if not first.cancelled() and first.exception() is None else first.exception()
        if first is watchers[0]:
            assert isinstance(result, int)
            return f"worker process exited with code {result} ({describe_exit(result)})"
        return str(result)

    async def _heartbeat(self) -> str:
        interval, timeout = self.server.health_check_interval, self.server.health_check_timeout
        while True:
            await asyncio.sleep(interval)
            for conn in self.ranks:
                sent = time.monotonic()
                try:
                    await conn.ping(timeout)
                    self.on_heartbeat(time.monotonic() - sent)
                except TimeoutError:
                    return f"rank {conn.rank} did not answer a health check within {timeout:g} s (hung)"
                except WorkerFailedError as exc:
                    return str(exc)

    async def _unhealthy(self, conn: RankConnection) -> str:
        report = await conn.control.get()  # an error (a rank loads once: no second Loaded)
        return f"rank {conn.rank} reported: {report}"

    async def _teardown(self, reason: str) -> str:
        """Fail in-flight requests (via the connections), kill the process group, reap it; return
        ``reason`` with how the process ended, when ``reason`` does not say it already."""
        for conn in self.ranks:
            conn.fail(WorkerFailedError(f"worker {self.worker_id} failed: {reason}"))
            await conn.close()
        self.ranks = []
        if self.process is None or self.process.process is None:
            return reason
        self.process.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.process.wait(), timeout=5.0)
        code = self.process.returncode
        if code is None or "exited with code" in reason:
            return reason
        return f"{reason}; the worker process {describe_exit(code)}"

    async def stop(self) -> None:
        """Stop for good (scale down, unload, shutdown): no restart."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._set_state(WorkerState.STOPPED)

    # -- requests ----------------------------------------------------------------------------------

    async def generate(
        self, request: GenerationRequest, deadline: float | None = None, deadline_source: str | None = None
    ) -> AsyncGenerator[GenerationEvent, None]:
        """Send ``request`` to every rank and yield rank 0's events until done or ``deadline``.

        The deadline (``time.monotonic()`` based) is a timer that fails the request's stream with a
        ``RequestTimeoutError``: no per-token cost. So is ``option.stall_timeout`` (a ``StallTimer``:
        one float store per batch of events): once no event came for that long, it ends the request
        and fails this worker (its engine is wedged even if it still answers pings: a hung
        all-reduce, a stuck kernel).
        """
        if self.state is not WorkerState.READY or not self.ranks:
            raise WorkerFailedError(f"worker {self.worker_id} is {self.state.value}")
        ranks = list(self.ranks)
        rid = request.request_id
        stream = ranks[0].open_stream(rid)
        message_out = wire.Req(rid, request)
        finished = False
        loop = asyncio.get_running_loop()
        timer = None
        if deadline is not None:
            source = deadline_source or f"option.predict_timeout={self.model.predict_timeout:g} s"
            timeout = RequestTimeoutError(f"request took longer than {source}")
            timer = loop.call_at(loop.time() + deadline - time.monotonic(), stream.fail, timeout)
        stall_timer = None
        if (stall := self.model.stall_timeout) is not None:
            reason = f"request {rid} got no token within option.stall_timeout={stall:g} s (engine stalled)"
            stall_timer = StallTimer(
                stall, functools.partial(self._request_stalled, stream, self._stalled, reason)
            )
        try:
            for conn in ranks:
                conn.send(message_out)
            while True:
                try:
                    batch = await stream.take()  # every event since the last take: one wake-up
                except EngineError:
                    finished = True  # the engine's error ends the request in the worker too
                    raise
                if stall_timer is not None:
                    stall_timer.progress()
                for item in batch:
                    if isinstance(item, Finished):
                        finished = True
                        self.failures = 0
                        yield item
                        return
                    yield item
        finally:
            for handle in (timer, stall_timer):
                if handle is not None:
                    handle.cancel()
            ranks[0].close_stream(rid)
            if not finished:
                # Rank 0 alone: in MPI mode it decides cancellations and tells the other ranks in
                # its step plan; a follower that cancelled on its own would leave the batches.
                with contextlib.suppress(Exception):
                    ranks[0].send(wire.Cancel(rid))

    async def perform(
        self,
        rid: str,
        operation: Operation[T],
        deadline: float | None = None,
        deadline_source: str | None = None,
    ) -> T:
        """Run ``operation`` as request ``rid`` on rank 0 (on every rank when it says ``all_ranks``) and
        return rank 0's result; a ``RequestTimeoutError`` at ``deadline``."""
        if self.state is not WorkerState.READY or not self.ranks:
            raise WorkerFailedError(f"worker {self.worker_id} is {self.state.value}")
        ranks = list(self.ranks) if operation.all_ranks else self.ranks[:1]
        result = ranks[0].open_operation(rid)
        answered = False
        try:
            message = wire.Op(rid, operation)
            for conn in ranks:
                conn.send(message)
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                raw = await asyncio.wait_for(result, timeout)
            except TimeoutError:
                source = deadline_source or f"option.predict_timeout={self.model.predict_timeout:g} s"
                raise RequestTimeoutError(f"request took longer than {source}") from None
            except EngineError:
                answered = True  # the engine's error ended it in the worker too
                raise
            answered = True
            try:
                return operation.result_from_wire(raw)
            except wire.DECODE_ERRORS as exc:
                failure = WorkerFailedError(f"{ranks[0].label} sent a bad {operation.op} result: {exc!r}")
                ranks[0].fail(failure)
                raise failure from None
        finally:
            ranks[0].close_operation(rid)
            if not answered:
                with contextlib.suppress(Exception):
                    ranks[0].send(wire.Cancel(rid))

    def _request_stalled(self, stream: RequestStream, stalled: asyncio.Future[str], reason: str) -> None:
        """End the request, and fail the worker start it ran on (``stalled``: a restart replaces it)."""
        stream.fail(WorkerStalledError(reason))
        if not stalled.done():
            stalled.set_result(reason)

    def send_adapter(self, op: wire.AdapterOp, adapter: LoraAdapter) -> None:
        """Tell every rank to load or drop ``adapter`` (no reply: a failed load is the worker's log).
        A rank whose connection is gone is restarting: it gets the registry's adapters when READY."""
        message = wire.Adapter(op, adapter)
        for conn in self.ranks:
            with contextlib.suppress(WorkerFailedError):
                conn.send(message)

    def describe(self) -> WorkerSnapshot:
        """This worker now: its processes, devices, load and crashes."""
        return WorkerSnapshot(
            worker_id=self.worker_id,
            state=self.state,
            pids=tuple(self.pids),
            devices=self.slot.devices,
            threads=self.slot.threads,
            in_flight=self.in_flight,
            restarts=self.restarts,
            started_at=self.started_at,
            last_error=self.last_error,
            engine_stats=self.ranks[0].last_stats if self.ranks else EngineStats(),
        )
