"""What the server knows about each model: one entry per name, and the one place health is derived.

An entry is a model's residency state, its pool while it has one, its LoRA adapters (they outlive
its pools: an unloaded model keeps them) and what the residency policy tracks (who holds it, when
it was last used, what it holds in memory). Invariant: ``pool`` is set exactly while the state is
LOADING (once its devices are claimed), LOADED or UNLOADING; a REGISTERED or FAILED entry has none.

``snapshot`` derives the model's health from its state and one ``WorkerPool.describe``, so ``/ping``,
the management API and the metrics, which only render it, cannot disagree (for example about a
retiring worker, which never counts as ready). A model that loads on demand (``on_demand``) is
servable while it is registered, loading or unloading: a request loads it and waits. So residency
never turns ``/ping`` away from 200, while the first load of a model registered to load at once is
PENDING (503) until done and FAILED (500) if it fails, as before residency.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

from lmi_core.config import ModelConfig
from lmi_core.serving.adapters import AdapterRegistry
from lmi_core.serving.pool import ModelStatus, PoolSnapshot, WorkerPool


class ModelState(enum.Enum):
    """A model's residency: whether its weights are loaded. The values are the API's names."""

    REGISTERED = "registered"  # known, not loaded (its first request, or the startup loader, loads it)
    LOADING = "loading"  # making room, claiming devices, starting its first workers
    LOADED = "loaded"  # its pool's workers decide whether it serves
    UNLOADING = "unloading"  # draining, then stopping its workers; registered again after
    FAILED = "failed"  # its first load (at registration) failed: only removal is left


@dataclass(frozen=True)
class WorkerCounts:
    ready: int  # READY and taking requests (a retiring worker is not)
    total: int  # every worker the pool holds: starting, ready, failed or retiring
    minimum: int  # the model's min_workers


@dataclass(frozen=True)
class Health:
    """Whether a model can serve, and why not."""

    status: ModelStatus
    workers: WorkerCounts | None  # None: no pool, or one that is not what decides (loading on demand)
    error: str | None  # why it FAILED; None otherwise

    @property
    def below_minimum(self) -> bool:
        """Serving, but with fewer ready workers than min_workers (DJL's "Unhealthy", still served)."""
        return (
            self.status is ModelStatus.READY
            and self.workers is not None
            and self.workers.ready < self.workers.minimum
        )


@dataclass(frozen=True)
class Residency:
    """A model's residency at one instant (the management API and /v1/models render it)."""

    state: ModelState
    on_demand: bool  # a request loads it; idle, it may be unloaded (see ``ModelEntry.on_demand``)
    pinned: bool  # never evicted
    in_use: int  # requests holding it: waiting for its load, queued or running
    waiting: int  # of those, waiting for its load (its pool's queue counts the others)
    asleep: bool  # loaded, its engines asleep (vLLM's sleep mode): a request wakes them
    resident_bytes: int | None  # what its workers hold, measured after its load; None when not loaded
    expires_in: float | None  # seconds until it is unloaded idle; None: no such plan
    loads: int  # completed loads
    last_error: str | None  # why its last load on demand failed (it stays registered)


@dataclass(frozen=True)
class ModelSnapshot:
    """A model at one instant: its health and, when it has a pool, the pool's snapshot it came from."""

    name: str
    url: str  # its model directory, else its model id
    loaded_at_startup: bool
    health: Health
    pool: PoolSnapshot | None
    residency: Residency


def health_of(
    state: ModelState, error: str | None, pool: PoolSnapshot | None, on_demand: bool = False
) -> Health:
    """A model's health from its residency state, its recorded error, its pool's snapshot and whether
    it loads on demand."""
    if state is ModelState.FAILED:
        return Health(ModelStatus.FAILED, None, error)
    if on_demand and state is not ModelState.LOADED:
        return Health(ModelStatus.READY, None, None)  # a request loads it (or waits for its load)
    if pool is None:  # registered, its load at startup to come
        return Health(ModelStatus.PENDING, None, None)
    # While loading, a first ready worker does not make the model ready: the load is not done.
    status = ModelStatus.PENDING if state is not ModelState.LOADED else pool.status
    counts = WorkerCounts(pool.ready_workers, len(pool.workers), pool.min_workers)
    return Health(status, counts, pool.last_failure if status is ModelStatus.FAILED else None)


@dataclass
class ModelEntry:
    """One registered model (see the module docstring for the invariant)."""

    config: ModelConfig
    state: ModelState
    # False while its first load is one the server promised at registration (/ping waits for it);
    # True once loaded (every later load is on demand) or when registered with load_on_startup=false.
    on_demand: bool
    adapters: AdapterRegistry | None = None
    pool: WorkerPool | None = None
    error: str | None = None  # FAILED: why; REGISTERED: why its last load on demand failed
    loaded_at_startup: bool = False
    registered_at: float = field(default_factory=time.time)
    in_use: int = 0
    last_used: float = field(default_factory=time.monotonic)
    # What it holds while it holds room: bytes per device ("cpu", or a GPU id), estimated when its
    # load claims the room, then measured.
    held: dict[str, int] = field(default_factory=dict)
    measured: dict[str, int] = field(default_factory=dict)  # its last load's measurement (kept unloaded)
    max_model_len: int | None = None  # its engine's, as its last pool reported it
    max_images: int | None = None  # images one prompt may hold, as its last pool reported; None: not yet
    keep_alive: float | None = None  # the last request's keep_alive (None: option.idle_timeout)
    waiting: int = 0  # requests waiting for its load (before its pool takes them into its queue)
    asleep: bool = False  # LOADED, its engines asleep (the warm tier): a request wakes them first
    loads: int = 0
    loading: asyncio.Task[WorkerPool] | None = None
    unloading: asyncio.Task[None] | None = None
    expiry: asyncio.TimerHandle | None = None

    @property
    def name(self) -> str:
        return self.config.name

    def snapshot(self) -> ModelSnapshot:
        pool = self.pool.describe() if self.pool is not None else None
        url = str(self.config.model_dir or self.config.model_id)
        health = health_of(self.state, self.error, pool, self.on_demand)
        # The event loop's clock is time.monotonic().
        expires_in = None if self.expiry is None else max(0.0, self.expiry.when() - time.monotonic())
        residency = Residency(
            state=self.state,
            on_demand=self.on_demand,
            pinned=self.config.pinned,
            in_use=self.in_use,
            waiting=self.waiting,
            asleep=self.asleep,
            # What it holds once measured (asleep: what it holds asleep); an estimate is not shown.
            resident_bytes=sum(self.held.values())
            if self.state is ModelState.LOADED and self.measured
            else None,
            expires_in=expires_in,
            loads=self.loads,
            last_error=self.error if self.state is not ModelState.FAILED else None,
        )
        return ModelSnapshot(self.config.name, url, self.loaded_at_startup, health, pool, residency)
