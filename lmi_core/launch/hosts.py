"""The hosts of a multi-host MPI job (``option.mpi_hosts`` / ``option.mpi_hostfile``), read in one place.

Invariant: a model's host list is parsed once per plan, by ``job_hosts`` in ``ModelServer.plan``
(and once by ``lmi doctor``), and handed down as a ``JobHosts``: the preflight probes its hosts,
``placement.plan_across_hosts`` places its ranks, and a worker's launcher takes each rank's host
from its slot (``WorkerSlot.ranks``), never from the setting. Ranks fill the hosts as ``mpirun
--map-by slot`` does: each host's slots in the order the hosts are first listed. A bad list is a
``ConfigError`` naming the setting. Standard library only at run time: ``lmi_core.launch.placement``,
which runs on the ranks, imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lmi_core.errors import ConfigError
from lmi_core.launch.devices import check_tp_pp

if TYPE_CHECKING:
    from lmi_core.config import ModelConfig


def parse_hosts(hosts: str) -> list[str]:
    """Open MPI ``--host`` syntax (``h1:2,h2:2``; a repeated name is one more slot) -> one entry per slot."""
    slots: list[str] = []
    for item in filter(None, (h.strip() for h in hosts.split(","))):
        name, _, count = item.partition(":")
        if not name or (count and not count.isdigit()):
            raise ConfigError(
                "option.mpi_hosts", hosts, "HOST[:SLOTS][,HOST[:SLOTS]...] such as node1:4,node2:4"
            )
        slots += [name] * int(count or 1)
    return slots


def parse_hostfile(path: str) -> list[str]:
    """An Open MPI hostfile (``HOST slots=N`` lines, ``#`` comments) -> one entry per slot."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("option.mpi_hostfile", path, f"a readable hostfile ({exc.strerror})") from None
    slots: list[str] = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        counts = [f.partition("=")[2] for f in fields[1:] if f.startswith("slots=")]
        if len(counts) != 1 or not counts[0].isdigit():
            raise ConfigError("option.mpi_hostfile", path, f"'HOST slots=N' lines (got {line.strip()!r})")
        slots += [fields[0]] * int(counts[0])
    return slots


def host_slots(slots: Sequence[str]) -> list[tuple[str, int]]:
    """One entry per slot (``parse_hosts``) -> ``(host, slots)`` in first-listed order.

    Open MPI merges a repeated name into one node: ``a,b,a`` is ``a:2,b:1``, and ``--map-by slot``
    puts ranks 0 and 1 on ``a``.
    """
    counts: dict[str, int] = {}
    for host in slots:
        counts[host] = counts.get(host, 0) + 1
    return list(counts.items())


def used_hosts(hosts: Sequence[tuple[str, int]], world_size: int) -> list[tuple[str, int]]:
    """The hosts ``--map-by slot`` puts ``world_size`` ranks on, with the number of ranks on each."""
    used, left = [], world_size
    for host, slots in hosts:
        if left <= 0:
            break
        used.append((host, min(slots, left)))
        left -= slots
    return used


@dataclass(frozen=True)
class JobHosts:
    """The hosts of one multi-host job, as its setting lists them."""

    key: str  # the setting that named them: option.mpi_hostfile (it wins) or option.mpi_hosts
    value: str  # its value: the hostfile's path or the host list
    hosts: tuple[tuple[str, int], ...]  # (host, slots) in first-listed order, repeated names merged
    ranks: tuple[str, ...]  # the host of each rank: rank r on the r-th slot (--map-by slot)

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def used(self) -> list[tuple[str, int]]:
        """The hosts the job's ranks run on, with the number of ranks on each."""
        return used_hosts(self.hosts, self.world_size)


def job_hosts(config: ModelConfig) -> JobHosts | None:
    """``config``'s hosts, or None when every rank runs here (no host list).

    The job's world size is tp x pp, with ``tensor_parallel_degree=max`` meaning every listed slot
    (rounded down to whole pipeline stages).
    """
    if config.mpi_hostfile:
        key, value, listed = "option.mpi_hostfile", config.mpi_hostfile, parse_hostfile(config.mpi_hostfile)
    elif config.mpi_hosts:
        key, value, listed = "option.mpi_hosts", config.mpi_hosts, parse_hosts(config.mpi_hosts)
    else:
        return None
    if len(listed) < config.world_size:
        raise ConfigError(
            key, value, f"at least {config.world_size} slots (tp x pp ranks); it lists {len(listed)}"
        )
    tp, pp = config.tensor_parallel_degree, config.pipeline_parallel_degree
    check_tp_pp(tp, pp)
    hosts = host_slots(listed)
    world_size = (tp if isinstance(tp, int) else len(listed) // pp) * pp
    ranks = tuple(host for host, count in used_hosts(hosts, world_size) for _ in range(count))
    return JobHosts(key, value, tuple(hosts), ranks)
