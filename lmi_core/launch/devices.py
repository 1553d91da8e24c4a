"""GPU discovery (NVML) and the allocation of devices to model workers.

``discover_gpus`` lists the GPUs this server may use, honouring an outer ``CUDA_VISIBLE_DEVICES``.
``plan_allocation`` is a pure function (visible device ids, parallelism, worker bounds) -> plan: each
worker gets a contiguous slice of ``tp * pp`` devices, passed to its process (or ``mpirun`` job) as
``CUDA_VISIBLE_DEVICES``. With no GPU the workers share the host CPU and split its threads.

``host_memory``, ``host_bytes`` and ``gpu_bytes`` measure what a model's workers hold (the residency
budget's footprints): the host's RAM, the proportional set size of their process trees (a shared
library counts once across the processes that map it, so the sum over models is the real total),
and the GPU memory NVML lists for those processes. They read ``/proc`` and NVML and block briefly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lmi_core.errors import ConfigError

if TYPE_CHECKING:
    from lmi_core.launch_spec import RankPlace

logger = logging.getLogger(__name__)

_GIB = 1024**3


@dataclass(frozen=True)
class Gpu:
    """One physical GPU as NVML reports it."""

    index: int  # NVML index (physical)
    uuid: str
    name: str
    total_memory: int  # bytes
    free_memory: int  # bytes

    @property
    def visible_id(self) -> str:
        """What goes into ``CUDA_VISIBLE_DEVICES`` for this GPU."""
        return str(self.index)


def query_nvml() -> list[Gpu]:
    """Every GPU NVML sees; ``[]`` when NVML is missing or fails (no driver, no library): CPU mode."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                Gpu(
                    index=index,
                    uuid=pynvml.nvmlDeviceGetUUID(handle),
                    name=pynvml.nvmlDeviceGetName(handle),
                    total_memory=int(memory.total),
                    free_memory=int(memory.free),
                )
            )
        return gpus
    except pynvml.NVMLError:
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass  # a failed shutdown must not discard what was read, nor turn "no GPU" into a crash


def _resolve_entry(entry: str, gpus: Sequence[Gpu], raw: str) -> Gpu:
    """One ``CUDA_VISIBLE_DEVICES`` entry: an index, or a (unique prefix of a) ``GPU-`` UUID."""
    if entry.isdigit():
        matches = [g for g in gpus if g.index == int(entry)]
    elif entry.upper().startswith("GPU-"):
        matches = [g for g in gpus if g.uuid.upper().startswith(entry.upper())]
    else:
        matches = []
    if len(matches) != 1:
        indices = ",".join(g.visible_id for g in gpus)
        problem = "is ambiguous" if matches else "names no GPU"
        raise ConfigError(
            "CUDA_VISIBLE_DEVICES",
            raw,
            f"GPU indices ({indices}) or GPU-<uuid> (prefixes) of this host; {entry!r} {problem}",
        )
    return matches[0]


def discover_gpus(
    environ: Mapping[str, str] | None = None, query: Callable[[], list[Gpu]] = query_nvml
) -> list[Gpu]:
    """GPUs this server may use, in outer ``CUDA_VISIBLE_DEVICES`` order when that is set.

    ``CUDA_VISIBLE_DEVICES`` entries are NVML indices or UUIDs (a unique ``GPU-`` prefix suffices, as
    CUDA accepts); ``""`` or ``-1`` hides every GPU. Logs one INFO line when the result is empty.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get("CUDA_VISIBLE_DEVICES")
    if raw is not None and raw.strip() in ("", "-1"):
        logger.info("no GPU found (CUDA_VISIBLE_DEVICES=%r hides all GPUs); running on CPU", raw)
        return []
    gpus = query()
    if not gpus:
        # Without NVML an outer CUDA_VISIBLE_DEVICES cannot be checked; CPU mode is the honest answer.
        logger.info("no GPU found (NVML is unavailable or reports no device); running on CPU")
        return []
    if raw is None:
        return gpus
    visible = [_resolve_entry(entry.strip(), gpus, raw) for entry in raw.split(",")]
    if len({g.index for g in visible}) != len(visible):
        raise ConfigError("CUDA_VISIBLE_DEVICES", raw, "each GPU at most once")
    return visible


def visible_ids(gpus: Sequence[Gpu], environ: Mapping[str, str] | None = None) -> list[str]:
    """Device ids for ``plan_allocation``: UUIDs when the outer ``CUDA_VISIBLE_DEVICES`` used UUIDs.

    A worker's ``CUDA_VISIBLE_DEVICES`` replaces the outer one, so its entries must be in the outer
    variable's terms: full UUIDs stay valid whatever order CUDA enumerates devices in.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get("CUDA_VISIBLE_DEVICES", "")
    by_uuid = any(not entry.strip().isdigit() for entry in raw.split(",") if entry.strip())
    return [g.uuid if by_uuid else g.visible_id for g in gpus]


