"""MPI mode across hosts: real ``mpirun`` over real ssh into network-namespace hosts (``netns_hosts``).

The server runs on ``h0``; ``option.mpi_hosts=h1:1,h2:1`` puts rank 0 on ``h1`` and rank 1 on ``h2``.
Each host's own name resolves to 127.0.1.1 (Debian's default), so gloo needs ``GLOO_SOCKET_IFNAME``
to reach the other host: the tests pass only if the server forwards it. Figures (time from a fault to
the stream's error and to the job's restart) are printed with ``-s``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmi_core.launch.launchers import free_ports
from tests import netns_hosts
from tests.conftest import ServerProcess, wait_for
from tests.netns_hosts import TestHosts

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.multihost,
    pytest.mark.skipif(netns_hosts.available() is not None, reason=str(netns_hosts.available())),
]

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog and", "tensor parallel rank socket"]
LONG = {"inputs": "Hi", "parameters": {"max_new_tokens": 400, "ignore_eos_token": True}}
RANK_HOSTS = ("h1", "h2")


@pytest.fixture(scope="module")
def hosts() -> Iterator[TestHosts]:
    with netns_hosts.test_hosts(3) as made:
        yield made


def job_env(hosts: TestHosts, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        # As users reach their hosts: Open MPI's ssh arguments name the ssh config (key, known hosts),
        # the only way in (netns_hosts); mpirun's daemons and the preflight both go through it.
        "PRTE_MCA_plm_ssh_args": f"-F {hosts.ssh_config}",
        "GLOO_SOCKET_IFNAME": "eth0",
        "OPTION_MPI_MODE": "true",
        "OPTION_TENSOR_PARALLEL_DEGREE": "2",
        "OPTION_MPI_HOSTS": "h1:1,h2:1",
        "SERVING_HEALTH_CHECK_INTERVAL": "0.5",
        "SERVING_HEALTH_CHECK_TIMEOUT": "3",
        **extra,
    }


class HostServer:
    """``lmi serve`` on test host ``h0``; HTTP clients run in threads inside h0's namespace."""

    def __init__(self, hosts: TestHosts, model: Path, log: Path, env: dict[str, str]) -> None:
        self.hosts = hosts
        self.port = free_ports()
        self.url = f"http://127.0.0.1:{self.port}"  # h0's own loopback
        self.log_path = log
        self._log = log.open("wb")
        argv = [sys.executable, "-m", "lmi_core", "serve", "--port", str(self.port), "--model-id", str(model)]
        self.proc = subprocess.Popen(
            [*hosts.exec_argv("h0"), *argv], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ping(self) -> int:
        def get() -> int:
            try:
                return httpx.get(f"{self.url}/ping", timeout=5).status_code
            except httpx.HTTPError:
                return -1

        return self.hosts.call("h0", get)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            if self.ping() == 200:
                return
            time.sleep(0.3)
        raise AssertionError(f"server not ready in {timeout} s:\n{self.log()[-4000:]}")

    def generate(self, prompt: str) -> str:
        def post() -> str:
            body = {"inputs": prompt, "parameters": {"max_new_tokens": 16}}
            response = httpx.post(f"{self.url}/invocations", json=body, timeout=120)
            assert response.status_code == 200, response.text
            return str(response.json()["generated_text"])

        return self.hosts.call("h0", post)

    def stream(self, body: dict[str, Any], after: int, action: Any) -> tuple[list[dict[str, Any]], float]:
        """Stream ``body``; call ``action()`` after ``after`` lines; (lines, seconds from action to end)."""

        def run() -> tuple[list[dict[str, Any]], float]:
            lines: list[dict[str, Any]] = []
            acted = 0.0
            url, streamed = f"{self.url}/invocations", {**body, "stream": True}
            with httpx.stream("POST", url, json=streamed, timeout=60) as response:
                for raw in response.iter_lines():
                    if raw:
                        lines.append(json.loads(raw))
                        if len(lines) == after:
                            action()
                            acted = time.monotonic()
            return lines, time.monotonic() - acted

        return self.hosts.call("h0", run)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def ranks(hosts: TestHosts) -> dict[str, int]:
    """host -> pid of the lmi worker rank running there."""
    found = {}
    for host in RANK_HOSTS:
        for pid, cmd in hosts.processes(host, include_sshd=False).items():
            if "lmi_core.worker" in cmd:
                found[host] = pid
    return found


def job(hosts: TestHosts) -> dict[int, str]:
    """Every process of MPI jobs on any host: mpirun and ssh on h0, sshd sessions, prted, ranks."""
    return {
        pid: cmd
        for host in hosts.names
        for pid, cmd in hosts.processes(host, include_sshd=False).items()
        if not cmd.startswith(sys.executable + " -m lmi_core serve")
    }


def environ(pid: int) -> dict[str, str]:
    items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(i.decode(errors="replace").split("=", 1) for i in items if b"=" in i)


@pytest.fixture(scope="module")
def expected(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Python mode's greedy output for PROMPTS (on this machine's loopback), then that server stops."""
    log = tmp_path_factory.mktemp("python") / "python.log"
    env = {**os.environ, "OPTION_MPI_MODE": "false"}
    server = ServerProcess(["--model-id", str(demo_model)], env, log)
    try:
        server.wait_ready()
        out = {}
        for prompt in PROMPTS:
            body = {"inputs": prompt, "parameters": {"max_new_tokens": 16}}
            response = httpx.post(f"{server.url}/invocations", json=body, timeout=120)
            out[prompt] = response.json()["generated_text"]
        return out
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(
    hosts: TestHosts, demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HostServer]:
    # The fault tests are about the teardown on every host: the stream ends with the error instead of
    # migrating to the restarted job (migration: tests/test_migration.py, tests/test_mpi_mode.py).
    env = job_env(hosts, OPTION_MAX_MIGRATIONS="0")
    started = HostServer(hosts, demo_model, tmp_path_factory.mktemp("mpi") / "server.log", env)
    try:
        started.wait_ready()
        yield started
    finally:
        started.stop()


def test_tp2_across_two_hosts_equals_python_mode(
    server: HostServer, hosts: TestHosts, expected: dict[str, str]
) -> None:
    placed = ranks(hosts)
    assert set(placed) == {"h1", "h2"}
    for prompt in PROMPTS:
        assert server.generate(prompt) == expected[prompt]
    log = server.log()
    assert "starting: " in log and "mpirun" in log.split("starting: ", 1)[1].splitlines()[0]
    assert "preflight h1: ok" in log and "preflight h2: ok" in log
    for host, pid in placed.items():
        rank_env = environ(pid)
        # The host's own cores (2 here) for its one rank, not the server's cores over both ranks (1).
        assert rank_env["OMP_NUM_THREADS"] == str(len(os.sched_getaffinity(pid)))
        assert rank_env["CUDA_VISIBLE_DEVICES"] == "", host


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP", "partition"])
def test_a_remote_fault_fails_the_stream_tears_down_every_host_and_restarts(
    server: HostServer, hosts: TestHosts, expected: dict[str, str], fault: str
) -> None:
    old = job(hosts)
    victim = ranks(hosts)["h2"]
    if fault == "partition":
        action = lambda: hosts.link("h2", up=False)  # noqa: E731
    else:
        action = lambda: os.kill(victim, getattr(signal, fault))  # noqa: E731
    try:
        lines, to_error = server.stream(LONG, 3, action)
        assert lines[-1]["details"]["finish_reason"] == "error", lines[-1]
        assert lines[-1]["error"]["code"] in (424, 503)
        faulted = time.monotonic() - to_error
        # The head side (mpirun, its ssh clients) goes at once; h2's side once it is reachable again.
        wait_for(lambda: not set(old) & set(hosts.processes("h0")), timeout=30, what="mpirun and ssh on h0")
    finally:
        if fault == "partition":
            hosts.link("h2", up=True)
        if fault == "SIGSTOP":
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)  # a stopped process ignores SIGKILL's effect until run
    wait_for(lambda: not set(old) & set(job(hosts)), timeout=120, what=f"the old job on every host: {old}")
    gone = time.monotonic()
    wait_for(lambda: server.ping() == 200 and set(ranks(hosts)) == {"h1", "h2"}, timeout=180, what="restart")
    restarted = time.monotonic()
    assert server.generate(PROMPTS[1]) == expected[PROMPTS[1]]
    print(
        f"\n{fault}: stream error after {to_error:.2f} s; old job gone on every host after "
        f"{gone - faulted:.2f} s; serving again after {restarted - faulted:.2f} s"
    )


def errors_counted(server: HostServer) -> float:
    def scrape() -> float:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        found = re.search(r'^lmi_requests_finished_total\{.*finish_reason="error".*\} (\S+)$', text, re.M)
        return float(found.group(1)) if found else 0.0

    return server.hosts.call("h0", scrape)


def test_a_partitioned_rank_host_ends_a_migrating_stream_instead_of_leaving_it_open(
    hosts: TestHosts, demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Migration on (the default): the job restarts, but one of its hosts is cut off, so its ranks
    never all connect and no worker can take the stream. Before, it stayed open with no token and no
    error (over 30 s); it now ends with the worker's error once option.migration_timeout passes
    (default: SERVING_HEALTH_CHECK_TIMEOUT + 5 s), counted as failed. The seconds are printed."""
    log = tmp_path_factory.mktemp("migrating") / "server.log"
    server = HostServer(hosts, demo_model, log, job_env(hosts))
    try:
        server.wait_ready()
        errors = errors_counted(server)
        try:
            lines, waited = server.stream(LONG, 3, lambda: hosts.link("h2", up=False))
        finally:
            hosts.link("h2", up=True)
        print(
            f"\npartition, migration on: the stream ended {waited:.2f} s after the cut: {lines[-1]['error']}"
        )
        assert lines[-1]["details"]["finish_reason"] == "error", lines[-1]
        assert "option.migration_timeout=8 s" in lines[-1]["error"]["message"], lines[-1]
        assert errors_counted(server) == errors + 1
        wait_for(
            lambda: server.ping() == 200 and set(ranks(hosts)) == {"h1", "h2"}, timeout=180, what="restart"
        )
        assert server.generate(PROMPTS[0])
    finally:
        server.stop()


def test_doctor_names_each_bad_host_and_check_in_one_line(hosts: TestHosts, demo_model: Path) -> None:
    env = job_env(hosts, OPTION_MPI_HOSTS="h1:1,h2:1,nohost:1", OPTION_TENSOR_PARALLEL_DEGREE="3")
    del env["GLOO_SOCKET_IFNAME"]
    argv = [*hosts.exec_argv("h0"), sys.executable, "-m", "lmi_core", "doctor", "--model-id", str(demo_model)]
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert [line.split(": ")[:2] for line in lines] == [
        ["h1", "interface"],
        ["h2", "interface"],
        ["nohost", "reachable"],
    ], lines
    assert "resolves to 127.0.1.1" in lines[0] and "GLOO_SOCKET_IFNAME" in lines[0]


def test_serve_fails_before_any_rank_starts_on_a_bad_host(hosts: TestHosts, demo_model: Path) -> None:
    env = job_env(hosts, OPTION_MPI_HOSTS="h1:1,nohost:1")
    argv = [*hosts.exec_argv("h0"), sys.executable, "-m", "lmi_core", "serve", "--port", "0", "--model-id"]
    run = subprocess.run([*argv, str(demo_model)], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    expected = "preflight failed before any rank started:\nnohost: reachable: unreachable by ssh"
    assert expected in run.stderr, run.stderr
    assert "mpirun" not in run.stderr


def test_no_process_outlives_a_sigkilled_server_on_any_host(server: HostServer, hosts: TestHosts) -> None:
    assert set(ranks(hosts)) == {"h1", "h2"}
    server.proc.kill()
    server.proc.wait()
    wait_for(lambda: not job(hosts), timeout=60, what=f"every process on every host: {job(hosts)}")
