"""What the server knows about each model: one entry per name, and the one place health is derived.

An entry is a model's lifecycle state, its pool while it has one, and the error that failed it.
Invariant: ``pool`` is set exactly while the state is LOADING or LOADED; a WAITING or FAILED entry
has none. ``snapshot`` derives the model's health from its state and one ``WorkerPool.describe``, so
``/ping``, the management API and the metrics, which only render it, cannot disagree (for example
about a retiring worker, which never counts as ready).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from lmi_core.config import ModelConfig
from lmi_core.serving.pool import ModelStatus, PoolSnapshot, WorkerPool


class ModelState(enum.Enum):
    WAITING = "waiting"  # a startup model the loader has not reached yet
    LOADING = "loading"  # registered: its first workers are starting
    LOADED = "loaded"  # its pool's workers decide whether it serves
    FAILED = "failed"  # it could not be registered or no worker could load it: only removal is left


@dataclass(frozen=True)
class WorkerCounts:
    ready: int  # READY and taking requests (a retiring worker is not)
    total: int  # every worker the pool holds: starting, ready, failed or retiring
    minimum: int  # the model's min_workers


@dataclass(frozen=True)
class Health:
    """Whether a model can serve, and why not."""

    status: ModelStatus
    workers: WorkerCounts | None  # None: the model has no pool (waiting to load, or failed)
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
class ModelSnapshot:
    """A model at one instant: its health and, when it has a pool, the pool's snapshot it came from."""

    name: str
    url: str  # its model directory, else its model id
    loaded_at_startup: bool
    health: Health
    pool: PoolSnapshot | None


def health_of(state: ModelState, error: str | None, pool: PoolSnapshot | None) -> Health:
    """A model's health from its lifecycle state, its recorded error and its pool's snapshot."""
    if pool is None:
        status = ModelStatus.PENDING if state is ModelState.WAITING else ModelStatus.FAILED
        return Health(status, None, error if status is ModelStatus.FAILED else None)
    # While loading, a first ready worker does not make the model ready: the load is not done.
    status = ModelStatus.PENDING if state is ModelState.LOADING else pool.status
    counts = WorkerCounts(pool.ready_workers, len(pool.workers), pool.min_workers)
    return Health(status, counts, pool.last_failure if status is ModelStatus.FAILED else None)


@dataclass
class ModelEntry:
    """One registered model (see the module docstring for the invariant)."""

    config: ModelConfig
    state: ModelState
    pool: WorkerPool | None = None
    error: str | None = None
    loaded_at_startup: bool = False

    def snapshot(self) -> ModelSnapshot:
        pool = self.pool.describe() if self.pool is not None else None
        url = str(self.config.model_dir or self.config.model_id)
        health = health_of(self.state, self.error, pool)
        return ModelSnapshot(self.config.name, url, self.loaded_at_startup, health, pool)