def describe(gpus: Sequence[Gpu]) -> str:
    """One human-readable line for the startup log."""
    if not gpus:
        return "no GPU: running on CPU"
    parts = [
        f"{g.index}: {g.name} ({g.total_memory / _GIB:.1f} GiB, {g.free_memory / _GIB:.1f} GiB free)"
        for g in gpus
    ]
    return f"{len(gpus)} GPU{'s' if len(gpus) > 1 else ''}: " + "; ".join(parts)


@dataclass(frozen=True)
class DeviceGroup:
    """The devices of one worker (one process in Python mode, one ``mpirun`` job in MPI mode)."""

    worker_id: int
    devices: tuple[str, ...]  # CUDA_VISIBLE_DEVICES entries, in the outer variable's terms
    # Multi-host MPI jobs: each rank's host, devices and threads there; devices are then host:index.
    ranks: tuple[RankPlace, ...] = ()


@dataclass(frozen=True)
class AllocationPlan:
    """How one model's workers map onto devices."""

    groups: tuple[DeviceGroup, ...]  # every group the model may ever use (max_workers of them)
    min_workers: int
    max_workers: int
    world_size: int  # tp * pp ranks per worker
    tensor_parallel_degree: int  # "max" resolved
    on_cpu: bool
    threads_per_worker: int | None  # CPU only: OMP_NUM_THREADS for each rank process; None on GPU


def _positions(load_on_devices: str, devices: Sequence[str]) -> list[int]:
    """Parse ``"0;1"`` / ``"2,3"`` / ``"gpu4;gpu5"`` (DJL spelling) into positions into ``devices``."""
    n = len(devices)
    allowed = (
        f"'*' or distinct positions 0..{n - 1} of the {n} visible GPUs, separated by ';' or ','"
        if n
        else "'*' (no GPU is visible: running on CPU)"
    )
    entries = [e.strip().removeprefix("gpu") for e in load_on_devices.replace(";", ",").split(",")]
    if not all(e.isdigit() and int(e) < n for e in entries):
        raise ConfigError("load_on_devices", load_on_devices, allowed)
    positions = [int(e) for e in entries]
    if len(set(positions)) != len(positions):
        raise ConfigError("load_on_devices", load_on_devices, allowed)
    return positions


def check_tp_pp(tensor_parallel_degree: int | str, pipeline_parallel_degree: int) -> None:
    """A ``ConfigError`` unless tp is a positive integer or ``max`` and pp a positive integer."""
    tp_ok = tensor_parallel_degree == "max" or (
        isinstance(tensor_parallel_degree, int)
        and not isinstance(tensor_parallel_degree, bool)
        and tensor_parallel_degree >= 1
    )
    if not tp_ok:
        raise ConfigError(
            "option.tensor_parallel_degree", tensor_parallel_degree, "a positive integer or 'max'"
        )
    if isinstance(pipeline_parallel_degree, bool) or pipeline_parallel_degree < 1:
        raise ConfigError("option.pipeline_parallel_degree", pipeline_parallel_degree, "a positive integer")


def worker_bounds(min_workers: int | None, max_workers: int, limit: int | None, why: str) -> tuple[int, int]:
    """Validate resolved ``max_workers`` (against ``limit`` when there is one) and ``min_workers``."""
    if max_workers < 1:
        raise ConfigError("maxWorkers", max_workers, "at least 1")
    if limit is not None and max_workers > limit:
        raise ConfigError("maxWorkers", max_workers, f"at most {limit} ({why})")
    resolved_min = max_workers if min_workers is None else min_workers
    if resolved_min < 0:
        raise ConfigError("minWorkers", resolved_min, "at least 0")
    if resolved_min > max_workers:
        raise ConfigError("minWorkers", resolved_min, f"at most maxWorkers ({max_workers})")
    return resolved_min, max_workers


