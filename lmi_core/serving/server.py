"""The model server: loads models (config -> backend -> mode -> devices -> worker pool) and owns them.

Models come and go at runtime (management API): ``load`` registers one (its name and its devices)
before starting its workers, in the request or in the background; ``scale`` re-plans its worker
bounds; ``unload`` drains it. Registration and device planning never await between reading which
devices other models hold and claiming them, so concurrent loads cannot be given the same GPU.

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
from typing import TypeVar

import pluggy

from lmi_core.backends import resolve_model
from lmi_core.config import ModelConfig, ServerConfig
from lmi_core.errors import BadRequestError, ModelNotFoundError, ModelNotReadyError, ServiceError
from lmi_core.launch import devices, hosts, placement, preflight
from lmi_core.plugins import get_plugin_manager
from lmi_core.serving.observer import NoObserver, PoolObserver
from lmi_core.serving.pool import PoolSnapshot, WorkerPool
from lmi_core.serving.registry import Health, ModelEntry, ModelSnapshot, ModelState

logger = logging.getLogger(__name__)

T = TypeVar("T")


def only_model(served: Sequence[T], param: str) -> T:
    """The one model of ``served``; a 400 naming ``param`` (the field that names a model) otherwise."""
    if len(served) == 1:
        return served[0]
    raise BadRequestError(
        f"{param} is required: the server serves {len(served)} models, not one", param=param
    )


class ModelServer:
    """Every registered model, by name: loading, serving or failed."""

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

    async def plan(self, config: ModelConfig) -> devices.AllocationPlan:
        """Where ``config``'s workers go, keeping off other models' GPUs (unless ``load_on_devices``).

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
            taken=self._taken(exclude=config.name),
            cpu_count=devices.cpu_count(),
        )
        threads = devices.omp_threads() if plan.on_cpu else None
        return dataclasses.replace(plan, threads_per_worker=threads) if threads else plan

    # -- registration --------------------------------------------------------------------------------

    def expect(self, configs: Iterable[ModelConfig]) -> None:
        """List the startup models at once (``/ping`` says 503, not 200), before the loader reaches them."""
        for config in configs:
            self._models[config.name] = ModelEntry(config, ModelState.WAITING, loaded_at_startup=True)

    def _owns_name(self, config: ModelConfig) -> bool:
        """Whether ``config`` may take its name: it is free, or held for this very startup config."""
        entry = self._models.get(config.name)
        return entry is None or (entry.state is ModelState.WAITING and entry.config is config)

    def _check_new(self, config: ModelConfig) -> None:
        if not self._owns_name(config):
            raise ServiceError(
                f"model {config.name!r} is already registered", status=409, type="ConflictException"
            )

    async def register(self, config: ModelConfig) -> ModelEntry:
        """Claim ``config``'s name and devices and create its pool; start no worker yet."""
        self._check_new(config)  # before planning: a duplicate is a 409, not a device error
        resolve_model(config, self.pm)
        plan = await self.plan(config)
        self._check_new(config)  # a concurrent registration may have taken the name meanwhile
        config.tensor_parallel_degree = plan.tensor_parallel_degree
        socket_prefix = f"{self.runtime_dir}/{config.name}"
        pool = WorkerPool(config, self.server, self.pm, plan, socket_prefix, self.observe)
        at_startup = config.name in self._models  # only its own WAITING entry passes _check_new
        entry = ModelEntry(config, ModelState.LOADING, pool, loaded_at_startup=at_startup)
        self._models[config.name] = entry
        logger.info(
            "loading model %s: backend=%s mode=%s workers=%d..%d ranks/worker=%d",
            config.name,
            config.backend,
            config.mode,
            plan.min_workers,
            plan.max_workers,
            config.world_size,
        )
        return entry

    async def load(self, config: ModelConfig, *, wait: bool = True, keep_failed: bool = True) -> None:
        """Register ``config`` and start its workers; raise if no worker could load it.

        ``wait=False`` returns once registered and loads in the background. A model whose workers
        fail to load stays listed as FAILED (``/ping`` 500) when ``keep_failed``, else it is
        forgotten: a caller that got the error has nothing left to clean up. A registration that is
        refused (a bad key, no devices) raises to the caller whatever ``wait`` says, so it leaves
        nothing behind, unless it is a startup model's: its WAITING entry turns FAILED.
        """
        try:
            entry = await self.register(config)
        except Exception as exc:
            if self._owns_name(config) and config.name in self._models:  # its own WAITING entry
                failed = ModelEntry(config, ModelState.FAILED, error=str(exc), loaded_at_startup=True)
                self._record_failure(failed, keep_failed)
            raise
        if wait:
            await self._start(entry, keep_failed)
        else:
            task = asyncio.get_running_loop().create_task(self._start_in_background(entry, keep_failed))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _record_failure(self, entry: ModelEntry, keep: bool) -> None:
        """The FAILED ``entry`` holds its name (``/ping`` 500) until removed or, unless ``keep``, gives it up.

        Only for a name this load owns: its own entry, or its WAITING one, holds it.
        """
        if keep:
            self._models[entry.config.name] = entry
        else:
            self._models.pop(entry.config.name, None)

    def _forget(self, entry: ModelEntry) -> None:
        # Only this very entry: a concurrent unload may have finished and a new load begun.
        if self._models.get(entry.config.name) is entry:
            del self._models[entry.config.name]

    async def _start(self, entry: ModelEntry, keep_failed: bool) -> None:
        pool = entry.pool
        assert pool is not None, "a LOADING entry has a pool"
        name = pool.name
        started = time.monotonic()
        progress = asyncio.get_running_loop().create_task(self._progress(name, started))
        try:
            await pool.start()
        except BaseException as exc:
            if not pool.closing:  # unloaded while loading: nothing failed, unload cleans up
                entry.state, entry.pool, entry.error = ModelState.FAILED, None, str(exc)
                self._record_failure(entry, keep_failed)
                await pool.stop()
            raise
        finally:
            progress.cancel()
        entry.state = ModelState.LOADED
        logger.info("model %s ready in %.1f s", name, time.monotonic() - started)

    async def _start_in_background(self, entry: ModelEntry, keep_failed: bool) -> None:
        try:
            await self._start(entry, keep_failed)
        except Exception as exc:  # recorded in the model's entry; nobody awaits this task
            logger.error("model %s failed to load: %s", entry.config.name, exc)

    async def _progress(self, name: str, started: float) -> None:
        while True:
            await asyncio.sleep(5.0)
            logger.info("model %s still loading (%.0f s)...", name, time.monotonic() - started)

    # -- what the HTTP handlers see (http.state.ModelService) ------------------------------------------

    def _entry(self, name: str) -> ModelEntry:
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFoundError(f"Model or workflow not found: {name}") from None

    def names(self) -> list[str]:
        """Every registered model, sorted: waiting, loading, serving or failed."""
        return sorted(self._models)

    def describe(self, name: str) -> ModelSnapshot:
        return self._entry(name).snapshot()

    def health(self, name: str) -> Health:
        return self._entry(name).snapshot().health

    def get(self, name: str) -> WorkerPool:
        """The pool of a model that has one (loading or loaded); 404 otherwise."""
        pool = self._entry(name).pool
        if pool is None:
            raise ModelNotFoundError(f"Model or workflow not found: {name}")
        return pool

    def served(self) -> list[WorkerPool]:
        """The pools of the models that have one, in registration order."""
        return [entry.pool for entry in self._models.values() if entry.pool is not None]

    def default(self, param: str) -> WorkerPool:
        """The model a request names none of: the only one, else a 400 naming ``param``, the field
        that names a model."""
        return only_model(self.served(), param)

    def _pool_of(self, entry: ModelEntry) -> WorkerPool:
        """``entry``'s pool, or a 503 saying why it has none."""
        name = entry.config.name
        if entry.pool is None:
            if entry.state is ModelState.WAITING:
                raise ModelNotReadyError(f"model {name} has not started loading yet")
            raise ModelNotReadyError(f"model {name} failed to load ({entry.error}); unregister it")
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
        return pool.describe()

    async def unload(self, name: str) -> None:
        """Forget ``name``: drain and stop its workers (a loading model stops loading)."""
        entry = self._entry(name)
        if entry.state is ModelState.WAITING:  # the startup loader would register it anyway
            raise ModelNotReadyError(f"model {name} has not started loading yet; unregister it once it has")
        if entry.pool is not None:
            await entry.pool.stop()
        self._forget(entry)

    async def shutdown(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        pools = self.served()
        await asyncio.gather(*(pool.stop() for pool in pools), return_exceptions=True)
        self._models.clear()
        if self._own_runtime_dir:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.runtime_dir)
