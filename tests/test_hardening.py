"""Hardening against real servers and workers: bad input on a kept-alive connection, start-up
failures that must not hang, the exit status of a killed worker, and huge prompts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, ping, stream_lines, wait_for

pytestmark = pytest.mark.slow

SHORT = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
NEIGHBOUR = {"max_new_tokens": 100, "ignore_eos_token": True}


def test_bad_bodies_on_a_kept_alive_connection_leave_it_usable(
    start_server: Callable[..., ServerProcess], demo_model: Path
) -> None:
    server = start_server("--model-dir", str(demo_model), "--model-name", "demo")
    json_type = {"content-type": "application/json"}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        deep = http.post("/invocations", content=b"[" * 10_000 + b"]" * 10_000, headers=json_type)
        assert deep.status_code == 400 and deep.json()["type"] == "BadRequestException"
        chat = b'{"messages": [{"role": "user", "content": "\\udc00"}]}'
        lone = http.post("/invocations", content=chat, headers=json_type)
        assert lone.status_code == 400 and lone.json()["param"] == "messages[0].content"
        stop = b'{"prompt": "hi", "stop": ["\\udc00"]}'
        lone = http.post("/v1/completions", content=stop, headers=json_type)
        assert lone.status_code == 400 and lone.json()["error"]["param"] == "stop[0]"
        assert http.post("/invocations", json=SHORT).status_code == 200  # same connection, not reset


def test_a_worker_that_cannot_start_fails_the_load_with_the_cause_instead_of_hanging(tmp_path: Path) -> None:
    properties = "option.model_id=/m\noption.pythonExecutable=/nonexistent/py\n"
    (tmp_path / "serving.properties").write_text(properties)
    run = subprocess.run(
        [sys.executable, "-m", "lmi_core", "serve", "--model-dir", str(tmp_path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,  # before the fix: /ping 503 for ever, so this timed out
    )
    assert run.returncode == 1
    assert "model failed to load" in run.stderr
    assert "worker could not start: FileNotFoundError" in run.stderr and "/nonexistent/py" in run.stderr


def test_a_killed_workers_exit_status_is_reported(
    start_server: Callable[..., ServerProcess], demo_model: Path
) -> None:
    server = start_server("--model-dir", str(demo_model), "--model-name", "demo")
    (pid,) = server.worker_pids()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: "SIGKILL" in server.log(), timeout=60, what="the failure to be logged")
    wait_for(lambda: ping(server) == 200, timeout=120, what="restart")
    (entry,) = httpx.get(f"{server.url}/models/demo").json()
    (worker,) = entry["models"][0]["workerGroups"][0]["workers"]
    assert "the worker process was killed by SIGKILL" in worker["lastError"]
    assert "Unknown child process" not in server.log()


def test_a_huge_prompt_neither_restarts_the_worker_nor_cuts_its_neighbours(
    start_server: Callable[..., ServerProcess], long_demo_model: Path
) -> None:
    """1.5 MB of prompt (about 7 s of tokenizing here, over the 3 s heartbeat deadline the fixture
    sets): before, it ran on the worker's event loop, the worker was killed as hung and the
    neighbouring stream cut. Events are asserted; the neighbour's worst token gap is printed."""
    server = start_server("--model-dir", str(long_demo_model), "--model-name", "demo")
    (pid,) = server.worker_pids()
    huge_done = threading.Event()
    gaps: list[float] = []
    outcomes: list[str] = []

    def neighbour() -> None:
        while not huge_done.is_set():
            last, lines = 0.0, []
            for line in stream_lines(server, {"inputs": "Hi", "parameters": NEIGHBOUR}):
                now = time.monotonic()
                if lines:  # between tokens; the first token's wait is queueing and prefill
                    gaps.append(now - last)
                last = now
                lines.append(line)
            outcomes.append("error" if "error" in lines[-1] else f"{len(lines)} tokens")

    thread = threading.Thread(target=neighbour)
    thread.start()
    wait_for(lambda: len(gaps) > 3, what="the neighbour to stream")
    words = " ".join(["hello", "world", "lorem", "ipsum"] * 75_000)  # 1.5 MB, ~750,000 tokens
    huge = httpx.post(f"{server.url}/invocations", json={"inputs": words}, timeout=300)
    huge_done.set()
    thread.join()
    assert huge.status_code == 424 and huge.json()["param"] == "inputs"  # DJL's status (docs/api.md)
    assert "at most 8191 fit (option.max_input_length" in huge.json()["message"]
    assert outcomes and set(outcomes) == {"100 tokens"}  # every neighbour stream completed
    assert server.worker_pids() == [pid] and "restarting" not in server.log()
    print(f"worst neighbour token gap during a 1.5 MB prompt: {max(gaps) * 1000:.0f} ms")
