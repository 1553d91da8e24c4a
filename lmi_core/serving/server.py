"""The model server: registers models and keeps the right ones loaded (config -> backend -> mode ->
devices -> worker pool).

Models come and go at runtime (management API): ``load`` registers one and, unless it loads on
demand, loads it (in the request or in the background); ``scale`` re-plans its worker bounds;
``unload`` drains and forgets it. Device planning never awaits between reading which devices other
models hold and claiming them, so concurrent loads cannot be given the same GPU.

Residency (``residency``): a registered model is loaded by the first request that needs it (every
request that names it goes through ``get``/``default``, whose ``ResidentModel`` holds it; concurrent
requests share one load, and a failed load answers each of them with its error), is unloaded once
idle for its ``option.idle_timeout`` or its last request's ``keep_alive`` (never while held), and is
evicted, least recently used first, when a load needs its room under ``max_loaded_models`` or the
memory budget; a pinned model never is. Every transition is taken without awaiting between the
decision and the state change, so two loads cannot both take the same room, and each transition is
logged once and reported to the observer (loads, unloads by reason).

Every model, whatever its state, is one ``registry.ModelEntry`` under its name; readers get
snapshots (``describe``, ``health``), never the entries. ``http.state.ModelService`` is the part of
this class the HTTP handlers see.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Literal, TypeVar

import pluggy

from lmi_core.backends import resolve_model
from lmi_core.config import ModelConfig, ServerConfig
from lmi_core.errors import (
    BadRequestError,
    ConfigError,
    ModelNotFoundError,
    ModelNotReadyError,
    NoRoomError,
    QueueFullError,
    ServiceError,
)
from lmi_core.launch import devices, hosts, placement, preflight
from lmi_core.plugins import get_plugin_manager
from lmi_core.serving.adapters import adapter_registry
from lmi_core.serving.deadlines import Deadlines, waited_too_long
from lmi_core.serving.observer import NoObserver, PoolObserver, Tier, UnloadReason
from lmi_core.serving.pool import PoolSnapshot, WorkerPool
from lmi_core.serving.registry import Health, ModelEntry, ModelSnapshot, ModelState
from lmi_core.serving.residency import (
    CPU,
    Budget,
    Holder,
    ResidentModel,
    estimate,
    eviction,
    expiry,
    make_room,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

MIB = 1024**2


def only_model(served: Sequence[T], param: str) -> T:
    """The one model of ``served``; a 400 naming ``param`` (the field that names a model) otherwise."""
    if len(served) == 1:
        return served[0]
    raise BadRequestError(
        f"{param} is required: the server serves {len(served)} models, not one", param=param
    )


def _size(held: dict[str, int]) -> str:
    return ", ".join(f"{d} {n / MIB:.0f} MiB" for d, n in sorted(held.items())) or "not measured"


class ModelServer:
    """Every registered model, by name: registered, loading, loaded, unloading or failed."""

    def __init__(
        self,
        server: ServerConfig,
        pm: pluggy.PluginManager | None = None,
        observe: PoolObserver | None = None,
    ) -> None:
        self.server = server
        self.pm = pm or get_plugin_manager()
        self.observe = observe if observe is not None else NoObserver()  # every pool's (metrics)
        self._models: dict[str, ModelEntry] = {}
        self._own_runtime_dir = server.runtime_dir is None
        # Private 0700 directory for the worker sockets (mkdtemp creates it owner-only).
        self.runtime_dir = server.runtime_dir or tempfile.mkdtemp(prefix="lmi-")
        self._gpus: list[devices.Gpu] | None = None
        self._background: set[asyncio.Task[None]] = set()
        # Set (and replaced) at every residency transition: what waits for room or for a model's
        # pool captures it before deciding to wait, so no change between the two is missed.
        self._changed = asyncio.Event()

    async def gpus(self) -> list[devices.Gpu]:
        if self._gpus is None:
            self._gpus = await asyncio.to_thread(devices.discover_gpus)
            logger.info("devices: %s", devices.describe(self._gpus))
        return self._gpus

    def _taken(self, exclude: str) -> set[str]:
        """Devices other models hold or may scale onto."""
        return {
            d
            for name, entry in self._models.items()
            if name != exclude and entry.pool is not None
            for d in entry.pool.devices
        }

    async def plan(self, config: ModelConfig, *, alone: bool = False) -> devices.AllocationPlan:
        """Where ``config``'s workers go, keeping off other models' GPUs (unless ``load_on_devices``;
        ``alone``: as if no other model held any).

        Nothing awaits after the GPU inventory is known, so a caller that claims the plan's devices
        right after this returns cannot race another plan.
        """
        job = hosts.job_hosts(config) if config.mode == "mpi" else None  # the one read of the host list
        if job is not None:
            # Ranks on other hosts: their GPUs and cores, probed there, not this host's.
            inventory = await preflight.run(config, job)
            taken = self._taken(exclude=config.name)  # after the probes: another load may have claimed GPUs
            return placement.plan_across_hosts(config, job, inventory, taken, devices.omp_threads())
        gpus = await self.gpus()
        plan = devices.plan_allocation(
            devices.visible_ids(gpus),
            config.tensor_parallel_degree,
            config.pipeline_parallel_degree,
            config.min_workers,
            config.max_workers,
            config.load_on_devices,
            taken=set() if alone else self._taken(exclude=config.name),
            cpu_count=devices.cpu_count(),
        )
        threads = devices.omp_threads() if plan.on_cpu else None
        return dataclasses.replace(plan, threads_per_worker=threads) if threads else plan

    # -- registration --------------------------------------------------------------------------------

    def _add(self, config: ModelConfig, at_startup: bool = False) -> ModelEntry:
        """Claim ``config``'s name (409 if taken) with a REGISTERED entry, its backend resolved and
        its adapters directory registered; nothing is loaded."""
        if config.name in self._models:
            raise ServiceError(
                f"model {config.name!r} is already registered", status=409, type="ConflictException"
            )
        resolve_model(config, self.pm)
        entry = ModelEntry(
            config,
            ModelState.REGISTERED,
            on_demand=not config.loads_on_startup(self.server),
            adapters=adapter_registry(config),
            loaded_at_startup=at_startup,
        )
        self._models[config.name] = entry
        how = "loads on its first request" if entry.on_demand else "loads now"
        logger.info("model %s: registered (%s)", config.name, how)
        return entry

    def expect(self, configs: Iterable[ModelConfig]) -> None:
        """Register the startup models at once (``/ping`` says 503, not 200, until those that load at
        startup have: ``load_startup``)."""
        for config in configs:
            try:
                self._add(config, at_startup=True)
            except Exception as exc:  # listed FAILED (/ping 500); the loader reports it
                self._failed(config, exc, at_startup=True)

    def _failed(self, config: ModelConfig, exc: Exception, at_startup: bool = False) -> None:
        """List ``config``, which could not be registered, as FAILED (its name is free: see ``_add``)."""
        failed = ModelEntry(config, ModelState.FAILED, on_demand=False, error=str(exc))
        failed.loaded_at_startup = at_startup
        self._models[config.name] = failed

    async def register(self, config: ModelConfig) -> ModelEntry:
        """Register ``config``, claim its devices and create its pool; start no worker yet (the first
        half of a load, without the residency budget)."""
        entry = self._add(config)
        try:
            self._new_pool(entry, await self.plan(config))
        except Exception:
            self._forget(entry)
            raise
        return entry

    def _new_pool(self, entry: ModelEntry, plan: devices.AllocationPlan) -> WorkerPool:
        """Claim ``plan``'s devices for ``entry``: its pool, no worker started (no await: see ``plan``)."""
        config = entry.config
        config.tensor_parallel_degree = plan.tensor_parallel_degree
        socket_prefix = f"{self.runtime_dir}/{config.name}"
        entry.pool = WorkerPool(
            config, self.server, self.pm, plan, socket_prefix, self.observe, adapters=entry.adapters
        )
        entry.state = ModelState.LOADING
        logger.info(
            "model %s: loading: backend=%s mode=%s workers=%d..%d ranks/worker=%d",
            config.name,
            config.backend,
            config.mode,
            plan.min_workers,
            plan.max_workers,
            config.world_size,
        )
        self._notify()
        return entry.pool

    async def load(self, config: ModelConfig, *, wait: bool = True, keep_failed: bool = True) -> None:
        """Register ``config`` and, unless it loads on demand, load it; raise if no worker could.

        ``wait=False`` returns once registered and loads in the background. A model whose workers
        fail to load stays listed as FAILED (``/ping`` 500) when ``keep_failed``, else it is
        forgotten: a caller that got the error has nothing left to clean up. A registration that is
        refused (a bad key) raises to the caller whatever ``wait`` says, so it leaves nothing behind
        (a startup model's is listed FAILED by ``expect``).
        """
        entry = self._add(config)  # refused (a bad key, a taken name): nothing is left behind
        if entry.on_demand:
            return
        if wait:
            try:
                await self._load_task(entry)
            except Exception:
                if not keep_failed:
                    self._forget(entry)
                raise
        else:
            task = asyncio.get_running_loop().create_task(self._load_in_background(entry))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def load_startup(self, name: str) -> None:
        """Load the startup model ``name`` unless it loads on demand, was loaded by a request already,
        or was unregistered meanwhile; raise if it failed."""
        entry = self._models.get(name)
        if entry is None or entry.on_demand:
            return
        if entry.state is ModelState.FAILED:
            raise ModelNotReadyError(f"model {name} failed to register: {entry.error}")
        if entry.state is not ModelState.LOADED:
            await self._load_task(entry)

    async def _load_in_background(self, entry: ModelEntry) -> None:
        try:
            await self._load_task(entry)
        except Exception as exc:  # recorded in the model's entry; nobody awaits this task
            logger.debug("model %s: background load ended: %s", entry.name, exc)

    def _forget(self, entry: ModelEntry) -> None:
        # Only this very entry: a concurrent unload may have finished and a new load begun.
        if self._models.get(entry.name) is entry:
            del self._models[entry.name]
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- loading -------------------------------------------------------------------------------------

    def _load_task(self, entry: ModelEntry) -> asyncio.Task[WorkerPool]:
        """The load (or wake-up) under way for ``entry``, started if none is: concurrent requests
        share it."""
        if entry.loading is None or entry.loading.done():
            entry.state = ModelState.LOADING
            entry.loading = asyncio.get_running_loop().create_task(self._load(entry))
            entry.loading.add_done_callback(_retrieve)
            self._notify()
        return entry.loading

    async def _load(self, entry: ModelEntry) -> WorkerPool:
        name = entry.name
        started = time.monotonic()
        warm = entry.asleep
        progress = asyncio.get_running_loop().create_task(self._progress(name, started))
        try:
            pool = await self._claim_room(entry)
            claimed = time.monotonic()  # the load proper starts: what waited for room is not its cost
            if warm:
                await pool.wake_up()
            else:
                await pool.start()
        except BaseException as exc:
            progress.cancel()
            await self._load_failed(entry, exc)
            raise
        progress.cancel()
        seconds = time.monotonic() - claimed
        entry.state, entry.on_demand, entry.asleep, entry.error = ModelState.LOADED, True, False, None
        entry.loads += 1
        entry.max_model_len, entry.max_images = pool.max_model_len, pool.max_images
        tier: Tier = "warm" if warm else "cold"
        self.observe.model_load(name, tier, seconds)
        measured = await self._measure(pool)
        if measured:
            entry.held = entry.measured = measured
        waited = f" after {claimed - started:.1f} s waiting for room" if claimed - started >= 0.1 else ""
        logger.info(
            "model %s: loaded (%s) in %.1f s%s; holds %s", name, tier, seconds, waited, _size(entry.held)
        )
        if entry.in_use == 0:  # nobody's request loaded it (startup, management API): idle from now
            self._arm_expiry(entry)
        self._notify()
        return pool

    async def _load_failed(self, entry: ModelEntry, exc: BaseException) -> None:
        """A load that failed (or was cancelled): ``entry`` gives its room back. One that loads on
        demand stays registered (its next request tries again); a first load promised at registration
        leaves it FAILED. Being unregistered (``unload``) is not a failure.

        The state changes once its workers are gone (their devices and memory free): until then a
        request joins this load and gets its error."""
        message = str(exc) or type(exc).__name__
        if entry.pool is not None:
            await entry.pool.stop(f"model {entry.name} failed to load: {message}")
        entry.pool, entry.held, entry.asleep = None, {}, False
        if entry.state is not ModelState.UNLOADING and self._models.get(entry.name) is entry:
            entry.error = message
            entry.state = ModelState.REGISTERED if entry.on_demand else ModelState.FAILED
            logger.error("model %s: failed to load: %s", entry.name, message)
        self._notify()

    async def _progress(self, name: str, started: float) -> None:
        while True:
            await asyncio.sleep(5.0)
            logger.info("model %s still loading (%.0f s)...", name, time.monotonic() - started)

    # -- room ----------------------------------------------------------------------------------------

    async def _budget(self) -> tuple[Budget, dict[str, int]]:
        """The budget, and each GPU's memory by plan id."""
        gpus = await self.gpus()
        memory = dict(zip(devices.visible_ids(gpus), (g.total_memory for g in gpus), strict=True))
        budget = self.server.memory_budget
        capacity: dict[str, int] = {}
        if budget is not None:
            totals = memory or {CPU: await asyncio.to_thread(devices.host_memory)}
            capacity = {d: budget.of(total) for d, total in totals.items()}
        return Budget(self.server.max_loaded_models, capacity), memory

    def _holders(self, exclude: ModelEntry) -> list[Holder]:
        """The models that hold room, as the budget sees them."""
        return [
            Holder(
                entry.name,
                entry.held,
                entry.last_used,
                evictable=entry.state is ModelState.LOADED and entry.in_use == 0 and not entry.config.pinned,
                pinned=entry.config.pinned,
            )
            for entry in self._models.values()
            if entry is not exclude and entry.pool is not None
        ]

    def _need(
        self, entry: ModelEntry, plan: devices.AllocationPlan, memory: dict[str, int]
    ) -> dict[str, int]:
        """What ``entry`` will hold on ``plan``: its last load's measurement, else an estimate."""
        workers = max(1, plan.min_workers)
        used = sorted({d for g in plan.groups[:workers] for d in g.devices})
        if entry.measured and plan.on_cpu == (CPU in entry.measured):
            per_device = max(entry.measured.values())
            return dict.fromkeys(used, per_device) if used else {CPU: per_device}
        return estimate(entry.config, workers, used, memory)

    def _room_wait(self, config: ModelConfig) -> float:
        """How long a load waits for busy models to go idle: as long as a request waits for it."""
        return config.queue_timeout or config.predict_timeout

    async def _claim_room(self, entry: ModelEntry) -> WorkerPool:
        """Make room for ``entry`` (evicting least recently used idle models) and claim it with its
        pool (or, asleep, with the one it has); wait while only busy models hold the room, up to
        ``_room_wait``; a ``NoRoomError`` (503 + Retry-After) when only pinned ones do, or at the end."""
        deadline = time.monotonic() + self._room_wait(entry.config)
        while True:
            budget, memory = await self._budget()
            if entry.asleep and entry.pool is not None:
                plan_devices = sorted(entry.pool.devices)
                need = dict.fromkeys(plan_devices, max(entry.measured.values(), default=0))
                plan = None
            else:
                plan = await self._plan_evicting(entry, deadline)
                need = self._need(entry, plan, memory)
            # No await from here to the claim: the room decided is the room taken.
            room = make_room(need, self._holders(exclude=entry), budget)
            if room.victims is not None:
                evictions = [self._start_unload(self._models[v], "evicted") for v in room.victims]
                pool = entry.pool if plan is None else self._new_pool(entry, plan)
                assert pool is not None
                entry.held = need
                await asyncio.gather(*evictions)
                return pool
            if not room.wait:
                raise NoRoomError(f"model {entry.name} does not fit: {room.why}")
            await self._wait_for_change(deadline, f"model {entry.name} waits for room: {room.why}")

    async def _plan_evicting(self, entry: ModelEntry, deadline: float) -> devices.AllocationPlan:
        """``entry``'s plan; when other models hold the GPUs it needs, evict the least recently used
        idle holder and plan again (waiting for busy ones to go idle, up to ``deadline``)."""
        while True:
            try:
                return await self.plan(entry.config)
            except ConfigError:
                if entry.config.mode == "mpi":
                    raise
                try:
                    await self.plan(entry.config, alone=True)
                except ConfigError:
                    raise  # the model does not fit this host at all: evicting would not help
                holders = [h for h in self._holders(exclude=entry) if self._holds_gpus(h.name)]
                idle = sorted((h for h in holders if h.evictable), key=lambda h: h.last_used)
                if idle:
                    await self._start_unload(self._models[idle[0].name], "evicted")
                elif any(not h.pinned for h in holders):
                    await self._wait_for_change(deadline, f"model {entry.name} waits for a GPU")
                else:
                    raise

    def _holds_gpus(self, name: str) -> bool:
        pool = self._models[name].pool
        return pool is not None and bool(pool.devices)

    async def _wait_for_change(self, deadline: float, why: str) -> None:
        """Wait for the next residency transition; a ``NoRoomError`` saying ``why`` past ``deadline``."""
        remaining = deadline - time.monotonic()
        changed = self._changed
        if remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        if time.monotonic() >= deadline:
            raise NoRoomError(why)

    async def _measure(self, pool: WorkerPool) -> dict[str, int]:
        """What ``pool``'s workers hold now: GPU memory per device (NVML), else host memory."""
        pids = [pid for worker in pool.describe().workers for pid in worker.pids]
        if not pids:
            return {}
        if any(g.devices for g in pool.groups):
            gpus = await self.gpus()
            by_index = dict(zip((g.index for g in gpus), devices.visible_ids(gpus), strict=True))
            return await asyncio.to_thread(devices.gpu_bytes, pids, by_index)
        return {CPU: await asyncio.to_thread(devices.host_bytes, pids)}

    # -- what requests hold (residency.Loader) -------------------------------------------------------

    def hold(self, entry: ModelEntry) -> None:
        """A request holds ``entry`` from its arrival: it will not be unloaded until released."""
        entry.in_use += 1
        if entry.expiry is not None:
            entry.expiry.cancel()
            entry.expiry = None

    def release(self, entry: ModelEntry, keep_alive: float | None) -> None:
        """A request that held ``entry`` ended; its ``keep_alive`` (None: the model's idle timeout)
        decides when the model, once idle, unloads."""
        entry.in_use -= 1
        entry.last_used = time.monotonic()
        entry.keep_alive = keep_alive
        if entry.in_use == 0:
            self._arm_expiry(entry)
            self._notify()  # an idle model may be evicted now

    def _arm_expiry(self, entry: ModelEntry) -> None:
        rule = expiry(entry.keep_alive, entry.config.idle_timeout, entry.config.pinned)
        if rule is None or entry.state is not ModelState.LOADED:
            return
        seconds, reason = rule
        loop = asyncio.get_running_loop()
        entry.expiry = loop.call_later(seconds, self._expire, entry, reason)

    def _expire(self, entry: ModelEntry, reason: UnloadReason) -> None:
        entry.expiry = None
        registered = self._models.get(entry.name) is entry
        if registered and entry.in_use == 0 and entry.state is ModelState.LOADED:
            self._start_unload(entry, reason)

    async def acquire(self, entry: ModelEntry, limits: Deadlines) -> WorkerPool:
        """``entry``'s pool once it has one to queue in (loading it, or waiting for its load or
        unload), within ``limits.queue``; a load that fails raises its error here."""
        name = entry.name
        while True:
            if self._models.get(name) is not entry:
                raise ModelNotFoundError(f"Model or workflow not found: {name} (unregistered)")
            if entry.state is ModelState.FAILED:
                raise ModelNotReadyError(f"model {name} failed to load ({entry.error}); unregister it")
            if entry.pool is not None and not entry.asleep and entry.state is not ModelState.UNLOADING:
                return entry.pool
            if entry.state is ModelState.UNLOADING and entry.unloading is not None:
                awaited: asyncio.Task[WorkerPool] | asyncio.Task[None] = entry.unloading
            else:
                awaited = self._load_task(entry)
            await self._wait_for(entry, awaited, limits)

    async def _wait_for(
        self, entry: ModelEntry, awaited: asyncio.Task[WorkerPool] | asyncio.Task[None], limits: Deadlines
    ) -> None:
        """Wait for ``awaited`` (``entry``'s load or unload) or the next transition, within the queue
        deadline; raise the load's error if it failed."""
        queue_size = entry.config.job_queue_size or self.server.job_queue_size
        if entry.waiting >= queue_size:
            raise QueueFullError(f"model {entry.name}: the queue is full ({queue_size} requests waiting)")
        remaining = limits.queue - time.monotonic()
        if remaining <= 0:
            raise waited_too_long(limits, f"load of model {entry.name} finished")
        changed = asyncio.ensure_future(self._changed.wait())
        entry.waiting += 1
        try:
            await asyncio.wait({awaited, changed}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            entry.waiting -= 1
            changed.cancel()
        if awaited.done() and awaited is entry.loading:
            if awaited.cancelled():
                raise ModelNotFoundError(f"Model or workflow not found: {entry.name} (unregistered)")
            failure = awaited.exception()
            if isinstance(failure, ServiceError):
                raise failure
            if failure is not None:
                raise ModelNotReadyError(f"model {entry.name} failed to load: {failure}") from failure

    # -- unloading -----------------------------------------------------------------------------------

    def _start_unload(self, entry: ModelEntry, reason: UnloadReason) -> asyncio.Task[None]:
        """Begin unloading idle ``entry`` (no await: the caller's decision holds); its task."""
        assert entry.pool is not None, "only a loaded model is unloaded"
        on_gpu = any(g.devices for g in entry.pool.groups)
        action = eviction(entry.config, on_gpu, entry.asleep) if reason == "evicted" else "stop"
        entry.state = ModelState.UNLOADING
        entry.unloading = asyncio.get_running_loop().create_task(self._unload(entry, reason, action))
        entry.unloading.add_done_callback(_retrieve)
        logger.info(
            "model %s: unloading (%s%s)", entry.name, reason, ", to sleep" if action == "sleep" else ""
        )
        self._notify()
        return entry.unloading

    async def _unload(
        self, entry: ModelEntry, reason: UnloadReason, action: Literal["sleep", "stop"]
    ) -> None:
        pool = entry.pool
        assert pool is not None
        tier: Tier = "cold"
        try:
            if action == "sleep":
                try:
                    await pool.sleep()
                    tier, entry.asleep = "warm", True
                    entry.held = await self._measure(pool)
                except Exception as exc:  # a sleep that fails: stop it instead
                    logger.warning("model %s: sleep failed (%s); stopping it", entry.name, exc)
            if tier == "cold":
                await pool.stop()
                entry.pool, entry.held = None, {}
        finally:
            entry.unloading = None
            if self._models.get(entry.name) is entry and entry.state is ModelState.UNLOADING:
                entry.state = ModelState.LOADED if entry.asleep else ModelState.REGISTERED
            self.observe.model_unload(entry.name, reason, tier)
            logger.info("model %s: unloaded (%s, %s)", entry.name, reason, tier)
            self._notify()

    # -- what the HTTP handlers see (http.state.ModelService) ------------------------------------------

    def _entry(self, name: str) -> ModelEntry:
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFoundError(f"Model or workflow not found: {name}") from None

    def names(self) -> list[str]:
        """Every registered model, sorted, whatever its state."""
        return sorted(self._models)

    def describe(self, name: str) -> ModelSnapshot:
        return self._entry(name).snapshot()

    def health(self, name: str) -> Health:
        return self._entry(name).snapshot().health

    def get(self, name: str) -> ResidentModel:
        """The model ``name``, loaded or not (a request loads it); 404 for one that failed to load."""
        entry = self._entry(name)
        if entry.state is ModelState.FAILED:
            raise ModelNotFoundError(f"Model or workflow not found: {name}")
        return ResidentModel(entry, self)

    def served(self) -> list[ResidentModel]:
        """The models that take requests (every one but the failed), in registration order."""
        return [ResidentModel(e, self) for e in self._models.values() if e.state is not ModelState.FAILED]

    def default(self, param: str) -> ResidentModel:
        """The model a request names none of: the only one, else a 400 naming ``param``, the field
        that names a model."""
        return only_model(self.served(), param)

    def _pool_of(self, entry: ModelEntry) -> WorkerPool:
        """``entry``'s pool, or a 503 saying why it has none."""
        name = entry.name
        if entry.state is ModelState.FAILED:
            raise ModelNotReadyError(f"model {name} failed to load ({entry.error}); unregister it")
        if entry.pool is None:
            raise ModelNotReadyError(f"model {name} is not loaded; a request loads it")
        return entry.pool

    async def scale(
        self, name: str, min_workers: int | None, max_workers: int | None, *, wait: bool = True
    ) -> PoolSnapshot:
        """Set ``name``'s worker bounds; an omitted bound keeps its value unless the other crosses it."""
        pool = self._pool_of(self._entry(name))  # 404 for an unknown model, 503 without a pool
        if pool.closing:
            raise ModelNotReadyError(f"model {name} is being unregistered")
        hi = pool.max_workers if max_workers is None else max_workers
        lo = min(pool.min_workers, hi) if min_workers is None else min_workers
        if max_workers is None:
            hi = max(hi, lo)
        plan = await self.plan(pool.config.model_copy(update={"min_workers": lo, "max_workers": hi}))
        logger.info("model %s: scaling to %d..%d workers", name, plan.min_workers, plan.max_workers)
        await pool.resize(plan, wait=wait)
        # Kept for the model's next load, should it be unloaded.
        pool.config.min_workers, pool.config.max_workers = plan.min_workers, plan.max_workers
        return pool.describe()

    async def unload(self, name: str) -> None:
        """Forget ``name`` (the management API): drain and stop its workers (a loading model stops
        loading); counted as an unload for ``api`` when it was loaded."""
        entry = self._entry(name)
        if entry.expiry is not None:
            entry.expiry.cancel()
            entry.expiry = None
        was_loaded = entry.state is ModelState.LOADED
        if entry.unloading is not None:  # an idle unload under way: let it finish, then forget
            await asyncio.shield(entry.unloading)
        entry.state = ModelState.UNLOADING
        self._notify()
        if entry.loading is not None and not entry.loading.done() and entry.pool is None:
            entry.loading.cancel()  # still making room: nothing to stop
        pool, entry.pool, entry.held = entry.pool, None, {}
        if pool is not None:
            await pool.stop()
        self._forget(entry)
        if was_loaded:
            self.observe.model_unload(name, "api", "cold")
            logger.info("model %s: unloaded (api, cold)", name)

    async def shutdown(self) -> None:
        for entry in self._models.values():
            if entry.expiry is not None:
                entry.expiry.cancel()
            if entry.loading is not None and entry.pool is None:
                entry.loading.cancel()  # still waiting for room: nothing to stop
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        pools = [e.pool for e in self._models.values() if e.pool is not None]
        await asyncio.gather(*(pool.stop() for pool in pools), return_exceptions=True)
        self._models.clear()
        if self._own_runtime_dir:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.runtime_dir)


def _retrieve(task: asyncio.Task[WorkerPool] | asyncio.Task[None]) -> None:
    # Loads and unloads report their failures to those who wait for them (and in the log); mark
    # the exception seen so that asyncio does not log it again when nobody was waiting.
    if not task.cancelled():
        task.exception()
