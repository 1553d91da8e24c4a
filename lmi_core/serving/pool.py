"""One model's worker pool: its workers' lifecycle, scaling and readiness; its requests go through
its ``dispatch.Dispatcher`` (the queue, the routed hand-out, migration).

Scaling: ``min_workers`` workers start at load and are kept (a FAILED worker is replaced after a
back-off that doubles while replacements keep failing); while requests wait and no worker is
starting, one more starts, up to ``max_workers``; a worker idle longer than ``max_idle_time``
retires while more than ``min_workers`` remain. Every decision is taken in ``_reconcile``, which
never awaits, so the scaler, ``resize`` and dispatch cannot interleave halfway through one. A
retiring worker gets no new request, finishes its in-flight ones (up to ``drain_timeout``), then
stops; its device group is free again only once its process is gone. Worker ids are never reused.

``describe`` returns a ``PoolSnapshot`` (frozen, no wire names): the HTTP layer renders it.
``generate`` and ``perform`` are the dispatcher's: the pool is what the HTTP layer calls a
``ServedModel``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TypeVar

import pluggy

from lmi_core.backends import installed_backends
from lmi_core.config import ModelConfig, ServerConfig
from lmi_core.engine import GenerationEvent, GenerationRequest, LoraAdapter
from lmi_core.errors import (
    ModelNotReadyError,
)
from lmi_core.launch.devices import AllocationPlan, DeviceGroup
from lmi_core.launch_spec import WorkerSlot
from lmi_core.operations import Operation, Sleep, WakeUp
from lmi_core.pooling import wrong_task
from lmi_core.request_checks import refuse_unfit_prompt
from lmi_core.serving.adapters import AdapterRegistry, adapter_registry
from lmi_core.serving.dispatch import Dispatcher
from lmi_core.serving.observer import NoObserver, PoolObserver
from lmi_core.serving.routing import RequestContext, Router, RoutingPolicy
from lmi_core.serving.supervisor import SupervisedWorker, WorkerSnapshot, WorkerState
from lmi_core.worker.wire import AdapterOp, Loaded

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ModelStatus(str, enum.Enum):
    """Whether a model can serve (``/ping`` and the management API render it, in DJL's words)."""

    READY = "READY"  # a worker serves (or none is needed: scaled to zero, a request starts one)
    PENDING = "PENDING"  # loading, or every worker is (re)starting
    FAILED = "FAILED"  # no worker can serve and none is starting


@dataclass(frozen=True)
class PoolSnapshot:
    """One model's pool at one instant (``WorkerPool.describe``): plain data, no wire names."""

    name: str
    status: ModelStatus
    backend: str
    mode: str
    tensor_parallel_degree: int | str
    pipeline_parallel_degree: int
    min_workers: int
    max_workers: int
    max_idle_seconds: float
    queue_size: int
    queued: int  # requests waiting for a worker
    max_rolling_batch_size: int
    loaded_at: float  # time.time() of the registration
    last_failure: str | None  # the last worker failure's reason, even if it recovered since
    # The device slices the model may use, one per worker it may have; () each on CPU.
    groups: tuple[tuple[str, ...], ...]
    workers: tuple[WorkerSnapshot, ...]

    @property
    def ready_workers(self) -> int:
        """Workers that take requests: READY and not retiring."""
        return sum(1 for w in self.workers if w.state is WorkerState.READY and not w.retiring)


# How often the scaler looks at idle workers and due replacements when nothing else wakes it.
SCALE_INTERVAL = 1.0
# Back-off before replacing a FAILED worker: doubles per failure, reset when a worker turns READY.
REPLACE_BACKOFF_MIN = 1.0
REPLACE_BACKOFF_MAX = 60.0
# Poll period while waiting for in-flight requests to finish (draining) or workers to settle.
POLL = 0.05
# option.migration_timeout's default beyond SERVING_HEALTH_CHECK_TIMEOUT: a restarted worker's
# processes start and its ranks connect in about 1 s (Python mode on the loaded 2-core test machine).
MIGRATION_GRACE = 5.0


def _retrieve(future: asyncio.Future[None]) -> None:
    # A worker's failed first start is reported by its state; mark the exception seen so asyncio
    # does not log it as never retrieved when nobody awaits ``first_start`` (scaled-up workers).
    if not future.cancelled():
        future.exception()


class WorkerPool:
    """The workers of one model and the queue in front of them."""

    def __init__(
        self,
        config: ModelConfig,
        server: ServerConfig,
        pm: pluggy.PluginManager,
        plan: AllocationPlan,
        socket_prefix: str,
        observe: PoolObserver | None = None,
        adapters: AdapterRegistry | None = None,
    ) -> None:
        self.config = config
        self.server = server
        self.pm = pm
        self.socket_prefix = socket_prefix
        self.observe = observe if observe is not None else NoObserver()
        self.groups: tuple[DeviceGroup, ...] = plan.groups
        self.threads = plan.threads_per_worker
        self.min_workers = plan.min_workers
        self.max_workers = plan.max_workers
        self.workers: dict[int, SupervisedWorker] = {}
        self.loaded_at = time.time()
        # The engine's limits, as the last worker that loaded reported them (its workers all load the
        # same engine); each None until one has, or when the engine does not say.
        self.engine_limits = Loaded(0)
        self.task = config.pooling.task  # generations go to text-generation models only
        self.last_failure: str | None = None
        self.router = Router(RoutingPolicy.from_config(config))
        backend = installed_backends(pm).get(config.backend)
        self.dispatcher = Dispatcher(
            self,
            config,
            config.job_queue_size or server.job_queue_size,
            self.router,
            self.observe,
            resumes_streams=backend is not None and backend.resumes_streams,
            adapters=lambda: self.adapters,
            # A few seconds beyond the heartbeat's detection of a hung rank, by default.
            migration_timeout=config.migration_timeout or server.health_check_timeout + MIGRATION_GRACE,
        )
        self._retiring: dict[int, asyncio.Task[None]] = {}
        self._idle_since: dict[int, float] = {}
        self._next_id = 0
        self._replace_at = 0.0
        self._backoff = REPLACE_BACKOFF_MIN
        self._changed = asyncio.Event()
        self._started = False
        self._closing = False
        self._scaler: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None
        # LoRA adapters (option.enable_lora), None without: the model's (they outlive its pools), else
        # a registry of this pool's own with the adapters directory registered.
        self.adapters = adapters if adapters is not None else adapter_registry(config)
        if self.adapters is not None:
            self.adapters.on_change = self.adapter_changed

    @property
    def name(self) -> str:
        return self.config.name

    def generate(
        self, request: GenerationRequest, context: RequestContext | None = None, arrived: float | None = None
    ) -> AsyncGenerator[GenerationEvent, None]:
        """``request``'s events (``Dispatcher.generate``); a pooling model's is a ``BadRequestError``,
        and so is a prompt that cannot fit the engine's limits (once a worker has reported them)."""
        if self.task != "text-generation":
            raise wrong_task(self.name, self.task, "generation")
        engine = self.engine_limits
        if engine.max_input_length is not None:
            # Refused here, at once, rather than cross the worker socket to be tokenized first (30 MB
            # of text: over 120 s on the demo model's tokenizer).
            refuse_unfit_prompt(
                request, engine.max_input_length, engine.max_token_bytes, engine.max_model_len
            )
        return self.dispatcher.generate(request, context, arrived)

    async def perform(
        self, operation: Operation[T], context: RequestContext | None = None, arrived: float | None = None
    ) -> T:
        """``operation``'s result (``Dispatcher.perform``); one for another task's models is refused."""
        if operation.tasks is not None and self.task not in operation.tasks:
            raise wrong_task(self.name, self.task, operation.op)
        return await self.dispatcher.perform(operation, context, arrived)

    @property
    def waiting(self) -> int:
        """Requests queued for a worker."""
        return self.dispatcher.waiting

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def max_model_len(self) -> int | None:
        """The engine's context length (``/v1/models``); None until reported."""
        return self.engine_limits.max_model_len

    @property
    def max_images(self) -> int:
        """Images one prompt may hold (its engine's ``ImageEngine.max_images``; 0 until reported)."""
        return self.engine_limits.max_images

    @property
    def devices(self) -> set[str]:
        """Every device this model holds or may scale onto: other models keep off them."""
        held = {d for w in self.workers.values() for d in w.slot.devices}
        return held | {d for g in self.groups for d in g.devices}

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start ``min_workers`` workers and wait until each has loaded or failed; raise if none loaded."""
        self._started = True
        self._reconcile()
        first = list(self.workers.values())
        results = await asyncio.gather(*(w.first_start for w in first), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors and len(errors) == len(first):
            raise errors[0]
        # Only now: a worker failing during the first load must fail the load, not be replaced.
        self._scaler = asyncio.get_running_loop().create_task(self._scale_loop())

    async def resize(self, plan: AllocationPlan, wait: bool = True) -> None:
        """Adopt new worker bounds and device groups; start or retire workers to fit them.

        With ``wait``, return once no worker is starting or retiring any more. Before ``start`` it
        only sets what ``start`` will use.
        """
        if self._closing:
            raise ModelNotReadyError(f"model {self.name} is shutting down")
        self.groups, self.threads = plan.groups, plan.threads_per_worker
        self.min_workers, self.max_workers = plan.min_workers, plan.max_workers
        if self._started:
            self._reconcile()
        while wait and (self._retiring or any(w.state is WorkerState.STARTING for w in self.serving())):
            await asyncio.sleep(POLL)

    async def stop(self, reason: str | None = None) -> None:
        """Refuse new requests, let queued and in-flight ones finish (up to ``drain_timeout``), stop.

        Requests still queued then fail with ``reason`` (a failed load's error), by default "unloaded"."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop(reason))
        await asyncio.shield(self._stopping)

    async def _stop(self, reason: str | None) -> None:
        self._closing = True
        if self._scaler is not None:
            self._scaler.cancel()
        deadline = time.monotonic() + self.server.drain_timeout
        # Only a serving pool can drain; a loading or failed one stops at once.
        while (
            (self.waiting or any(w.in_flight for w in self.workers.values()))
            and self.status is ModelStatus.READY
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(POLL)
        self.dispatcher.fail_waiting(reason or f"model {self.name} was unloaded")
        for worker in list(self.workers.values()):
            if worker.worker_id not in self._retiring:
                self._retire(worker, deadline)
        await asyncio.gather(*self._retiring.values(), return_exceptions=True)

    async def sleep(self) -> None:
        """Put every ready worker's engine to sleep (``Sleep``: vLLM's level 1), freeing its GPU memory;
        its processes stay. The caller holds requests off until ``wake_up`` has returned."""
        await self._each_ready(Sleep(1))

    async def wake_up(self) -> None:
        """Wake every ready worker's engine (``WakeUp``)."""
        await self._each_ready(WakeUp())

    async def _each_ready(self, operation: Operation[None]) -> None:
        ready = [w for w in self.serving() if w.state is WorkerState.READY]
        deadline = time.monotonic() + self.config.model_loading_timeout
        await asyncio.gather(*(w.perform(uuid.uuid4().hex, operation, deadline) for w in ready))

    # -- scaling -----------------------------------------------------------------------------------

    def serving(self) -> list[SupervisedWorker]:
        """Workers that count toward the bounds: neither retiring nor FAILED."""
        return [
            w
            for w in self.workers.values()
            if w.worker_id not in self._retiring and w.state is not WorkerState.FAILED
        ]

    def _free_group(self) -> DeviceGroup | None:
        """A device group no worker holds (a retiring worker holds its group until it has stopped)."""
        if len(self.workers) >= len(self.groups):
            return None
        held = {d for w in self.workers.values() for d in w.slot.devices}
        return next((g for g in self.groups if held.isdisjoint(g.devices)), None)

    def _add_worker(self, group: DeviceGroup) -> SupervisedWorker:
        worker_id = self._next_id
        self._next_id += 1
        slot = WorkerSlot(
            worker_id, f"{self.socket_prefix}-w{worker_id}", group.devices, self.threads, group.ranks
        )
        worker = SupervisedWorker(
            self.config,
            self.server,
            slot,
            self.pm,
            on_change=self._on_worker_change,
            on_heartbeat=lambda seconds: self.observe.heartbeat(self.name, seconds),
        )
        worker.first_start.add_done_callback(_retrieve)
        self.workers[worker_id] = worker
        self._idle_since[worker_id] = time.monotonic()
        worker.run()
        return worker

    def _retire(self, worker: SupervisedWorker, deadline: float | None = None) -> None:
        """Give ``worker`` no new request; stop it once its in-flight ones finish (or at ``deadline``)."""
        if deadline is None:
            deadline = time.monotonic() + self.server.drain_timeout
        task = asyncio.get_running_loop().create_task(self._drain_and_stop(worker, deadline))
        self._retiring[worker.worker_id] = task

    async def _drain_and_stop(self, worker: SupervisedWorker, deadline: float) -> None:
        try:
            # Only a READY worker can finish requests (a failed one has failed them already).
            while worker.in_flight and worker.state is WorkerState.READY and time.monotonic() < deadline:
                await asyncio.sleep(POLL)
            await worker.stop()
        finally:
            if not worker.first_start.done():  # unblocks start() when a loading model is unloaded
                stopped = ModelNotReadyError(f"worker {worker.worker_id} stopped while loading")
                worker.first_start.set_exception(stopped)
            del self.workers[worker.worker_id]
            del self._retiring[worker.worker_id]
            self.router.forget(worker.worker_id)
            self._idle_since.pop(worker.worker_id, None)
            self.dispatcher.dispatch()
            self._changed.set()

    def _on_worker_change(self, worker: SupervisedWorker) -> None:
        now = time.monotonic()
        if worker.state is not WorkerState.READY:
            self.router.forget(worker.worker_id)  # a restarted engine starts with an empty cache
        if worker.state is WorkerState.STARTING and worker.restarts:
            self.observe.worker_restart(self.name)
        elif worker.state is WorkerState.READY:
            self.engine_limits = worker.loaded
            self._idle_since[worker.worker_id] = now
            self._backoff = REPLACE_BACKOFF_MIN
            self._give_adapters(worker)
        elif worker.state is WorkerState.FAILED:
            self.last_failure = worker.last_error
            self._replace_at = now + self._backoff
            self._backoff = min(2 * self._backoff, REPLACE_BACKOFF_MAX)
        self.dispatcher.dispatch()
        self._changed.set()

    def _reconcile(self) -> None:
        """Fit the workers to the bounds and the load. Never awaits, so decisions cannot interleave."""
        if self._closing:
            return
        now = time.monotonic()
        may_start = now >= self._replace_at  # no new worker while a failure's back-off runs
        if may_start:
            for worker in self.workers.values():
                if worker.state is WorkerState.FAILED and worker.worker_id not in self._retiring:
                    self._retire(worker)  # frees its device group for the replacement below
        serving = self.serving()
        # Above max_workers (after a resize): retire starting workers first, then the least loaded.
        surplus = sorted(serving, key=lambda w: (w.state is WorkerState.READY, w.in_flight, -w.worker_id))
        for worker in surplus[: max(0, len(serving) - self.max_workers)]:
            self._retire(worker)
            serving.remove(worker)
        while may_start and len(serving) < self.min_workers and (group := self._free_group()) is not None:
            serving.append(self._add_worker(group))
        starting = any(w.state is WorkerState.STARTING for w in serving)
        if self.waiting:
            if may_start and not starting and len(serving) < self.max_workers:
                group = self._free_group()
                if group is not None:
                    logger.info("model %s: %d request(s) waiting; adding a worker", self.name, self.waiting)
                    self._add_worker(group)
            return
        idle = [
            w
            for w in serving
            if w.state is WorkerState.READY
            and w.in_flight == 0
            and now - self._idle_since[w.worker_id] > self.config.max_idle_time
        ]
        # Youngest first: dispatch prefers low ids, so the oldest workers stay warm.
        for worker in sorted(idle, key=lambda w: -w.worker_id)[: max(0, len(serving) - self.min_workers)]:
            logger.info("model %s: retiring worker %d (idle)", self.name, worker.worker_id)
            self._retire(worker)

    async def _scale_loop(self) -> None:
        # Not only cancellation ends it: Python 3.11's wait_for can swallow a cancel that races a wakeup.
        while not self._closing:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=SCALE_INTERVAL)
            self._changed.clear()
            try:
                self._reconcile()
            except Exception:  # a bug here must not silently end scaling for good
                logger.exception("model %s: scaling failed", self.name)

    # -- LoRA adapters -----------------------------------------------------------------------------

    def _give_adapters(self, worker: SupervisedWorker) -> None:
        """A worker that just (re)started gets the preloaded and pinned adapters, before any request."""
        for adapter in self.adapters.resident() if self.adapters is not None else ():
            worker.send_adapter("load", adapter)
            self.router.sent_adapter(worker.worker_id, adapter.name)

    def adapter_changed(self, op: AdapterOp, adapter: LoraAdapter) -> None:
        """The registry's callback: load a (pre)loaded adapter into every ready worker, or drop one."""
        for worker in self.workers.values():
            if worker.state is WorkerState.READY:
                worker.send_adapter(op, adapter)
                if op == "load":
                    self.router.sent_adapter(worker.worker_id, adapter.name)
                else:
                    self.router.dropped_adapter(worker.worker_id, adapter.name)

    # -- what the dispatcher reads (dispatch.Workers) ------------------------------------------------

    def unservable(self) -> str | None:
        if self.status is not ModelStatus.FAILED:  # a pool not started yet will start its workers
            return None
        return f"model {self.name} has no worker that can serve (FAILED: {self.last_failure})"

    def released(self, worker: SupervisedWorker) -> None:
        if worker.in_flight == 0 and worker.worker_id in self.workers:
            self._idle_since[worker.worker_id] = time.monotonic()
        self._changed.set()

    def queued(self) -> None:
        self._changed.set()

    # -- status ------------------------------------------------------------------------------------

    @property
    def status(self) -> ModelStatus:
        """``READY``, ``PENDING`` (not started, or no worker loaded yet), ``FAILED`` (no worker can
        serve)."""
        if not self._started:  # created, its devices claimed: the load starts it
            return ModelStatus.PENDING
        serving = self.serving()
        if any(w.state is WorkerState.READY for w in serving):
            return ModelStatus.READY
        if any(w.state is WorkerState.STARTING for w in serving):
            return ModelStatus.PENDING
        failed = any(w.state is WorkerState.FAILED for w in self.workers.values())
        # Scaled to zero (min_workers=0): a request starts a worker.
        if not serving and self.min_workers == 0 and not failed:
            return ModelStatus.READY
        return ModelStatus.FAILED

    def describe(self) -> PoolSnapshot:
        """The pool now: bounds, queue, device slices, and every worker (retiring ones marked)."""
        return PoolSnapshot(
            name=self.name,
            status=self.status,
            backend=self.config.backend,
            mode=self.config.mode,
            tensor_parallel_degree=self.config.tensor_parallel_degree,
            pipeline_parallel_degree=self.config.pipeline_parallel_degree,
            min_workers=self.min_workers,
            max_workers=self.max_workers,
            max_idle_seconds=self.config.max_idle_time,
            queue_size=self.dispatcher.queue_size,
            queued=self.waiting,
            max_rolling_batch_size=self.dispatcher.capacity,
            loaded_at=self.loaded_at,
            last_failure=self.last_failure,
            groups=tuple(g.devices for g in self.groups),
            workers=tuple(
                dataclasses.replace(w.describe(), retiring=w.worker_id in self._retiring)
                for w in self.workers.values()
            ),
        )
