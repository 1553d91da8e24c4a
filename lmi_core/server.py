"""The model server: loads models (config -> backend -> mode -> devices -> worker pool) and owns them.

Models come and go at runtime (management API): ``load`` registers one (its name and its devices)
before starting its workers, in the request or in the background; ``scale`` re-plans its worker
bounds; ``unload`` drains it. Registration and device planning never await between reading which
devices other models hold and claiming them, so concurrent loads cannot be given the same GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import pluggy

from lmi_core import devices, preflight
from lmi_core.backends import select_backend
from lmi_core.config import ModelConfig, ServerConfig
from lmi_core.errors import ConfigError, ModelNotFoundError, ModelNotReadyError, ServiceError
from lmi_core.plugins import get_plugin_manager
from lmi_core.pool import Observer, WorkerPool

logger = logging.getLogger(__name__)


def resolve_model(config: ModelConfig, pm: pluggy.PluginManager) -> ModelConfig:
    """Fill in the backend and the mode, and let the backend check its options."""
    spec = select_backend(pm, config.backend_name, config.rolling_batch)
    config.backend = spec.name
    if config.mpi_mode is not None:  # an explicit option.mpi_mode always wins
        config.mode = "mpi" if config.mpi_mode else "python"
    elif config.engine == "MPI":
        config.mode = "mpi"
    else:
        mode = pm.hook.resolve_mode(config=config) or spec.default_mode
        if mode not in ("python", "mpi"):
            raise ConfigError("option.mpi_mode", mode, "a mode of python or mpi (from the backend plugin)")
        config.mode = mode
    pm.hook.validate_config(config=config)
    return config


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask: taskset, cgroup cpusets), not the host's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def omp_threads(environ: Mapping[str, str] | None = None) -> int | None:
    """Threads per worker process the user fixed with ``OMP_NUM_THREADS`` (as DJL), else None."""
    raw = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError("OMP_NUM_THREADS", raw, "a positive integer (threads per worker process on CPU)")
    return int(raw)


class ModelServer:
    """Every registered model's pool, by name."""

    def __init__(
        self,
        server: ServerConfig,
        pm: pluggy.PluginManager | None = None,
        observe: Observer = lambda model, event, value: None,
    ) -> None:
        self.server = server
        self.pm = pm or get_plugin_manager()
        self.observe = observe
        self.models: dict[str, ModelConfig] = {}  # every registered model: loading, serving or failed
        self.pools: dict[str, WorkerPool] = {}
        self.loading: dict[str, ModelConfig] = {}
        self.pending: set[str] = set()  # startup models not yet being loaded: /ping must not say 200
        self.failed: dict[str, str] = {}
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
        return {d for name, pool in self.pools.items() if name != exclude for d in pool.devices}

    async def plan(self, config: ModelConfig) -> devices.AllocationPlan:
        """Where ``config``'s workers go, keeping off other models' GPUs (unless ``load_on_devices``).

        Nothing awaits after the GPU inventory is known, so a caller that claims the plan's devices
        right after this returns cannot race another plan.
        """
        if config.mode == "mpi" and preflight.job_hosts(config) is not None:
            # Ranks on other hosts: their GPUs and cores, probed there, not this host's.
            return await preflight.plan_across_hosts(config, self._taken(config.name), omp_threads())
        gpus = await self.gpus()
        plan = devices.plan_allocation(
            devices.visible_ids(gpus),
            config.tensor_parallel_degree,
            config.pipeline_parallel_degree,
            config.min_workers,
            config.max_workers,
            config.load_on_devices,
            taken=self._taken(exclude=config.name),
            cpu_count=cpu_count(),
        )
        threads = omp_threads() if plan.on_cpu else None
        return dataclasses.replace(plan, threads_per_worker=threads) if threads else plan

    def _check_new(self, name: str) -> None:
        if name in self.models:
            raise ServiceError(f"model {name!r} is already registered", status=409, type="ConflictException")

    async def register(self, config: ModelConfig) -> WorkerPool:
        """Claim ``config``'s name and devices and create its pool; start no worker yet."""
        self._check_new(config.name)  # before planning: a duplicate is a 409, not a device error
        resolve_model(config, self.pm)
        plan = await self.plan(config)
        self._check_new(config.name)  # a concurrent registration may have taken the name meanwhile
        config.tensor_parallel_degree = plan.tensor_parallel_degree
        socket_prefix = f"{self.runtime_dir}/{config.name}"
        pool = WorkerPool(config, self.server, self.pm, plan, socket_prefix, self.observe)
        self.models[config.name] = config
        self.pools[config.name] = pool
        self.loading[config.name] = config
        self.failed.pop(config.name, None)
        logger.info(
            "loading model %s: backend=%s mode=%s workers=%d..%d ranks/worker=%d",
            config.name,
            config.backend,
            config.mode,
            plan.min_workers,
            plan.max_workers,
            config.world_size,
        )
        return pool

    async def load(self, config: ModelConfig, *, wait: bool = True, keep_failed: bool = True) -> WorkerPool:
        """Register ``config`` and start its workers; raise if no worker could load it.

        ``wait=False`` returns once registered and loads in the background. A model that fails to
        load stays listed as FAILED (``/ping`` 500) when ``keep_failed``, else it is forgotten: a
        caller that got the error has nothing left to clean up.
        """
        try:
            pool = await self.register(config)
        except Exception as exc:
            if keep_failed and config.name not in self.models:  # a duplicate must not fail the registered one
                self.failed[config.name] = str(exc)
            raise
        finally:
            self.pending.discard(config.name)
        if wait:
            await self._start(pool, keep_failed)
        else:
            task = asyncio.get_running_loop().create_task(self._start_in_background(pool, keep_failed))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return pool

    async def _start(self, pool: WorkerPool, keep_failed: bool) -> None:
        name = pool.name
        started = time.monotonic()
        progress = asyncio.get_running_loop().create_task(self._progress(name, started))
        try:
            await pool.start()
        except BaseException as exc:
            if not pool.closing:  # unloaded while loading: nothing failed, unload cleans up
                self.pools.pop(name, None)
                if keep_failed:
                    self.failed[name] = str(exc)
                else:
                    self.models.pop(name, None)
                await pool.stop()
            raise
        finally:
            progress.cancel()
            self.loading.pop(name, None)
        logger.info("model %s ready in %.1f s", name, time.monotonic() - started)

    async def _start_in_background(self, pool: WorkerPool, keep_failed: bool) -> None:
        try:
            await self._start(pool, keep_failed)
        except Exception as exc:  # recorded in self.failed; nobody awaits this task
            logger.error("model %s failed to load: %s", pool.name, exc)

    async def _progress(self, name: str, started: float) -> None:
        while True:
            await asyncio.sleep(5.0)
            logger.info("model %s still loading (%.0f s)...", name, time.monotonic() - started)

    def get(self, name: str) -> WorkerPool:
        try:
            return self.pools[name]
        except KeyError:
            raise ModelNotFoundError(f"Model or workflow not found: {name}") from None

    def config(self, name: str) -> ModelConfig:
        try:
            return self.models[name]
        except KeyError:
            raise ModelNotFoundError(f"Model or workflow not found: {name}") from None

    def default(self) -> WorkerPool:
        """The model a request names none of: the only one, else a 400."""
        if len(self.pools) == 1:
            return next(iter(self.pools.values()))
        raise ServiceError("Parameter model_name is required.", status=400, type="BadRequestException")

    async def scale(
        self, name: str, min_workers: int | None, max_workers: int | None, *, wait: bool = True
    ) -> WorkerPool:
        """Set ``name``'s worker bounds; an omitted bound keeps its value unless the other crosses it."""
        self.config(name)  # 404 for an unknown model
        pool = self.pools.get(name)
        if pool is None:
            raise ModelNotReadyError(f"model {name} failed to load ({self.failed.get(name)}); unregister it")
        if pool.closing:
            raise ModelNotReadyError(f"model {name} is being unregistered")
        hi = pool.max_workers if max_workers is None else max_workers
        lo = min(pool.min_workers, hi) if min_workers is None else min_workers
        if max_workers is None:
            hi = max(hi, lo)
        plan = await self.plan(pool.config.model_copy(update={"min_workers": lo, "max_workers": hi}))
        logger.info("model %s: scaling to %d..%d workers", name, plan.min_workers, plan.max_workers)
        await pool.resize(plan, wait=wait)
        return pool

    async def unload(self, name: str) -> None:
        """Forget ``name``: drain and stop its workers (a loading model stops loading)."""
        config = self.config(name)
        pool = self.pools.get(name)
        if pool is not None:
            await pool.stop()
        if self.models.get(name) is config:  # a concurrent unload may have finished (and a new load begun)
            del self.models[name]
            self.pools.pop(name, None)
            self.failed.pop(name, None)

    def status(self) -> dict[str, Any]:
        statuses = {name: pool.status for name, pool in self.pools.items()}
        statuses.update({name: "PENDING" for name in self.loading | dict.fromkeys(self.pending)})
        statuses.update({name: "FAILED" for name in self.failed})
        return statuses

    async def shutdown(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.gather(*(pool.stop() for pool in self.pools.values()), return_exceptions=True)
        self.pools.clear()
        if self._own_runtime_dir:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.runtime_dir)
