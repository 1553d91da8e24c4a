"""Which of a pool's workers gets a request: its session's worker, else prefix-aware and load-aware.

``choose`` is the decision, a pure function of the policy, the prefix index, the candidates (ready
workers with free capacity) and the session's worker; ``Router`` keeps the state it reads (the index,
the sessions, a per-worker epoch that a restart bumps) and updates it with every decision.

Invariants: the chosen worker is always one of the candidates; a worker more than
``imbalance_abs`` requests *and* ``imbalance_rel`` times busier than the least-loaded candidate gets
neither a session's nor a prefix's request (the least-loaded one does: prefix-only routing without
this overloads hot replicas); a session whose worker restarted, retired or is not a candidate moves,
and the decision names the worker it moved from. A request for a LoRA adapter goes to a candidate
that holds it (its heartbeat lists it, or it was sent it within ``ADAPTER_MEMORY`` seconds), the
imbalance rule permitting, and only then to one that must load it.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from lmi_core.config import ModelConfig
from lmi_core.engine import CHARS_PER_TOKEN, GenerationRequest
from lmi_core.serving.prefix_index import (
    PrefixIndex,
    RoutingKey,
    block_hashes,
    render_messages,
)
from lmi_core.serving.request_trace import RequestTrace
from lmi_core.serving.tenants import Tenant

Reason = Literal["prefix", "session", "load", "adapter", "port"]
REASONS: tuple[Reason, ...] = ("prefix", "session", "load", "adapter", "port")
# Sessions remembered per model (least recently used forgotten first): ~100 bytes each, so 6 MiB.
MAX_SESSIONS = 65536
# How long a worker counts as holding an adapter it was sent without its heartbeat listing it yet:
# a few heartbeats (2 s each by default), enough for the engine's first step with it to report it.
ADAPTER_MEMORY = 10.0


@dataclass(frozen=True)
class RoutingPolicy:
    """The ``option.routing*`` settings of one model (their defaults are ``ModelConfig``'s)."""

    mode: Literal["least_loaded", "prefix_aware"]
    block_chars: int
    cache_blocks: int
    load_weight: float
    kv_weight: float
    imbalance_abs: int
    imbalance_rel: float

    @classmethod
    def from_config(cls, config: ModelConfig) -> RoutingPolicy:
        return cls(
            mode=config.routing,
            block_chars=config.routing_block_chars,
            cache_blocks=config.routing_cache_blocks,
            load_weight=config.routing_load_weight,
            kv_weight=config.routing_kv_weight,
            imbalance_abs=config.routing_imbalance_abs,
            imbalance_rel=config.routing_imbalance_rel,
        )


@dataclass(frozen=True)
class WorkerLoad:
    """A candidate worker as the router sees it."""

    worker_id: int
    in_flight: int  # requests the pool gave it that have not ended: queued in the engine or running
    capacity: int  # option.max_rolling_batch_size
    kv_usage: float | None = None  # fraction of its KV cache in use, where its engine reports it
    kv_tokens: int | None = None  # its KV cache capacity in tokens, where its engine reports it
    adapters: frozenset[str] = frozenset()  # LoRA adapters it holds (or was just sent)


@dataclass(frozen=True)
class Decision:
    worker_id: int
    reason: Reason
    matched: int = 0  # leading prompt blocks the worker was sent before
    moved_from: int | None = None  # the session's previous worker, when the session moved


@dataclass
class RequestContext:
    """One HTTP request as the pool sees it, built once at the HTTP edge and passed with each of its
    generations: what the client asked (its session, its timeout, the worker port it came in on), who
    it is for (its tenant) and what the server learns (the workers that served it; the model it ran
    on, the metrics' ``model`` label); its trace, when tracing is on, gets the pool's spans."""

    session_id: str | None = None
    client_timeout: float | None = None  # x-request-timeout's seconds: lowers the total deadline
    tenant: Tenant | None = None  # None: the pool's anonymous tenant (no budget, weight 1)
    served: list[Decision] = field(default_factory=list)  # appended by the pool at dispatch
    model: str = ""  # set when its first generation starts
    # The per-worker port it came in on (``slot_worker``): that worker is preferred, as a session's is.
    worker_slot: int | None = None
    trace: RequestTrace | None = None
    # Seconds its model stays loaded once idle after it (keep_alive: 0 unloads at once, inf never);
    # None: the model's option.idle_timeout.
    keep_alive: float | None = None


def slot_worker(worker_ids: Iterable[int], slot: int) -> int | None:
    """The worker that per-worker port ``slot`` names: the ``slot``-th of a pool's serving workers (not
    retiring, not FAILED) by id; None when the pool has fewer."""
    ids = sorted(worker_ids)
    return ids[slot] if 0 <= slot < len(ids) else None


@dataclass(frozen=True)
class RouteQuery:
    """A request's routing key, computed once when it arrives."""

    hashes: Sequence[int] = ()
    session_id: str | None = None
    adapter: str | None = None  # the LoRA adapter's name; None: the base model
    worker: int | None = None  # the worker of the port it came in on: preferred over its session's


def routing_key(request: GenerationRequest) -> RoutingKey:
    """What the prefix is read from: token ids when the request has them, else the prompt text, else
    the rendered messages."""
    if request.prompt_ids is not None:
        return request.prompt_ids
    if request.prompt is not None:
        return request.prompt
    return render_messages(request.messages or [])


def overloaded(worker: WorkerLoad, least: WorkerLoad, policy: RoutingPolicy) -> bool:
    """Both thresholds passed: an absolute gap alone is normal on big batches, a ratio alone on small."""
    gap = worker.in_flight - least.in_flight
    return gap > policy.imbalance_abs and worker.in_flight > policy.imbalance_rel * least.in_flight


def choose(
    policy: RoutingPolicy,
    index: PrefixIndex,
    candidates: Sequence[WorkerLoad],
    hashes: Sequence[int],
    pinned: int | None = None,
    adapter: str | None = None,
) -> Decision:
    """The worker for a request with prompt blocks ``hashes`` whose session is on ``pinned``, for
    LoRA ``adapter`` (None: the base model).

    Score = matched fraction of the prompt - load_weight x in_flight / capacity - kv_weight x KV use.
    No match anywhere: the least-loaded worker, ties to the one holding the fewest blocks (so new
    prefix families spread over the workers even when requests come one at a time), then the oldest.
    """
    if not candidates:
        raise ValueError("no candidate worker")
    least = min(candidates, key=lambda c: (c.in_flight, index.cached(c.worker_id), c.worker_id))
    if pinned is not None:
        target = next((c for c in candidates if c.worker_id == pinned), None)
        if target is not None and not overloaded(target, least, policy):
            return Decision(pinned, "session", index.matched(pinned, hashes))
    if adapter is not None:
        holders = [c for c in candidates if adapter in c.adapters and not overloaded(c, least, policy)]
        if holders and len(holders) < len(candidates):
            decision = choose(policy, index, holders, hashes)
            return decision if decision.reason != "load" else dataclasses.replace(decision, reason="adapter")
    if policy.mode == "least_loaded" or not hashes:
        return Decision(least.worker_id, "load")
    matches = {c.worker_id: index.matched(c.worker_id, hashes) for c in candidates}
    if not any(matches.values()):
        return Decision(least.worker_id, "load")

    def score(c: WorkerLoad) -> tuple[float, int, int, int]:
        value = matches[c.worker_id] / len(hashes)
        value -= policy.load_weight * c.in_flight / max(1, c.capacity)
        value -= policy.kv_weight * (c.kv_usage or 0.0)
        return value, -c.in_flight, -index.cached(c.worker_id), -c.worker_id

    best = max(candidates, key=score)
    if overloaded(best, least, policy):
        return Decision(least.worker_id, "load", matches[least.worker_id])
    matched = matches[best.worker_id]
    return Decision(best.worker_id, "prefix" if matched else "load", matched)


class Router:
    """The routing state of one pool: prefix index, sessions, worker epochs, decision counts."""

    def __init__(self, policy: RoutingPolicy) -> None:
        self.policy = policy
        self.index = PrefixIndex(policy.cache_blocks)
        self.decisions: dict[Reason, int] = dict.fromkeys(REASONS, 0)
        self._sessions: OrderedDict[str, tuple[int, int]] = OrderedDict()  # id -> (worker, epoch)
        self._epochs: dict[int, int] = {}
        self._sent: dict[int, dict[str, float]] = {}  # worker -> adapter -> monotonic time sent

    def query(self, request: GenerationRequest, context: RequestContext | None) -> RouteQuery:
        session = context.session_id if context is not None else None
        adapter = request.adapter.name if request.adapter is not None else None
        if self.policy.mode == "least_loaded":
            return RouteQuery((), session, adapter)  # no hashing: nothing reads it
        return RouteQuery(block_hashes(routing_key(request), self.policy.block_chars), session, adapter)

    def route(self, query: RouteQuery, candidates: Sequence[WorkerLoad]) -> Decision:
        """Choose among ``candidates``, then remember what the chosen worker was sent."""
        pin = self._sessions.get(query.session_id) if query.session_id is not None else None
        pinned = pin[0] if pin is not None and pin[1] == self._epochs.get(pin[0], 0) else None
        if query.worker is not None:  # its port's worker, under the same imbalance rule as a session's
            pin, pinned = None, query.worker
        decision = choose(self.policy, self.index, candidates, query.hashes, pinned, query.adapter)
        worker = decision.worker_id
        if query.adapter is not None:
            self.sent_adapter(worker, query.adapter)
        if query.worker is not None and decision.reason == "session":
            decision = dataclasses.replace(decision, reason="port")
        if pin is not None and (pinned is None or worker != pinned):
            decision = Decision(worker, decision.reason, decision.matched, moved_from=pin[0])
        self.decisions[decision.reason] += 1
        if query.hashes:
            chosen = next(c for c in candidates if c.worker_id == worker)
            budget = None
            if chosen.kv_tokens:  # the engine's KV capacity, in blocks of ours
                budget = chosen.kv_tokens * CHARS_PER_TOKEN // self.policy.block_chars
            self.index.record(worker, query.hashes, budget)
        if query.session_id is not None:
            self._sessions[query.session_id] = (worker, self._epochs.get(worker, 0))
            self._sessions.move_to_end(query.session_id)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return decision

    def sent_adapter(self, worker_id: int, adapter: str, now: float | None = None) -> None:
        """Remember that ``worker_id`` was sent ``adapter`` (a request for it, or a preload)."""
        self._sent.setdefault(worker_id, {})[adapter] = time.monotonic() if now is None else now

    def dropped_adapter(self, worker_id: int, adapter: str) -> None:
        """``worker_id`` was told to unload ``adapter``."""
        self._sent.get(worker_id, {}).pop(adapter, None)

    def recent_adapters(self, worker_id: int, now: float | None = None) -> set[str]:
        """The adapters sent to ``worker_id`` within ``ADAPTER_MEMORY`` seconds (older ones dropped)."""
        sent = self._sent.get(worker_id)
        if not sent:
            return set()
        now = time.monotonic() if now is None else now
        for name in [n for n, at in sent.items() if now - at > ADAPTER_MEMORY]:
            del sent[name]
        return set(sent)

    def forget(self, worker_id: int) -> None:
        """The worker restarted, failed or stopped: its cache is gone and its sessions must move."""
        self.index.forget(worker_id)
        self._sent.pop(worker_id, None)
        self._epochs[worker_id] = self._epochs.get(worker_id, 0) + 1
