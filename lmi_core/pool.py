"""One model's worker pool: bounded queue, least-loaded dispatch, scaling, readiness.

Each worker takes up to ``option.max_rolling_batch_size`` requests at once (the engine batches
them); requests beyond that wait here, at most ``job_queue_size`` of them, and a request beyond that
is refused with 503 at once. Accepted requests are never dropped: they get a worker, or a terminal
error naming why not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pluggy

from lmi_core.config import ModelConfig, ServerConfig
from lmi_core.engine import GenerationEvent, GenerationRequest
from lmi_core.errors import ModelNotReadyError, QueueFullError, RequestTimeoutError
from lmi_core.launch import WorkerSlot
from lmi_core.supervisor import Worker, WorkerState

logger = logging.getLogger(__name__)

# (model name, event name, value) callbacks for metrics.
Observer = Callable[[str, str, float], None]


class WorkerPool:
    """The workers of one model and the queue in front of them."""

    def __init__(
        self,
        config: ModelConfig,
        server: ServerConfig,
        pm: pluggy.PluginManager,
        slots: Sequence[WorkerSlot],
        min_workers: int,
        max_workers: int,
        observe: Observer = lambda model, event, value: None,
    ) -> None:
        self.config = config
        self.server = server
        self.pm = pm
        self.slots = list(slots)
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.observe = observe
        self.workers: dict[int, Worker] = {}
        self.waiting = 0
        self.queue_size = config.job_queue_size or server.job_queue_size
        self.capacity = config.max_rolling_batch_size
        self.loaded_at = time.time()
        self._changed = asyncio.Event()
        self._closing = False
        self._scaler: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.config.name

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start ``min_workers`` workers and wait until each has loaded or failed."""
        workers = [self._add_worker() for _ in range(self.min_workers)]
        self._scaler = asyncio.get_running_loop().create_task(self._scale_loop())
        results = await asyncio.gather(*(w.first_start for w in workers), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors and len(errors) == len(workers):
            raise errors[0]

    def _add_worker(self) -> Worker:
        used = set(self.workers)
        slot = next(s for s in self.slots if s.worker_id not in used)
        worker = Worker(self.config, self.server, slot, self.pm, on_change=self._on_worker_change)
        self.workers[slot.worker_id] = worker
        worker.run()
        return worker

    def _on_worker_change(self, worker: Worker) -> None:
        if worker.state is WorkerState.STARTING and worker.restarts:
            self.observe(self.name, "worker_restart", 1)
        self._changed.set()

    async def _remove_worker(self, worker: Worker) -> None:
        self.workers.pop(worker.worker_id, None)
        await worker.stop()

    async def scale(self, min_workers: int, max_workers: int) -> None:
        """Change the worker bounds; start or stop workers to fit them."""
        self.min_workers, self.max_workers = min_workers, max_workers
        while len(self.workers) < min_workers:
            self._add_worker()
        idle = sorted(self.workers.values(), key=lambda w: (w.in_flight, -w.worker_id))
        for worker in idle[: max(0, len(self.workers) - max_workers)]:
            await self._drain_and_stop(worker)
        self._changed.set()

    async def _drain_and_stop(self, worker: Worker, timeout: float | None = None) -> None:
        worker.draining = True  # type: ignore[attr-defined]
        deadline = time.monotonic() + (self.server.drain_timeout if timeout is None else timeout)
        while worker.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self._remove_worker(worker)

    async def _scale_loop(self) -> None:
        """Add a worker while requests wait; retire workers idle longer than ``max_idle_time``."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=1.0)
            self._changed.clear()
            live = [w for w in self.workers.values() if w.state is not WorkerState.FAILED]
            starting = any(w.state is WorkerState.STARTING for w in live)
            if self.waiting and not starting and len(self.workers) < self.max_workers:
                logger.info("model %s: %d request(s) waiting; adding a worker", self.name, self.waiting)
                self._add_worker()
            now = time.monotonic()
            for worker in list(self.workers.values()):
                idle = worker.in_flight == 0 and now - worker.last_used > self.config.max_idle_time
                if idle and len(self.workers) > self.min_workers and worker.state is WorkerState.READY:
                    logger.info("model %s: retiring idle worker %d", self.name, worker.worker_id)
                    await self._remove_worker(worker)

    async def stop(self) -> None:
        """Drain in-flight requests (up to the drain timeout), then stop every worker."""
        self._closing = True
        self._changed.set()
        if self._scaler is not None:
            self._scaler.cancel()
        await asyncio.gather(*(self._drain_and_stop(w) for w in list(self.workers.values())))

    # -- status ------------------------------------------------------------------------------------

    @property
    def status(self) -> str:
        """``READY``, ``PENDING`` (no worker loaded yet), ``FAILED`` (no worker can serve)."""
        states = [w.state for w in self.workers.values()]
        if WorkerState.READY in states:
            return "READY"
        if WorkerState.STARTING in states:
            return "PENDING"
        return "FAILED"

    def describe(self) -> dict[str, Any]:
        return {
            "modelName": self.name,
            "modelUrl": self.config.model_dir or self.config.model_id,
            "status": self.status,
            "backend": self.config.backend,
            "mode": self.config.mode,
            "minWorkers": self.min_workers,
            "maxWorkers": self.max_workers,
            "queueSize": self.queue_size,
            "requestInQueue": self.waiting,
            "maxRollingBatchSize": self.capacity,
            "loadedAt": self.loaded_at,
            "workers": [w.describe() for w in self.workers.values()],
        }

    def engine_stats(self) -> list[dict[str, Any]]:
        """The last heartbeat counters of every rank 0 (one per worker)."""
        return [w.ranks[0].last_stats for w in self.workers.values() if w.ranks]

    # -- requests ----------------------------------------------------------------------------------

    def _pick(self) -> Worker | None:
        ready = [
            w
            for w in self.workers.values()
            if w.state is WorkerState.READY and w.in_flight < self.capacity and not getattr(w, "draining", False)
        ]
        return min(ready, key=lambda w: (w.in_flight, w.worker_id)) if ready else None

    async def _acquire(self, deadline: float) -> Worker:
        if self._closing:
            raise ModelNotReadyError(f"model {self.name} is shutting down")
        worker = self._pick()
        if worker is None:
            if self.waiting >= self.queue_size:
                raise QueueFullError(f"model {self.name}: the queue is full ({self.queue_size} requests waiting)")
            self.waiting += 1
            self._changed.set()
            try:
                while (worker := self._pick()) is None:
                    if self.status == "FAILED" or self._closing:
                        raise ModelNotReadyError(f"model {self.name} has no worker that can serve ({self.status})")
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise RequestTimeoutError(
                            f"request waited longer than option.predict_timeout={self.config.predict_timeout:g} s"
                        )
                    self._changed.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 1.0))
            finally:
                self.waiting -= 1
        worker.in_flight += 1
        return worker

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Queue ``request``, run it on the least-loaded ready worker, yield its events."""
        started = time.monotonic()
        deadline = started + self.config.predict_timeout
        worker = await self._acquire(deadline)
        self.observe(self.name, "queue_time", time.monotonic() - started)
        events = worker.generate(request)
        try:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    event = await asyncio.wait_for(anext(events), timeout=max(remaining, 0.001))
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise RequestTimeoutError(
                        f"request took longer than option.predict_timeout={self.config.predict_timeout:g} s"
                    ) from None
                yield event
        finally:
            await events.aclose()
            worker.in_flight -= 1
            self._changed.set()


def new_request_id() -> str:
    return uuid.uuid4().hex
