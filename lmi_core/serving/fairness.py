"""The order in which one model's waiting requests get a worker: strict priority bands, then the
tenant with the least weighted service, then arrival.

Invariants, for ``FairQueue.peek`` (the next request to dispatch):

- a request put in ``front`` (a migrated one: it was admitted before every waiting request) goes
  before all others, fronted ones in the order they came;
- otherwise the lowest priority band first, whatever the tenant (vLLM's polarity: lower is earlier);
- within the band, the backlogged tenant whose decayed service divided by its weight is least; ties
  to the tenant whose oldest waiting request came first;
- a tenant's own requests of one band in arrival order.

Service is virtual-token-counter fairness as llm-d's least-attained-service policy counts it: prompt
tokens plus ``OUTPUT_COST`` per output token, halved every ``HALF_LIFE`` seconds (so a tenant's
history fades and an idle tenant comes back at the head of the line, and no counter grows for ever).
A request's prompt is charged when it is dispatched (an estimate: the tokenizer runs in the worker;
the dispatcher corrects it when the engine reports the real count), its output as it is generated.

``PlaceShares`` keeps places back for a light tenant: while more than one tenant is active (holds a
place, or came within ``RECENT`` seconds), a tenant holding at least its weighted share of the model's
places does not take the last ``reserved(total)`` free ones. A tenant sending one request at a time
beside a flood then finds a place at once, where with the queue's order alone it went first but
waited for a place to free (B's TTFT p95 under a 32-stream flood, 8 places: 9.9x its TTFT alone).
A tenant holding nothing is always below its share, so it is never held back by this.

Pure: the caller passes the time; nothing here awaits.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

OUTPUT_COST = 2.0  # an output token costs twice a prompt token (VTC, llm-d's program-aware policy)
HALF_LIFE = 60.0  # seconds for a tenant's attained service to halve (llm-d's default)
# Tenants remembered; past this the idle ones whose service has faded below one token are forgotten
# (a fairness header may name a new flow per request).
MAX_TRACKED = 4096
# One place in 16 (at least one) is kept for tenants below their share while others are active: at
# most that much capacity idles, and only for RECENT seconds after the last other tenant came.
RESERVE_EVERY = 16
RECENT = 30.0


def reserved(total: int) -> int:
    """The places of ``total`` that a tenant at or above its share leaves free."""
    return max(1, total // RESERVE_EVERY)


class Ledger:
    """Each tenant's attained service, decayed: ``value x 0.5 ** (elapsed / half_life)``."""

    def __init__(self, half_life: float = HALF_LIFE) -> None:
        self.half_life = half_life
        self._service: dict[str, tuple[float, float]] = {}  # tenant -> (value, when it was last updated)

    def service(self, tenant: str, now: float) -> float:
        value, at = self._service.get(tenant, (0.0, now))
        return value * math.pow(0.5, (now - at) / self.half_life)

    def charge(self, tenant: str, amount: float, now: float) -> None:
        """Add ``amount`` (negative: a correction) to ``tenant``'s service; it never goes below 0."""
        self._service[tenant] = (max(0.0, self.service(tenant, now) + amount), now)
        if len(self._service) > MAX_TRACKED:
            self.forget_faded(now)

    def forget_faded(self, now: float, keep: Iterable[str] = ()) -> None:
        """Drop the tenants whose service has faded below one token (``keep`` excepted)."""
        kept = set(keep)
        for tenant in [t for t in self._service if t not in kept and self.service(t, now) < 1.0]:
            del self._service[tenant]

    def __len__(self) -> int:
        return len(self._service)


@dataclass(eq=False)
class Entry(Generic[T]):
    """One waiting request: what the caller queued, and where it waits."""

    item: T
    tenant: str
    band: int
    cost: float  # charged to its tenant when it is dispatched (its prompt, estimated)
    front: bool
    seq: int = field(default=0)


