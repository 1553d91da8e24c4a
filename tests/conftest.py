"""Shared fixtures: the demo model (built offline once per session) and real server processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, settings

from lmi_core.launch.launchers import free_ports

# No timing thresholds in tests, hypothesis's included: its per-example deadline and "too slow" health
# check fail on a loaded 2-core machine (seen here at load 11) without saying anything about the code.
settings.register_profile("lmi", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("lmi")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        table[int(entry.name)] = (ppid, cmdline)
    return table


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of ``pid`` with its command line."""
    table = process_table()
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, cmdline) in table.items():
            if ppid == parent and child not in found:
                found[child] = cmdline
                frontier.append(child)
    return found


def processes_matching(text: str) -> dict[int, str]:
    """Live processes whose command line contains ``text`` (zombies have none)."""
    return {pid: cmd for pid, (_, cmd) in process_table().items() if text in cmd}


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded demo model (tiny random Llama + BPE tokenizer), built offline."""
    from lmi_core.demo_model import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("models") / "demo")


@pytest.fixture(scope="session")
def thinking_demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model as a reasoning model: ``<think>``/``</think>`` tokens and a Qwen3-like template."""
    from lmi_core.demo_model import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("models") / "thinking-demo", thinking=True)


LONG_CONTEXT = 8192


@pytest.fixture(scope="session")
def long_demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model with an 8k context: requests that run for seconds, for in-flight tests."""
    from lmi_core.demo_model import build_demo_model

    return build_demo_model(
        tmp_path_factory.mktemp("models") / "long-demo", max_position_embeddings=LONG_CONTEXT
    )


def link_model(source: Path, directory: Path, properties: str) -> Path:
    """A model directory with ``source``'s files linked in and ``properties`` as serving.properties."""
    directory.mkdir(parents=True)
    for item in source.iterdir():
        if item.name != "serving.properties":
            (directory / item.name).symlink_to(item)
    (directory / "serving.properties").write_text(properties)
    return directory


@pytest.fixture
def model_dir(demo_model: Path, tmp_path: Path) -> Callable[..., Path]:
    """A model directory with the demo weights and the given ``serving.properties`` keys
    (``option__model_id=x`` for ``option.model_id=x``)."""

    def make(name: str = "demo", **properties: str) -> Path:
        lines = "".join(f"{k.replace('__', '.')}={v}\n" for k, v in properties.items())
        return link_model(demo_model, tmp_path / name, lines)

    return make


class ServerProcess:
    """A real ``lmi serve`` process on a free port, its log in a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.port = free_ports()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmi_core", "serve", "--port", str(self.port), *args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def worker_pids(self) -> list[int]:
        """Processes running ``lmi_core.worker`` under this server (ranks included)."""
        launchers = ("mpirun", "prterun")  # Open MPI 5's mpirun shows up as prterun
        return sorted(
            p
            for p, cmd in descendants(self.proc.pid).items()
            if "lmi_core.worker" in cmd and not any(name in cmd for name in launchers)
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/ping", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"server not ready in {timeout} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start ``lmi serve ARGS`` with extra env; wait for /ping 200 unless ``wait=False``."""
    servers: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, wait: bool = True) -> ServerProcess:
        full_env = {
            **os.environ,
            "SERVING_HEALTH_CHECK_INTERVAL": "0.5",
            "SERVING_HEALTH_CHECK_TIMEOUT": "3",
            **(env or {}),
        }
        server = ServerProcess(list(args), full_env, tmp_path / f"server{len(servers)}.log")
        servers.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


@contextlib.contextmanager
def serving(store: Path, env: dict[str, str], timeout: float = 180) -> Iterator[ServerProcess]:
    """``lmi serve --model-dir store`` (a model store: one model per folder), ready; stopped on exit."""
    process = ServerProcess(["--model-dir", str(store)], env, store / "server.log")
    try:
        process.wait_ready(timeout=timeout)
        yield process
    finally:
        process.stop()


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def ping(server: ServerProcess) -> int:
    try:
        return httpx.get(f"{server.url}/ping", timeout=5).status_code
    except httpx.HTTPError:
        return -1


def stream_lines(server: ServerProcess, body: dict) -> Iterator[dict]:
    with httpx.stream(
        "POST", f"{server.url}/invocations", json={**body, "stream": True}, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/jsonlines")
        for line in response.iter_lines():
            if line:
                yield json.loads(line)
