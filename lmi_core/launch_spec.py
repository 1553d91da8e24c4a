"""What a launcher produces: the command line and addresses of one worker (one or many ranks)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class RankPlace:
    """One rank of a multi-host job: its host and what it sees there (``lmi_core.launch.placement``)."""

    rank: int
    host: str
    local_rank: int
    devices: tuple[str, ...]  # CUDA_VISIBLE_DEVICES on its host: every GPU of the job there; () on CPU
    threads: int | None  # OMP_NUM_THREADS; None: leave it to the engine (GPU hosts)

    def env(self) -> dict[str, str]:
        env = {"CUDA_VISIBLE_DEVICES": ",".join(self.devices)}
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        return env

    @property
    def device_ids(self) -> tuple[str, ...]:
        """This rank's GPU in server-wide terms (``host:index``), for the allocation bookkeeping."""
        return (f"{self.host}:{self.devices[self.local_rank]}",) if self.devices else ()


@dataclass(frozen=True)
class WorkerSlot:
    """The resources given to one worker: its devices, its socket path prefix, its CPU threads."""

    worker_id: int
    socket_base: str
    devices: tuple[str, ...] = ()
    threads: int | None = None
    # Multi-host MPI jobs: where each rank runs and what it sees there (lmi_core.launch.placement).
    ranks: tuple[RankPlace, ...] = ()


@dataclass
class LaunchSpec:
    """How to start one worker process (or ``mpirun`` job) and where its ranks listen."""

    argv: list[str]
    env: dict[str, str]
    rank_addresses: list[str]
    mode: Literal["python", "mpi"] = "python"
    # Label used to tag the worker's output lines in the server log.
    label: str = "worker"


def unix_address(socket_base: str, rank: int) -> str:
    """The Unix socket address rank ``rank`` of a worker binds."""
    return f"unix:{socket_base}.{rank}"


def worker_argv(python: str | None, socket_base: str, *extra: str) -> list[str]:
    """``python -m lmi_core.worker`` with the arguments every launcher passes."""
    return [python or sys.executable, "-m", "lmi_core.worker", "--socket", socket_base, *extra]


def worker_env(slot: WorkerSlot, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker: the server's, with the slot's devices and thread count."""
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(slot.devices)
    if slot.threads:
        env["OMP_NUM_THREADS"] = str(slot.threads)
    # A worker in another venv (option.pythonExecutable) must still import lmi_core from a source
    # checkout; an installed lmi_core is found through that venv's own site-packages instead.
    core_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if "site-packages" not in core_parent:
        paths = [core_parent, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env