def plan_allocation(
    devices: Sequence[str],
    tensor_parallel_degree: int | str,
    pipeline_parallel_degree: int = 1,
    min_workers: int | None = None,
    max_workers: int | None = None,
    load_on_devices: str = "*",
    taken: Collection[str] = (),
    cpu_count: int | None = None,
) -> AllocationPlan:
    """Split the visible ``devices`` (``[]`` = CPU) into per-worker groups of ``tp * pp`` devices.

    Group i is the i-th contiguous slice of the usable devices (``0,2,3,7`` with TP 2 -> ``0,2`` and
    ``3,7``). Usable = ``devices`` restricted to the ``load_on_devices`` positions, minus ``taken``
    (devices other models use) unless ``load_on_devices`` names devices explicitly. On GPU the worker
    bounds default to filling the GPUs (min = max = number of groups); on CPU to one worker, with
    ``tensor_parallel_degree="max"`` meaning 1.
    """
    check_tp_pp(tensor_parallel_degree, pipeline_parallel_degree)
    pp = pipeline_parallel_degree
    if not devices:
        if load_on_devices.strip() != "*":
            _positions(load_on_devices, devices)  # raises: there is nothing to name
        tp = 1 if tensor_parallel_degree == "max" else int(tensor_parallel_degree)
        default_max = min_workers if min_workers else 1
        lo, hi = worker_bounds(min_workers, default_max if max_workers is None else max_workers, None, "")
        cpus = (os.cpu_count() or 1) if cpu_count is None else cpu_count
        return AllocationPlan(
            groups=tuple(DeviceGroup(i, ()) for i in range(hi)),
            min_workers=lo,
            max_workers=hi,
            world_size=tp * pp,
            tensor_parallel_degree=tp,
            on_cpu=True,
            # Every rank of every worker is a process on this host: split the cores evenly.
            threads_per_worker=max(1, cpus // (hi * tp * pp)),
        )

    if load_on_devices.strip() == "*":
        usable = [d for d in devices if d not in taken]
    else:
        usable = [devices[p] for p in _positions(load_on_devices, devices)]
    n = len(usable)
    note = f"usable GPUs: {','.join(usable) or 'none'}"
    if load_on_devices.strip() == "*" and n < len(devices):
        note += f"; {','.join(d for d in devices if d in taken)} used by other models"
    if n == 0:
        raise ConfigError(
            "load_on_devices",
            load_on_devices,
            f"a free GPU ({note}); name GPU positions explicitly to share them",
        )
    if pp > n:
        raise ConfigError(
            "option.pipeline_parallel_degree",
            pp,
            f"at most {n} ({n} GPUs cannot hold pipeline_parallel_degree={pp}; {note})",
        )
    tp = n // pp if tensor_parallel_degree == "max" else int(tensor_parallel_degree)
    per_worker = tp * pp
    if per_worker > n:
        shape = f"tensor_parallel_degree={tp}" + (f" x pipeline_parallel_degree={pp}" if pp > 1 else "")
        with_pp = f" with pipeline_parallel_degree={pp}" if pp > 1 else ""
        raise ConfigError(
            "option.tensor_parallel_degree",
            tensor_parallel_degree,
            f"at most {n // pp}{with_pp} ({n} GPUs cannot hold {shape}; {note})",
        )
    count = n // per_worker
    why = f"{n} GPUs / {per_worker} per worker = {count} workers"
    lo, hi = worker_bounds(
        min_workers, count if max_workers is None else max_workers, count, f"{why}; {note}"
    )
    return AllocationPlan(
        groups=tuple(DeviceGroup(i, tuple(usable[i * per_worker : (i + 1) * per_worker])) for i in range(hi)),
        min_workers=lo,
        max_workers=hi,
        world_size=per_worker,
        tensor_parallel_degree=tp,
        on_cpu=False,
        threads_per_worker=None,
    )


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


# -- what a model's workers hold -------------------------------------------------------------------


def meminfo_total(text: str) -> int | None:
    """``MemTotal`` of a ``/proc/meminfo`` text, in bytes."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None


def host_memory(proc: Path = Path("/proc")) -> int:
    """The host's RAM in bytes (a cgroup limit is not read: set ``SERVING_MEMORY_BUDGET`` in bytes)."""
    try:
        total = meminfo_total((proc / "meminfo").read_text())
    except OSError:
        total = None
    return total if total is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def process_tree(roots: Iterable[int], proc: Path = Path("/proc")) -> set[int]:
    """``roots`` and every live descendant (an MPI worker's ranks are its mpirun's children)."""
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    frontier = list(roots)
    while frontier:
        pid = frontier.pop()
        if pid not in found:
            found.add(pid)
            frontier.extend(children.get(pid, ()))
    return found


def pss_bytes(smaps_rollup: str) -> int | None:
    """The ``Pss`` of a ``/proc/<pid>/smaps_rollup`` text, in bytes."""
    for line in smaps_rollup.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return None


def host_bytes(roots: Iterable[int], proc: Path = Path("/proc")) -> int:
    """Host memory of ``roots``' process trees: their PSS (the resident set where the kernel has no
    ``smaps_rollup``). A process that exits meanwhile counts nothing."""
    total = 0
    for pid in process_tree(roots, proc):
        try:
            pss = pss_bytes((proc / str(pid) / "smaps_rollup").read_text())
            if pss is None:
                pss = int((proc / str(pid) / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
        total += pss
    return total


def gpu_bytes(roots: Iterable[int], device_ids: Mapping[int, str]) -> dict[str, int]:
    """GPU memory of ``roots``' process trees per device, from NVML's compute process lists;
    ``device_ids`` maps each NVML index to its id in the plans (``visible_ids``). Empty without NVML,
    or when NVML reports other PIDs (a container's PID namespace): the footprint stays an estimate."""
    try:
        import pynvml
    except ImportError:
        return {}
    pids = process_tree(roots)
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return {}
    try:
        used: dict[str, int] = {}
        for index, device in device_ids.items():
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if process.pid in pids and process.usedGpuMemory:
                    used[device] = used.get(device, 0) + int(process.usedGpuMemory)
        return used
    except pynvml.NVMLError:
        return {}
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
