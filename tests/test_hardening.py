"""Hardening against real servers and workers: bad input on a kept-alive connection, start-up
failures that must not hang, the exit status of a killed worker, and huge prompts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, ping, wait_for

pytestmark = pytest.mark.slow

SHORT = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}


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
