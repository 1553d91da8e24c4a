"""One model's requests: the queue in front of its workers, which worker runs each, and what happens
when that worker fails under one.

A generation is first admitted by its tenant's budgets (``tenants``: a 429 for that tenant alone)
and released when it ends, however it ends. Each worker takes up to
``option.max_rolling_batch_size`` requests at once (the engine batches them); requests beyond that
wait here, at most ``job_queue_size`` of them, and a request beyond that is refused with 503 at once.
Waiting requests leave in ``fairness`` order: strict priority bands (the request's ``priority``
clamped to its tenant's range), then the tenant with the least weighted service (prompt tokens at
dispatch, output tokens twice as they are generated), then arrival; and while several tenants are
active, one holding its share of the places leaves the last few free for the others
(``PlaceShares``). Accepted requests are never
dropped: they get a worker, or a terminal error naming why not. Which ready worker with free
capacity a request gets is the router's choice (``routing``: its session's worker, the one that saw
its prefix, or the least loaded), whatever its tenant. Every hand-out happens in ``dispatch``,
which never awaits.

A generation whose worker fails (its process died, its connection broke, it stalled) **migrates**:
it goes to the front of the queue and continues on another worker after the tokens the client
already has (``resume_ids``), up to ``option.max_migrations`` times within its total deadline. An
operation (``lmi_core.operations``) changes no engine state and simply runs again. A moved request
waits only while a worker is coming (``option.migration_timeout``): it never waits on a job that
cannot be restarted.

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
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol, TypeVar

from lmi_core.config import ModelConfig
from lmi_core.engine import Finished, FinishReason, GenerationEvent, GenerationRequest, Token
from lmi_core.errors import (
    EngineFailedError,
    ModelNotReadyError,
    QueueFullError,
    TenantBudgetError,
    WorkerFailedError,
)
from lmi_core.operations import Operation
from lmi_core.serving.adapters import AdapterRegistry
from lmi_core.serving.deadlines import Deadlines, deadlines, waited_too_long
from lmi_core.serving.fairness import OUTPUT_COST, FairQueue, PlaceShares
from lmi_core.serving.observer import PoolObserver, TenantOutcome
from lmi_core.serving.request_trace import Attributes, AttributeValue, RequestTrace
from lmi_core.serving.routing import Decision, RequestContext, RouteQuery, Router, WorkerLoad, slot_worker
from lmi_core.serving.supervisor import SupervisedWorker, WorkerState
from lmi_core.serving.tenants import DEFAULT, Lease, Tenant, TenantSpec, estimate_prompt_tokens

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


@dataclass(frozen=True)
class Ticket:
    """Where a request waits and what its dispatch costs its tenant."""

    tenant: str
    weight: float
    label: str  # the tenant's metric label
    band: int  # its priority, clamped to its tenant's range
    prompt: int  # prompt tokens charged at dispatch (an estimate until the engine reports them)

    @classmethod
    def of(cls, tenant: Tenant, priority: int, prompt: int) -> Ticket:
        return cls(tenant.name, tenant.spec.weight, tenant.label, tenant.spec.clamp(priority), prompt)


class Waiting(NamedTuple):
    """A queued request: resolved with its worker, routed by its query."""

    future: asyncio.Future[Assignment]
    query: RouteQuery
    ticket: Ticket


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
        migration_timeout: float,
    ) -> None:
        self.workers = workers
        self.config = config
        self.queue_size = queue_size
        self.capacity = config.max_rolling_batch_size
        self.router = router
        self.observe = observe
        self.resumes_streams = resumes_streams  # the backend continues a stream after resume_ids
        self._adapters = adapters
        self.migration_timeout = migration_timeout  # how long a moved request waits while no worker is coming
        self._queue: FairQueue[Waiting] = FairQueue()
        self._shares = PlaceShares()
        # The tenant of requests that come without one (no HTTP context): no budget, weight 1.
        self._anonymous = Tenant(TenantSpec(DEFAULT), DEFAULT)

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

    def _pick(self, query: RouteQuery, tenant: str, moved: bool) -> Assignment | None:
        """The router's choice among the ready workers with free capacity, if ``tenant`` may take a
        place (a ``moved`` request always may: it had one); reserves it. None: it waits."""
        accepting = [w for w in self.workers.serving() if w.accepting]
        ready = [w for w in accepting if w.in_flight < self.capacity]
        if not ready:
            return None
        free = sum(self.capacity - w.in_flight for w in ready)
        total = self.capacity * len(accepting)
        if not moved and not self._shares.may_take(tenant, free, total, time.monotonic()):
            return None
        decision = self.router.route(query, [self._load(w) for w in ready])
        self.observe.routed(self.name, decision.reason)
        worker = next(w for w in ready if w.worker_id == decision.worker_id)
        worker.in_flight += 1
        self._shares.took(tenant)
        return worker, decision

    def dispatch(self) -> None:
        """Give free capacity to waiting requests in fair order; fail them if no worker can serve."""
        now = time.monotonic()
        while (entry := self._queue.peek(now)) is not None and (
            assignment := self._pick(entry.item.query, entry.tenant, entry.front)
        ) is not None:
            waiting = self._queue.take(entry, now)
            self.observe.tenant_queued(self.name, waiting.ticket.label, -1)
            waiting.future.set_result(assignment)
        if self._queue and (reason := self.workers.unservable()) is not None:
            self.fail_waiting(reason)

    def fail_waiting(self, message: str) -> None:
        for waiting in self._queue.drain():
            self.observe.tenant_queued(self.name, waiting.ticket.label, -1)
            waiting.future.set_exception(ModelNotReadyError(message))

    def _release(self, worker: SupervisedWorker, tenant: str) -> None:
        worker.in_flight -= 1
        self._shares.released(tenant, time.monotonic())
        self.workers.released(worker)
        self.dispatch()

    def _worker_coming(self) -> bool:
        """Whether a worker is up, or restarted far enough to load: READY (free or busy), or STARTING
        with every rank connected. A job that cannot reach one of its hosts is neither."""
        return any(
            w.state is WorkerState.READY or (w.state is WorkerState.STARTING and w.ranks_up)
            for w in self.workers.serving()
        )

    async def _wait_migrating(
        self, future: asyncio.Future[Assignment], until: float, failure: Exception
    ) -> None:
        """Wait for ``future`` until ``until``, but no longer than ``migration_timeout`` at a time
        while no worker is coming: then the request ends with its worker's failure. A stream never
        waits on a job that cannot be restarted (before: a partitioned rank host left it open, with
        no token and no error, until predict_timeout)."""
        while not future.done() and time.monotonic() < until:
            await asyncio.wait(
                {future}, timeout=max(0.0, min(until - time.monotonic(), self.migration_timeout))
            )
            if not future.done() and not self._worker_coming():
                raise WorkerFailedError(
                    f"{failure}; no worker could take the request within "
                    f"option.migration_timeout={self.migration_timeout:g} s (none is up or loading)"
                )

    async def _acquire(
        self, query: RouteQuery, limits: Deadlines, ticket: Ticket, migrating: Exception | None = None
    ) -> Assignment:
        """Reserve a slot on a worker: at once if one is free and nobody waits, else in fair order.

        A ``migrating`` request (its worker failed with that error) was admitted before every waiting
        one: it goes to the front of the queue, is never refused for a full queue, its prompt is not
        charged again, and it waits only while a worker is coming (``_wait_migrating``).
        """
        moved = migrating is not None
        if self.workers.closing and not moved:
            raise ModelNotReadyError(f"model {self.name} is shutting down")
        cost = 0 if moved else ticket.prompt
        now = time.monotonic()
        self._shares.came(ticket.tenant, ticket.weight, now)
        if not self._queue and (assignment := self._pick(query, ticket.tenant, moved)) is not None:
            self._queue.charge(ticket.tenant, cost, now)
            return assignment
        if (reason := self.workers.unservable()) is not None:
            raise ModelNotReadyError(reason)
        if len(self._queue) >= self.queue_size and not moved:
            raise QueueFullError(f"model {self.name}: the queue is full ({self.queue_size} requests waiting)")
        future: asyncio.Future[Assignment] = asyncio.get_running_loop().create_future()
        waiting = Waiting(future, query, ticket)
        entry = self._queue.push(waiting, ticket.tenant, ticket.weight, ticket.band, cost, front=moved)
        self.observe.tenant_queued(self.name, ticket.label, 1)
        self.dispatch()  # places kept back from the tenants ahead may be this one's to take
        if not future.done():
            self.workers.queued()  # it waits: the scaler may add a worker
        try:
            if migrating is not None:
                await self._wait_migrating(future, limits.queue, migrating)
            else:
                await asyncio.wait({future}, timeout=max(0.0, limits.queue - time.monotonic()))
        except BaseException:  # cancelled, or no worker is coming
            self._abandon(entry.item, self._queue.remove(entry))
            raise
        if not future.done():
            self._abandon(entry.item, self._queue.remove(entry))
            raise waited_too_long(limits, "worker took the request")
        return future.result()

    def _abandon(self, waiting: Waiting, dequeued: bool) -> None:
        """A waiting request gave up (timeout, client gone) and left the queue (``dequeued``), or was
        handed a worker just as it gave up: pass that worker on."""
        future = waiting.future
        if dequeued:
            self.observe.tenant_queued(self.name, waiting.ticket.label, -1)
        elif future.done() and not future.cancelled() and future.exception() is None:
            self._release(future.result()[0], waiting.ticket.tenant)
        future.cancel()

    def _deadlines(self, started: float, context: RequestContext | None) -> Deadlines:
        client = context.client_timeout if context is not None else None
        return deadlines(started, self.config.predict_timeout, self.config.queue_timeout, client)

    # -- running -----------------------------------------------------------------------------------

    def _tenant(self, context: RequestContext | None) -> Tenant:
        return context.tenant if context is not None and context.tenant is not None else self._anonymous

    async def generate(
        self, request: GenerationRequest, context: RequestContext | None = None, arrived: float | None = None
    ) -> AsyncGenerator[GenerationEvent, None]:
        """Admit ``request`` for its tenant, queue it, run it on the worker the router picks, yield its
        events; migrate it when its worker fails.

        ``context`` carries the HTTP request's session, timeout and tenant in, and gets the routing
        decision appended before the first event is yielded (so a response can name its worker
        before it starts). The engine gets the priority the queue used (clamped to the tenant's range).
        ``arrived`` (monotonic; default now) starts its deadlines and queue time: a request that
        waited for its model's load has waited since then.
        """
        started = time.monotonic() if arrived is None else arrived
        limits = self._deadlines(started, context)
        tenant = self._tenant(context)
        ticket = Ticket.of(tenant, request.priority, estimate_prompt_tokens(request))
        if ticket.band != request.priority:
            request = dataclasses.replace(request, priority=ticket.band)
        lease = self._admit_tenant(tenant, ticket, request.params.max_new_tokens, started)
        outcome: TenantOutcome = "cancelled"  # unless it finishes or fails: the consumer stopped listening
        # What the client has, ids only (a Token holds its text and log-probs): a migrated request
        # resumes after them. The first token carries the prompt's length, the last whether it ended.
        delivered: list[int] = []
        prompt = 0  # prompt tokens served: the estimate once dispatched, the engine's count once known
        try:
            query = self._query(request, context)
            trace = context.trace if context is not None else None
            ahead = {"lmi.queue.ahead": self.waiting}
            worker, decision = await self._admit(query, limits, ticket, trace, "lmi.queue", ahead)
            prompt = ticket.prompt
            self.observe.queue_time(self.name, time.monotonic() - started)
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
                            self._queue.charge(ticket.tenant, OUTPUT_COST, time.monotonic())
                            if first is None:
                                first = event
                                prompt = self._prompt_served(ticket.tenant, prompt, event.prompt_tokens)
                            last = event
                        else:
                            prompt = self._prompt_served(ticket.tenant, prompt, event.prompt_tokens)
                            outcome = "served"
                        yield event
                    return
                except (WorkerFailedError, EngineFailedError) as exc:  # the worker's fault, not the request's
                    movable = self.resumes_streams or not delivered
                    spent = migration >= self.config.max_migrations or time.monotonic() >= limits.total
                    if not movable or spent:
                        raise
                    failure = exc
                finally:
                    await events.aclose()
                    self._release(worker, ticket.tenant)
                if first is not None and last is not None and last.last:  # died after its last token
                    outcome = "served"
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
                moved: dict[str, AttributeValue] = {
                    "lmi.migration.from_worker": worker.worker_id,
                    "lmi.migration.delivered_tokens": len(delivered),
                    "error.type": type(failure).__name__,
                }
                # The total deadline still holds; the queue deadline was for the first wait only.
                until = dataclasses.replace(limits, queue=limits.total)
                worker, decision = await self._admit(
                    query, until, ticket, trace, "lmi.migration", moved, failure
                )
        except Exception:
            outcome = "error"
            raise
        finally:
            self._settle(lease, ticket, outcome, prompt, len(delivered))

    def _admit_tenant(self, tenant: Tenant, ticket: Ticket, max_new_tokens: int, started: float) -> Lease:
        """``tenant``'s lease for one request (a generation or an operation); its 429, counted."""
        try:
            return tenant.admit(ticket.prompt, max_new_tokens, started)
        except TenantBudgetError:
            self.observe.tenant_finished(self.name, ticket.label, "rejected", 0, 0)
            raise

    def _settle(self, lease: Lease, ticket: Ticket, outcome: TenantOutcome, prompt: int, output: int) -> None:
        """A request admitted by ``lease`` ended: its tenant's budget gets back what it did not use."""
        lease.release(prompt + output, time.monotonic())
        self.observe.tenant_finished(self.name, ticket.label, outcome, prompt, output)

    def _prompt_served(self, tenant: str, charged: int, reported: int | None) -> int:
        """The prompt tokens the engine ``reported`` (None: not yet), its tenant's service corrected
        from the ``charged`` estimate."""
        if reported is None or reported == charged:
            return charged
        self._queue.charge(tenant, reported - charged, time.monotonic())
        return reported

    def _query(self, request: GenerationRequest, context: RequestContext | None) -> RouteQuery:
        """The request's routing key, naming the worker of the per-worker port it came in on."""
        query = self.router.query(request, context)
        if context is None or context.worker_slot is None:
            return query
        worker = slot_worker((w.worker_id for w in self.workers.serving()), context.worker_slot)
        return dataclasses.replace(query, worker=worker)

    async def _admit(
        self,
        query: RouteQuery,
        limits: Deadlines,
        ticket: Ticket,
        trace: RequestTrace | None,
        span: str,
        attributes: Attributes,
        migrating: Exception | None = None,
    ) -> Assignment:
        """``_acquire``; on a traced request, recorded as the ``span`` of the wait (``lmi.queue``, or
        ``lmi.migration`` from a failed worker to the next) and the ``lmi.route`` of the decision."""
        if trace is None:
            return await self._acquire(query, limits, ticket, migrating)
        start = time.time_ns()
        try:
            worker, decision = await self._acquire(query, limits, ticket, migrating)
        except BaseException as exc:  # refused, timed out, or the client left while it waited
            trace.span(span, start, time.time_ns(), attributes, exc)
            raise
        now = time.time_ns()
        trace.span(span, start, now, attributes)
        route: dict[str, AttributeValue] = {
            "lmi.route.worker": decision.worker_id,
            "lmi.route.reason": decision.reason,
            "lmi.route.prefix_blocks": decision.matched,
            "lmi.route.worker_in_flight": worker.in_flight,
        }
        if decision.moved_from is not None:
            route["lmi.route.moved_from"] = decision.moved_from
        trace.span("lmi.route", now, now, route)
        return worker, decision

    async def perform(
        self, operation: Operation[T], context: RequestContext | None = None, arrived: float | None = None
    ) -> T:
        """Run ``operation`` on one of the workers and return its result (``arrived`` as for ``generate``).

        One that ``takes_slot`` (an embedding, a score, a handler's request) is admitted by its
        tenant's budgets like a generation: it counts in flight, its inputs' estimated tokens are
        charged and refunded to what its worker counted. It waits for a place like a generation,
        routed like one (its session's worker first); a light one (tokenize) goes at once to the least
        loaded ready worker, without a place or a charge, and waits in the queue only while no worker
        is ready. When its worker fails under it, an ``idempotent`` one runs again on another, at most
        ``max_migrations`` times, within its total deadline; any other fails with the worker.
        """
        started = time.monotonic() if arrived is None else arrived
        limits = self._deadlines(started, context)
        tenant = self._tenant(context)
        if not operation.takes_slot:
            return await self._perform(operation, context, limits, Ticket.of(tenant, 0, 0))
        ticket = Ticket.of(tenant, 0, operation.input_tokens())
        lease = self._admit_tenant(tenant, ticket, 0, started)
        outcome: TenantOutcome = "cancelled"  # unless it returns or fails: the caller stopped waiting
        used = ticket.prompt
        try:
            result = await self._perform(operation, context, limits, ticket)
            counted = operation.used_tokens(result)
            if counted is not None:
                used = self._prompt_served(ticket.tenant, ticket.prompt, counted)
            outcome = "served"
            return result
        except Exception:
            outcome = "error"
            raise
        finally:
            self._settle(lease, ticket, outcome, used, 0)

    async def _perform(
        self, operation: Operation[T], context: RequestContext | None, limits: Deadlines, ticket: Ticket
    ) -> T:
        """``perform``'s runs: on a worker, and on the next when its worker fails under it."""
        query = RouteQuery(session_id=context.session_id if context is not None else None)
        attempt, failure = 0, None  # the worker failure it moves on from, after the first attempt
        while True:
            light = None if operation.takes_slot else self._least_loaded()
            if light is not None:
                worker, decision = light, Decision(light.worker_id, "load")
            else:  # the queue deadline holds for the first wait only, as for a migrated generation
                wait = limits if failure is None else dataclasses.replace(limits, queue=limits.total)
                worker, decision = await self._acquire(query, wait, ticket, migrating=failure)
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
                failure = exc
            finally:
                if light is None:
                    self._release(worker, ticket.tenant)
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
