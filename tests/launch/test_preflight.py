"""The multi-host preflight's checks (a pure function of the probes' reports) and the probe itself."""

from __future__ import annotations

import copy
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lmi_core.config import ModelConfig, build_model_config
from lmi_core.errors import PreflightError
from lmi_core.launch import preflight
from lmi_core.launch.hosts import JobHosts, job_hosts

LOCAL: dict[str, Any] = {
    "hostname": "server",
    "resolves_to": "10.0.0.1",
    "python": "3.11.7",
    "versions": {"lmi-core": "0.1.0", "torch": "2.5.1"},
    "gpus": 4,
    "cpus": 32,
    "interfaces": ["lo", "eth0"],
    "env": {},
    "model_readable": None,
    "ports_taken": [],
}
REQUEST = {"model": "/models/m", "rank_ports": [5000, 5001, 5002, 5003], "master_port": 6000}
HOSTS = [("node1", 4), ("node2", 4)]


def report(**changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(LOCAL)
    out["model_readable"] = True
    out.update(changes)
    return out


def test_healthy_hosts_pass() -> None:
    assert preflight.checks(HOSTS, {"node1": report(), "node2": report()}, LOCAL, REQUEST) == []


@pytest.mark.parametrize(
    ("changes", "line"),
    [
        ({"python": "3.10.12"}, "node2: python: 3.10.12 (the server runs 3.11.7)"),
        ({"versions": {"lmi-core": "0.0.9", "torch": "2.5.1"}}, "node2: versions: lmi-core 0.0.9"),
        ({"versions": {"lmi-core": "0.1.0"}}, "node2: versions: torch missing (the server has 2.5.1)"),
        ({"model_readable": False}, "node2: model: /models/m is not readable there"),
        ({"ports_taken": [6000]}, "node2: ports: MASTER_PORT 6000 is in use"),
        ({"ports_taken": [5002]}, "node2: ports: rank port 5002 is in use"),
        ({"env": {"GLOO_SOCKET_IFNAME": "ib0"}}, "node2: interface: GLOO_SOCKET_IFNAME=ib0: no ib0"),
        ({"env": {"NCCL_SOCKET_IFNAME": "=eth"}}, "node2: interface: NCCL_SOCKET_IFNAME==eth: no =eth"),
        ({"resolves_to": "127.0.1.1"}, "node2: interface: its hostname server resolves to 127.0.1.1"),
        ({"gpus": 8}, "node2: slots: 4 slots but 8 GPUs (give it slots=8)"),
    ],
)
def test_each_failure_is_one_line_naming_the_host_and_the_check(changes: dict[str, Any], line: str) -> None:
    failures = preflight.checks(HOSTS, {"node1": report(), "node2": report(**changes)}, LOCAL, REQUEST)
    assert len(failures) == 1 and failures[0].startswith(line), failures


def test_interface_names_nccl_prefixes_and_exclusions() -> None:
    ok = {"NCCL_SOCKET_IFNAME": "eth", "GLOO_SOCKET_IFNAME": "eth0,lo"}
    assert preflight.checks(HOSTS, {"node1": report(env=ok), "node2": report()}, LOCAL, REQUEST) == []
    assert not preflight._interface_missing("NCCL_SOCKET_IFNAME", "^docker,lo", ["lo"])
    assert preflight._interface_missing("GLOO_SOCKET_IFNAME", "eth", ["eth0"]) == ["eth"]


def test_a_gloo_interface_silences_the_loopback_warning() -> None:
    fixed = report(resolves_to="127.0.1.1", env={"GLOO_SOCKET_IFNAME": "eth0"})
    assert preflight.checks(HOSTS, {"node1": report(), "node2": fixed}, LOCAL, REQUEST) == []


def test_loopback_is_fine_when_every_rank_is_on_one_host() -> None:
    alone = report(resolves_to="127.0.1.1")
    assert preflight.checks([("node1", 4)], {"node1": alone}, LOCAL, REQUEST) == []


def test_an_unreachable_host_is_named() -> None:
    reports = {"node1": "unreachable by ssh: ssh: connect to host node1 port 22: Connection refused"}
    reports["node2"] = report()  # type: ignore[assignment]
    (line,) = preflight.checks(HOSTS, reports, LOCAL, REQUEST)
    assert line == f"node1: reachable: {reports['node1']}"


def test_ports_of_each_host_are_its_ranks_and_rank_0s_master_port() -> None:
    assert preflight._ports_for(REQUEST, [("a", 1), ("b", 3)], "a") == [5000, 6000]
    assert preflight._ports_for(REQUEST, [("a", 1), ("b", 3)], "b") == [5001, 5002, 5003]


def test_the_probe_reports_this_host(tmp_path: Path) -> None:
    request = json.dumps({"model": str(tmp_path), "ports": []})
    run = subprocess.run(
        [sys.executable, "-m", "lmi_core.launch.preflight", "--probe", request],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    (line,) = [x for x in run.stdout.splitlines() if x.startswith(preflight.PROBE_PREFIX)]
    found = json.loads(line.removeprefix(preflight.PROBE_PREFIX))
    assert found["model_readable"] is True and found["cpus"] >= 1 and "lo" in found["interfaces"]
    assert found["versions"]["lmi-core"] == preflight._versions()["lmi-core"]


def two_host_job() -> tuple[ModelConfig, JobHosts]:
    """A TP-2 job with one rank on each of the hosts ``x`` and ``y``."""
    config = build_model_config(
        {"option.model_id": "/models/m", "option.tensor_parallel_degree": "2", "option.mpi_hosts": "x:1,y:1"},
        name="m",
        environ={},
    )
    job = job_hosts(config)
    assert job is not None
    return config, job


async def test_an_agent_that_cannot_connect_fails_the_preflight_before_any_rank(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # An agent that fails like ssh does (exit 255, its message on stderr), for every host; the host
    # follows mpirun's "-x" and the ssh arguments.
    agent = tmp_path / "ssh"
    host = "eval host=\\${$(($# - 1))}"
    agent.write_text(
        f'#!/bin/sh\n{host}\necho "ssh: connect to host $host port 22: No route to host" >&2\nexit 255\n'
    )
    agent.chmod(0o755)
    monkeypatch.setenv("PRTE_MCA_plm_ssh_agent", str(agent))
    monkeypatch.setenv("PRTE_MCA_plm_ssh_args", "-o ConnectTimeout=3")
    monkeypatch.setattr(preflight, "is_local", lambda host: False)  # no name lookup (DNS) for x and y
    config, job = two_host_job()
    with pytest.raises(PreflightError) as info:
        await preflight.run(config, job)
    assert info.value.failures == [
        f"{h}: reachable: unreachable by ssh -x -o ConnectTimeout=3: ssh: connect to host {h} port 22: "
        "No route to host"
        for h in ("x", "y")
    ]


@pytest.mark.parametrize("busy_draws", [preflight.PORT_DRAWS - 1, preflight.PORT_DRAWS])
async def test_sampled_ports_in_use_are_drawn_again_before_failing(
    monkeypatch: pytest.MonkeyPatch, busy_draws: int
) -> None:
    # Another job's sockets on the host took the sampled ports: only ports taken in every draw fail.
    draws: list[list[int]] = []

    async def probe_host(host: str, python: str, request: dict[str, Any]) -> dict[str, Any]:
        if host == "y":
            draws.append(request["ports"])
        taken = request["ports"] if host == "y" and len(draws) <= busy_draws else []
        return report(ports_taken=taken, gpus=0)

    monkeypatch.setattr(preflight, "probe_host", probe_host)
    monkeypatch.setattr(preflight, "probe", lambda request: LOCAL)
    config, job = two_host_job()
    _, failures = await preflight.probe_hosts(config, job)
    assert len(draws) == min(busy_draws + 1, preflight.PORT_DRAWS)
    assert len({tuple(d) for d in draws}) == len(draws)  # a new sample each draw
    taken_every_time = busy_draws == preflight.PORT_DRAWS
    assert failures == ([f"y: ports: rank port {draws[-1][0]} is in use"] if taken_every_time else [])


def test_this_machine_is_probed_in_process_like_mpirun_starts_it_without_ssh() -> None:
    assert preflight.is_local("localhost") and preflight.is_local(socket.gethostname())
    assert preflight.is_local("127.0.0.1")  # (no lookup of an unknown name: it would ask DNS)


def test_doctor_without_a_host_list_has_nothing_to_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmi_core.cli import main

    (tmp_path / "serving.properties").write_text("option.mpi_mode=true\n")
    assert main(["doctor", "--model-dir", str(tmp_path)]) == 0
    assert "every rank runs on this host" in capsys.readouterr().out


def test_doctor_refuses_a_bad_host_list_before_probing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmi_core.cli import main

    properties = "option.mpi_mode=true\noption.tensor_parallel_degree=2\noption.mpi_hosts=a:1\n"
    (tmp_path / "serving.properties").write_text(properties)
    assert main(["doctor", "--model-dir", str(tmp_path)]) == 2
    assert "option.mpi_hosts='a:1': expected at least 2 slots" in capsys.readouterr().err


# -- reaching a host as mpirun does -------------------------------------------------------------------


def which(*found: str) -> Any:
    return lambda name: f"/usr/bin/{name}" if name in found else None


@pytest.mark.parametrize(
    ("agent", "args", "argv"),
    [
        ("ssh : rsh", None, ["/usr/bin/ssh", "-x"]),  # Open MPI's default; X11 forwarding off
        ("ssh : rsh", "-F /etc/cluster/ssh_config", ["/usr/bin/ssh", "-x", "-F", "/etc/cluster/ssh_config"]),
        ("ssh -X -i key", "-o A=1", ["/usr/bin/ssh", "-X", "-i", "key", "-o", "A=1"]),  # -X given: kept
        ("nosuch : rsh -n", None, ["/usr/bin/rsh", "-n"]),  # the first alternative found, not the first
        (
            "kubessh  --ns  x",
            "'a b'",
            ["/usr/bin/kubessh", "--ns", "x", "'a", "b'"],
        ),  # spaces split, no quotes
        ("nosuch", None, None),
    ],
)
def test_the_agent_command_is_mpiruns(agent: str, args: str | None, argv: list[str] | None) -> None:
    assert preflight.agent_command(agent, args, which("ssh", "rsh", "kubessh")) == argv


def test_settings_come_from_the_environment_then_the_parameter_files_in_the_mpiruns_spelling() -> None:
    five, four = preflight.OPEN_MPI_5, preflight.OPEN_MPI_4
    env = {
        "PRTE_MCA_plm_ssh_agent": "ssh",
        "PRTE_MCA_prte_ssh_agent": "kubessh",
        "OMPI_MCA_plm_rsh_args": "-q",
    }
    user = preflight.parse_param_file(
        "# comment\nplm_ssh_args = -F /home/u/cfg   # trailing\nplm_rsh_args=-v\n"
    )
    system = {"plm_ssh_args": "-F /etc/cfg", "plm_ssh_agent": "rsh"}
    assert preflight.mca_value(five.agent, five, env, [user, system]) == "kubessh"  # the synonym wins
    assert preflight.mca_value(five.args, five, env, [user, system]) == "-F /home/u/cfg"  # user's file first
    assert preflight.mca_value(five.args, five, {"PRTE_MCA_plm_ssh_args": "-4"}, [user]) == "-4"  # env first
    # Open MPI 5's mpirun ignores the Open MPI 4 spelling (measured: 5.0.11), and the other way round.
    assert preflight.mca_value(five.args, five, {"OMPI_MCA_plm_rsh_args": "-q"}, []) is None
    assert preflight.mca_value(four.args, four, env, [user]) == "-q"
    assert preflight.mca_value(four.agent, four, {"OMPI_MCA_plm_rsh_agent": "rsh"}, []) == "rsh"


def test_the_launch_agent_of_this_machines_mpirun(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".prte").mkdir()
    (tmp_path / ".prte" / "mca-params.conf").write_text("plm_ssh_args = -F /from/the/file\n")
    argv, setting = preflight.launch_agent(environ={"HOME": str(tmp_path)})
    assert argv[1:] == ["-x", "-F", "/from/the/file"] and argv[0].endswith("/ssh")
    assert "plm_ssh_args='-F /from/the/file'" in setting
    env = {"HOME": str(tmp_path), "PRTE_MCA_plm_ssh_args": "-F /from/env", "PRTE_MCA_plm_ssh_agent": "nosuch"}
    assert preflight.launch_agent(environ=env)[0] == []