class FairQueue(Generic[T]):
    """One model's waiting requests, in the order of the invariants above."""

    def __init__(self, ledger: Ledger | None = None) -> None:
        self.ledger = ledger if ledger is not None else Ledger()
        self._front: deque[Entry[T]] = deque()
        self._bands: dict[int, dict[str, deque[Entry[T]]]] = {}  # band -> tenant -> its requests
        self._weights: dict[str, float] = {}  # the weight each backlogged tenant last came with
        self._seq = itertools.count()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def push(
        self, item: T, tenant: str, weight: float, band: int = 0, cost: float = 0.0, front: bool = False
    ) -> Entry[T]:
        """Queue ``item`` for ``tenant`` (of ``weight``) in priority ``band``; returns its entry."""
        entry = Entry(item, tenant, band, cost, front, next(self._seq))
        if front:
            self._front.append(entry)
        else:
            self._bands.setdefault(band, {}).setdefault(tenant, deque()).append(entry)
            self._weights[tenant] = weight
        self._count += 1
        return entry

    def peek(self, now: float) -> Entry[T] | None:
        """The entry that goes next, left in the queue (``take`` it once it has a worker)."""
        if self._front:
            return self._front[0]
        if not self._bands:
            return None
        tenants = self._bands[min(self._bands)]

        def share(tenant: str) -> tuple[float, int]:
            return self.ledger.service(tenant, now) / self._weights[tenant], tenants[tenant][0].seq

        return tenants[min(tenants, key=share)][0]

    def take(self, entry: Entry[T], now: float) -> T:
        """Remove ``entry`` (dispatched) and charge its cost to its tenant."""
        self.remove(entry)
        if entry.cost:
            self.ledger.charge(entry.tenant, entry.cost, now)
        return entry.item

    def remove(self, entry: Entry[T]) -> bool:
        """Take ``entry`` out without charging it (it gave up); False if it was not queued."""
        if entry.front:
            waiting = self._front
        else:
            band = self._bands.get(entry.band, {})
            waiting = band.get(entry.tenant, deque())
        if waiting and waiting[0] is entry:
            waiting.popleft()
        elif entry in waiting:
            waiting.remove(entry)
        else:
            return False
        self._count -= 1
        if not entry.front and not waiting:
            del band[entry.tenant]
            if not band:
                del self._bands[entry.band]
            if not any(entry.tenant in tenants for tenants in self._bands.values()):
                del self._weights[entry.tenant]
        return True

    def drain(self) -> list[T]:
        """Remove every entry and return their items; none is charged."""
        items = [e.item for e in self._front]
        items += [e.item for band in sorted(self._bands) for q in self._bands[band].values() for e in q]
        self._front.clear()
        self._bands.clear()
        self._weights.clear()
        self._count = 0
        return items

    def charge(self, tenant: str, amount: float, now: float) -> None:
        """``tenant`` was served ``amount`` (tokens weighted by kind) outside a dispatch from here."""
        self.ledger.charge(tenant, amount, now)


class PlaceShares:
    """The places each tenant holds on one model's workers, and whether it may take one more."""

    def __init__(self, recent: float = RECENT) -> None:
        self.recent = recent
        self._held: dict[str, int] = {}
        self._seen: dict[str, tuple[float, float]] = {}  # tenant -> (its weight, when it last came)

    def came(self, tenant: str, weight: float, now: float) -> None:
        """A request of ``tenant`` (of ``weight``) arrived."""
        self._seen[tenant] = (weight, now)
        if len(self._seen) > MAX_TRACKED:
            self._forget_gone(now)

    def _forget_gone(self, now: float) -> None:
        """Forget the tenants that hold nothing and came more than ``recent`` seconds ago."""
        gone = [t for t, (_, at) in self._seen.items() if now - at > self.recent and t not in self._held]
        for tenant in gone:
            del self._seen[tenant]

    def __len__(self) -> int:
        """Tenants remembered."""
        return len(self._seen)

    def took(self, tenant: str) -> None:
        self._held[tenant] = self._held.get(tenant, 0) + 1

    def released(self, tenant: str, now: float) -> None:
        held = self._held.get(tenant, 0) - 1
        if held > 0:
            self._held[tenant] = held
        else:
            self._held.pop(tenant, None)
        weight, _ = self._seen.get(tenant, (1.0, now))
        self._seen[tenant] = (weight, now)  # it stays active for ``recent`` after its last place

    def may_take(self, tenant: str, free: int, total: int, now: float) -> bool:
        """Whether ``tenant`` may take one of ``free`` places (of ``total``): yes above the reserve;
        within it, only below its weighted share of ``total`` among the active tenants."""
        if free > reserved(total):
            return True
        self._forget_gone(now)
        if len(self._seen) < 2 or tenant not in self._seen:
            return True
        weights = sum(weight for weight, _ in self._seen.values())
        return self._held.get(tenant, 0) < total * self._seen[tenant][0] / weights
