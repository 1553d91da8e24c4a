"""Where each rank of a multi-host MPI job runs, and what it sees there (GPUs, threads).

Invariant: ``place_ranks`` follows ``mpirun --map-by slot`` exactly (each host's slots filled in the
order the hosts are first listed), and every rank's devices and thread count come from *its own
host's* inventory, never from the server's host. ``place_ranks`` and ``plan_across_hosts`` (the
model's ``AllocationPlan``) are pure functions of the parsed hosts (``lmi_core.launch.hosts``) and
the inventory the preflight probes found (``lmi_core.launch.preflight``).

A rank receives its share through ``LMI_RANK_ENV`` (a JSON list, one ``{variable: value}`` per
rank, forwarded with ``-x`` like every ``LMI_*``): ``python -m lmi_core.launch.placement WORKER-ARGV``
applies its entry and execs the worker, before anything reads ``CUDA_VISIBLE_DEVICES`` or
``OMP_NUM_THREADS``. ``mpirun -x NAME=VALUE`` cannot do this: its values are the same for all ranks.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmi_core.errors import ConfigError
from lmi_core.launch.devices import AllocationPlan, DeviceGroup, worker_bounds
from lmi_core.launch.hosts import JobHosts, used_hosts
from lmi_core.launch_spec import RankPlace

if TYPE_CHECKING:
    from lmi_core.config import ModelConfig

RANK_ENV = "LMI_RANK_ENV"


@dataclass(frozen=True)
class HostInventory:
    """What the probe found on one host: its GPUs (in its own ``CUDA_VISIBLE_DEVICES``) and cores."""

    gpus: int
    cpus: int


def place_ranks(
    hosts: Sequence[tuple[str, int]],
    world_size: int,
    inventory: Mapping[str, HostInventory],
    omp_threads: int | None = None,
    key: str = "option.mpi_hosts",
    taken: Collection[str] = (),
) -> tuple[RankPlace, ...]:
    """Rank r -> its host, local rank, devices and threads, or a ``ConfigError`` naming the host.

    GPU hosts: a host's slots must not exceed its GPUs; its ranks see GPUs ``0..n-1`` of that host
    and each takes ``LOCAL_RANK``. CPU hosts: ``omp_threads`` (the user's ``OMP_NUM_THREADS``) or
    the host's cores divided among the ranks on it. One job is all GPU or all CPU (a tensor parallel
    group cannot mix them). ``taken``: ``host:index`` GPUs that other models hold.
    """
    value = ",".join(f"{h}:{n}" for h, n in hosts)
    total = sum(n for _, n in hosts)
    if total < world_size:
        raise ConfigError(key, value, f"at least {world_size} slots (tp x pp ranks); it lists {total}")
    used = used_hosts(hosts, world_size)
    missing = [h for h, _ in used if h not in inventory]
    if missing:
        raise ConfigError(key, value, f"an inventory of every host (none for {', '.join(missing)})")
    kinds = {h: "GPU" if inventory[h].gpus else "CPU" for h, _ in used}
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"{h} {kind}" for h, kind in kinds.items())
        raise ConfigError(key, value, f"hosts that all have GPUs or all have none ({listing})")
    places: list[RankPlace] = []
    for host, count in used:
        gpus, cpus = inventory[host].gpus, inventory[host].cpus
        if gpus and count > gpus:
            raise ConfigError(key, value, f"at most {gpus} slots on {host} ({gpus} GPUs there)")
        devices = tuple(str(i) for i in range(count)) if gpus else ()
        busy = [f"{host}:{d}" for d in devices if f"{host}:{d}" in taken]
        if busy:
            raise ConfigError(key, value, f"GPUs no other model holds ({', '.join(busy)} are taken)")
        threads = omp_threads if gpus else omp_threads or max(1, cpus // count)
        first = len(places)
        places += [RankPlace(first + local, host, local, devices, threads) for local in range(count)]
    return tuple(places)


def plan_across_hosts(
    config: ModelConfig,
    job: JobHosts,
    inventory: Mapping[str, HostInventory],
    taken: Collection[str],
    omp_threads: int | None,
) -> AllocationPlan:
    """The allocation of a multi-host job: one worker, its ranks placed from ``inventory`` (what the
    preflight's probes found on each host), never from the server's host."""
    places = place_ranks(job.hosts, job.world_size, inventory, omp_threads, job.key, taken)
    lo, hi = worker_bounds(
        config.min_workers, config.max_workers or 1, 1, "one mpirun job spans every listed host"
    )
    ids = tuple(d for p in places for d in p.device_ids)
    return AllocationPlan(
        groups=tuple(DeviceGroup(i, ids, places) for i in range(hi)),
        min_workers=lo,
        max_workers=hi,
        world_size=job.world_size,
        tensor_parallel_degree=job.world_size // config.pipeline_parallel_degree,
        on_cpu=not ids,
        threads_per_worker=None,  # per rank, from its own host: see RankPlace.threads
    )


def rank_env(places: Sequence[RankPlace]) -> str:
    """The ``LMI_RANK_ENV`` value for ``places``."""
    return json.dumps([p.env() for p in places], separators=(",", ":"))


def main(argv: list[str] | None = None) -> None:
    """Apply this rank's entry of ``LMI_RANK_ENV`` and exec ``argv`` (the worker's command line)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.exit("usage: python -m lmi_core.launch.placement COMMAND...")
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMIX_RANK") or 0)
    env = dict(os.environ)
    entries = json.loads(env.get(RANK_ENV) or "[]")
    if rank < len(entries):
        env.update(entries[rank])
    os.execvpe(argv[0], argv, env)


if __name__ == "__main__":
    main()
