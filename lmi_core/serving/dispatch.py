"""One model's requests: the queue in front of its workers, which worker runs each, and what happens
when that worker fails under one.

Each worker takes up to ``option.max_rolling_batch_size`` requests at once (the engine batches
them); requests beyond that wait here in arrival order, at most ``job_queue_size`` of them, and a
request beyond that is refused with 503 at once. Accepted requests are never dropped: they get a
worker, or a terminal error naming why not. Which ready worker with free capacity a request gets is
the router's choice (``routing``: its session's worker, the one that saw its prefix, or the least
loaded); queued requests keep arrival order whatever the router chooses. Every hand-out happens in
``dispatch``, which never awaits.

A generation whose worker fails (its process died, its connection broke, it stalled) **migrates**:
it goes back to the head of the queue and continues on another worker after the tokens the client
already has (``resume_ids``), up to ``option.max_migrations`` times within its total deadline. An
operation (``lmi_core.operations``) changes no engine state and simply runs again.

The dispatcher reads its pool's workers through ``Workers``; the pool owns them (lifecycle,
scaling, health) and tells the dispatcher when one changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Callable
from typing import Protocol, TypeVar

from lmi_core.config import ModelConfig
from lmi_core.engine import Finished, FinishReason, GenerationEvent, GenerationRequest, Token
from lmi_core.errors import (
    EngineFailedError,
    ModelNotReadyError,
    QueueFullError,
    WorkerFailedError,
)
from lmi_core.operations import Operation
from lmi_core.serving.adapters import AdapterRegistry
from lmi_core.serving.deadlines import Deadlines, deadlines, waited_too_long
from lmi_core.serving.observer import PoolObserver
from lmi_core.serving.routing import Decision, RequestContext, RouteQuery, Router, WorkerLoad
from lmi_core.serving.supervisor import SupervisedWorker

logger = logging.getLogger(__name__)

T = TypeVar("T")
Assignment = tuple[SupervisedWorker, Decision]


class Workers(Protocol):
    """What the dispatcher reads of its pool (``pool.WorkerPool``)."""

    @property
    def closing(self) -> bool: ...  # being unloaded: no new request

    def serving(self) -> list[SupervisedWorker]: ...  # the workers that count: neither retiring nor FAILED

    def unservable(self) -> str | None: ...  # why no worker can serve or start (FAILED), else None

    def released(self, worker: SupervisedWorker) -> None: ...  # a request ended on ``worker``

    def queued(self) -> None: ...  # a request waits: the scaler may add a worker


class Dispatcher:
    """The queue and the running requests of one model."""

    def __init__(
        self,
        workers: Workers,
        config: ModelConfig,
        queue_size: int,
        router: Router,
        observe: PoolObserver,
        resumes_streams: bool,
        adapters: Callable[[], AdapterRegistry | None],
    ) -> None:
        self.workers = workers
        self.config = config
        self.queue_size = queue_size
        self.capacity = config.max_rolling_batch_size
        self.router = router
        self.observe = observe
        self.resumes_streams = resumes_streams  # the backend continues a stream after resume_ids
        self._adapters = adapters
        self._queue: deque[tuple[asyncio.Future[Assignment], RouteQuery]] = deque()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def waiting(self) -> int:
        """Requests queued for a worker."""
        return len(self._queue)

    # -- hand-out ----------------------------------------------------------------------------------

    def _load(self, worker: SupervisedWorker) -> WorkerLoad:
        """The worker's load as the router sees it: in flight, and KV use where its engine reports it."""
        stats = worker.ranks[0].last_stats if worker.ranks else None
        adapters: frozenset[str] = frozenset()
        if self._adapters() is not None:  # held: in its last heartbeat, or sent to it just now
            held = stats.adapters if stats is not None else []
            adapters = frozenset(held).union(self.router.recent_adapters(worker.worker_id))
        return WorkerLoad(
            worker.worker_id,
            worker.in_flight,
            self.capacity,
            None if stats is None else stats.kv_cache_usage,
            None if stats is None else stats.kv_cache_tokens,
            adapters,
        )

    def _pick(self, query: RouteQuery) -> Assignment | None:
        """The router's choice among the ready workers with free capacity (none: None); reserves it."""
        ready = [w for w in self.workers.serving() if w.accepting and w.in_flight < self.capacity]
        if not ready:
            return None
        decision = self.router.route(query, [self._load(w) for w in ready])
        self.observe.routed(self.name, decision.reason)
        worker = next(w for w in ready if w.worker_id == decision.worker_id)
        worker.in_flight += 1
        return worker, decision

    def dispatch(self) -> None:
        """Give free capacity to waiting requests in arrival order; fail them if no worker can serve."""
        while self._queue and (assignment := self._pick(self._queue[0][1])) is not None:
            self._queue.popleft()[0].set_result(assignment)
        if self._queue and (reason := self.workers.unservable()) is not None:
            self.fail_waiting(reason)

    def fail_waiting(self, message: str) -> None:
        while self._queue:
            self._queue.popleft()[0].set_exception(ModelNotReadyError(message))

    def _release(self, worker: SupervisedWorker) -> None:
        worker.in_flight -= 1
        self.workers.released(worker)
        self.dispatch()

    def _abandon(self, future: asyncio.Future[Assignment]) -> None:
        """A waiting request gave up (timeout, client gone): leave the queue, or pass its worker on."""
        if future.done() and not future.cancelled() and future.exception() is None:
            self._release(future.result()[0])  # it was handed a worker just as it gave up
            return
        future.cancel()
        for entry in self._queue:
            if entry[0] is future:
                self._queue.remove(entry)
                break

    async def _acquire(self, query: RouteQuery, limits: Deadlines, migrating: bool = False) -> Assignment:
        """Reserve a slot on a worker: at once if one is free and nobody waits, else in FIFO order.

        A ``migrating`` request was admitted before every waiting one: it goes to the head of the
        queue and is never refused for a full queue.
        """
        if self.workers.closing and not migrating:
            raise ModelNotReadyError(f"model {self.name} is shutting down")
        if not self._queue and (assignment := self._pick(query)) is not None:
            return assignment
        if (reason := self.workers.unservable()) is not None:
            raise ModelNotReadyError(reason)
        if len(self._queue) >= self.queue_size and not migrating:
            raise QueueFullError(f"model {self.name}: the queue is full ({self.queue_size} requests waiting)")
        future: asyncio.Future[Assignment] = asyncio.get_running_loop().create_future()
        if migrating:
            self._queue.appendleft((future, query))
        else:
            self._queue.append((future, query))
        self.workers.queued()
        try:
            await asyncio.wait({future}, timeout=max(0.0, limits.queue - time.monotonic()))
        except asyncio.CancelledError:
            self._abandon(future)
            raise
        if not future.done():
            self._abandon(future)
            raise waited_too_long(limits, "worker took the request")
        return future.result()

    def _deadlines(self, started: float, context: RequestContext | None) -> Deadlines:
        client = context.client_timeout if context is not None else None
        return deadlines(started, self.config.predict_timeout, self.config.queue_timeout, client)

    # -- running -----------------------------------------------------------------------------------

    async def generate(
        self, request: GenerationRequest, context: RequestContext | None = None, arrived: float | None = None
    ) -> AsyncGenerator[GenerationEvent, None]:
        """Queue ``request``, run it on the worker the router picks, yield its events; migrate it when
        its worker fails.

        ``context`` carries the HTTP request's session and timeout in, and gets the routing decision
        appended before the first event is yielded (so a response can name its worker before it starts).
        ``arrived`` (monotonic; default now) starts its deadlines and queue time: a request that
        waited for its model's load has waited since then.
        """
        started = time.monotonic() if arrived is None else arrived
        limits = self._deadlines(started, context)
        query = self.router.query(request, context)
        worker, decision = await self._acquire(query, limits)
        self.observe.queue_time(self.name, time.monotonic() - started)
        # What the client has, ids only (a Token holds its text and log-probs): a migrated request
        # resumes after them. The first token carries the prompt's length, the last whether it ended.
        delivered: list[int] = []
        first: Token | None = None
        last: Token | None = None
        attempt = request
        for migration in itertools.count():
            if context is not None:
                context.served.append(decision)
            events = worker.generate(attempt, limits.total, limits.total_source)
            try:
                async for event in events:
                    if isinstance(event, Token):
                        delivered.append(event.id)
                        if first is None:
                            first = event
                        last = event
                    yield event
                return
            except (WorkerFailedError, EngineFailedError) as exc:  # the worker's fault, not the request's
                movable = self.resumes_streams or not delivered
                if not movable or migration >= self.config.max_migrations or time.monotonic() >= limits.total:
                    raise
                failure = exc
            finally:
                await events.aclose()
                self._release(worker)
            if first is not None and last is not None and last.last:  # died after its last token
                yield finished_after(first, last, len(delivered), request)
                return
            self.observe.migration(self.name)
            logger.warning(
                "model %s: request %s moves on after %d token(s): %s",
                self.name,
                request.request_id,
                len(delivered),
                failure,
            )
            attempt = dataclasses.replace(request, resume_ids=list(delivered))
            # The total deadline still holds; the queue deadline was for the first wait only.
            worker, decision = await self._acquire(
                query, dataclasses.replace(limits, queue=limits.total), True
            )

    async def perform(
        self, operation: Operation[T], context: RequestContext | None = None, arrived: float | None = None
    ) -> T:
        """Run ``operation`` on one of the workers and return its result (``arrived`` as for ``generate``).

        One that ``takes_slot`` waits for a place like a generation, routed like one (its session's
        worker first); a light one (tokenize) goes at once to the least loaded ready worker, without a
        place, and waits in the queue only while no worker is ready. When its worker fails under it,
        an ``idempotent`` one runs again on another, at most ``max_migrations`` times, within its
        total deadline; any other fails with the worker.
        """
        limits = self._deadlines(time.monotonic() if arrived is None else arrived, context)
        query = RouteQuery(session_id=context.session_id if context is not None else None)
        attempt = 0
        while True:
            light = None if operation.takes_slot else self._least_loaded()
            if light is not None:
                worker, decision = light, Decision(light.worker_id, "load")
            else:  # the queue deadline holds for the first wait only, as for a migrated generation
                wait = limits if attempt == 0 else dataclasses.replace(limits, queue=limits.total)
                worker, decision = await self._acquire(query, wait, migrating=attempt > 0)
            if context is not None:
                context.served.append(decision)
            try:
                return await worker.perform(uuid.uuid4().hex, operation, limits.total, limits.total_source)
            except (WorkerFailedError, EngineFailedError) as exc:  # the worker's fault: try another
                retry = operation.idempotent and attempt < self.config.max_migrations
                if not retry or time.monotonic() >= limits.total:
                    raise
                logger.warning("model %s: %s moves to another worker: %s", self.name, operation.op, exc)
                self.observe.migration(self.name)
            finally:
                if light is None:
                    self._release(worker)
            attempt += 1

    def _least_loaded(self) -> SupervisedWorker | None:
        """The ready worker with the fewest requests in flight (its capacity not counted), if any."""
        ready = [w for w in self.workers.serving() if w.accepting]
        return min(ready, key=lambda w: (w.in_flight, w.worker_id), default=None)


def finished_after(first: Token, last: Token, count: int, request: GenerationRequest) -> Finished:
    """The ``Finished`` a worker that died right after a request's last token (of ``count``) did not
    send: EOS if that token was one (engines mark EOS special), the length if the budget is spent,
    else a stop."""
    reason: FinishReason = "stop_sequence"
    if last.special:
        reason = "eos_token"
    elif count >= request.params.max_new_tokens:
        reason = "length"
    return Finished(reason, first.prompt_tokens or 0, count)
