"""The model server: loads models (config -> backend -> mode -> devices -> worker pool) and owns them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import time
from typing import Any

import pluggy

from lmi_core import devices
from lmi_core.backends import select_backend
from lmi_core.config import ModelConfig, ServerConfig
from lmi_core.errors import ConfigError, ModelNotFoundError, ServiceError
from lmi_core.launch import WorkerSlot
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


class ModelServer:
    """Every loaded model's pool, by name."""

    def __init__(
        self,
        server: ServerConfig,
        pm: pluggy.PluginManager | None = None,
        observe: Observer = lambda model, event, value: None,
    ) -> None:
        self.server = server
        self.pm = pm or get_plugin_manager()
        self.observe = observe
        self.pools: dict[str, WorkerPool] = {}
        self.loading: dict[str, ModelConfig] = {}
        self.pending: set[str] = set()  # startup models not yet being loaded: /ping must not say 200
        self.failed: dict[str, str] = {}
        self._own_runtime_dir = server.runtime_dir is None
        # Private 0700 directory for the worker sockets (mkdtemp creates it owner-only).
        self.runtime_dir = server.runtime_dir or tempfile.mkdtemp(prefix="lmi-")
        self._gpus: list[devices.Gpu] | None = None

    async def gpus(self) -> list[devices.Gpu]:
        if self._gpus is None:
            self._gpus = await asyncio.to_thread(devices.discover_gpus)
            logger.info("devices: %s", devices.describe(self._gpus))
        return self._gpus

    def _taken(self) -> set[str]:
        return {d for pool in self.pools.values() for s in pool.slots for d in s.devices}

    async def plan(self, config: ModelConfig) -> tuple[list[WorkerSlot], int, int]:
        gpus = await self.gpus()
        plan = devices.plan_allocation(
            devices.visible_ids(gpus),
            config.tensor_parallel_degree,
            config.pipeline_parallel_degree,
            config.min_workers,
            config.max_workers,
            config.load_on_devices,
            taken=self._taken(),
        )
        config.tensor_parallel_degree = plan.tensor_parallel_degree
        slots = [
            WorkerSlot(
                worker_id=group.worker_id,
                socket_base=f"{self.runtime_dir}/{config.name}-w{group.worker_id}",
                devices=group.devices,
                threads=plan.threads_per_worker,
            )
            for group in plan.groups
        ]
        return slots, plan.min_workers, plan.max_workers

    async def load(self, config: ModelConfig) -> WorkerPool:
        """Resolve, allocate and start ``config``; raise if no worker could load it."""
        if config.name in self.pools or config.name in self.loading:
            raise ServiceError(f"model {config.name!r} is already registered", status=409, type="ConflictException")
        try:
            return await self._load(config)
        except Exception as exc:
            self.failed[config.name] = str(exc)
            raise
        finally:
            self.pending.discard(config.name)

    async def _load(self, config: ModelConfig) -> WorkerPool:
        resolve_model(config, self.pm)
        slots, min_workers, max_workers = await self.plan(config)
        pool = WorkerPool(config, self.server, self.pm, slots, min_workers, max_workers, self.observe)
        self.failed.pop(config.name, None)
        logger.info(
            "loading model %s: backend=%s mode=%s workers=%d..%d ranks/worker=%d",
            config.name, config.backend, config.mode, min_workers, max_workers, config.world_size,
        )
        started = time.monotonic()
        progress = asyncio.get_running_loop().create_task(self._progress(config.name, started))
        self.loading[config.name] = config
        self.pools[config.name] = pool
        try:
            await pool.start()
        except BaseException:
            self.pools.pop(config.name, None)
            await pool.stop()
            raise
        finally:
            progress.cancel()
            self.loading.pop(config.name, None)
        logger.info("model %s ready in %.1f s", config.name, time.monotonic() - started)
        return pool

    async def _progress(self, name: str, started: float) -> None:
        while True:
            await asyncio.sleep(5.0)
            logger.info("model %s still loading (%.0f s)...", name, time.monotonic() - started)

    def get(self, name: str) -> WorkerPool:
        try:
            return self.pools[name]
        except KeyError:
            raise ModelNotFoundError(f"Model or workflow not found: {name}") from None

    def default(self) -> WorkerPool:
        """The model a request names none of: the only one, else a 400."""
        if len(self.pools) == 1:
            return next(iter(self.pools.values()))
        raise ServiceError("Parameter model_name is required.", status=400, type="BadRequestException")

    async def unload(self, name: str) -> None:
        pool = self.get(name)
        self.pools.pop(name, None)
        await pool.stop()

    def status(self) -> dict[str, Any]:
        statuses = {name: pool.status for name, pool in self.pools.items()}
        statuses.update({name: "PENDING" for name in self.loading | dict.fromkeys(self.pending) if name not in statuses})
        statuses.update({name: "FAILED" for name in self.failed})
        return statuses

    async def shutdown(self) -> None:
        await asyncio.gather(*(pool.stop() for pool in self.pools.values()), return_exceptions=True)
        self.pools.clear()
        if self._own_runtime_dir:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.runtime_dir)
