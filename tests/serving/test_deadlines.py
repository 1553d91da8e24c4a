"""Deadlines against a real server and a test engine: option.queue_timeout (503 + Retry-After),
x-request-timeout (504), option.stall_timeout (worker restarted), each counted by its label."""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, stream_lines, wait_for

pytestmark = pytest.mark.slow

STALL_TIMEOUT = 1.0


@pytest.fixture
def server(start_server: Callable[..., ServerProcess], tmp_path: Path) -> Iterator[ServerProcess]:
    model = tmp_path / "stall"
    model.mkdir()
    (model / "serving.properties").write_text(
        "option.model_id=stall\noption.backend=stall\noption.max_rolling_batch_size=1\n"
        f"option.queue_timeout=0.5\noption.stall_timeout={STALL_TIMEOUT}\n"
    )
    env = {"LMI_EXTRA_PLUGINS": "tests.stall_engine", "PYTHONPATH": os.pathsep.join(sys.path)}
    yield start_server("--model-dir", str(model), "--model-name", "stall", env=env)


def metrics(server: ServerProcess) -> str:
    return httpx.get(f"{server.url}/metrics").text


def deadline_count(server: ServerProcess, deadline: str) -> float:
    text = metrics(server)
    pattern = rf'^lmi_request_deadline_exceeded_total\{{deadline="{deadline}",model="stall"\}} (\S+)$'
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else 0.0


def in_flight(server: ServerProcess) -> int:
    (entry,) = httpx.get(f"{server.url}/models/stall").json()
    return int(entry["models"][0]["workerGroups"][0]["workers"][0]["inFlight"])


def test_queue_timeout_is_a_503_with_retry_after(server: ServerProcess) -> None:
    busy = threading.Thread(
        target=lambda: httpx.post(
            f"{server.url}/invocations",
            json={"inputs": "slow", "parameters": {"max_new_tokens": 40}},
            timeout=60,
        )
    )
    busy.start()  # holds the only slot for ~2 s
    wait_for(lambda: in_flight(server) == 1, what="the slow request to hold the slot")
    queued = httpx.post(f"{server.url}/invocations", json={"inputs": "x"}, timeout=60)
    busy.join()
    assert queued.status_code == 503 and queued.headers["retry-after"] == "1"
    assert "option.queue_timeout=0.5 s" in queued.json()["message"]
    openai = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}, timeout=60)
    assert openai.status_code == 200  # the slot is free again
    assert deadline_count(server, "queue") == 1


def test_x_request_timeout_lowers_the_total_deadline(server: ServerProcess) -> None:
    body = {"inputs": "slow", "parameters": {"max_new_tokens": 100}}  # 5 s
    response = httpx.post(
        f"{server.url}/invocations", json=body, headers={"x-request-timeout": "0.3"}, timeout=60
    )
    assert response.status_code == 504 and "x-request-timeout=0.3 s" in response.json()["message"]
    assert deadline_count(server, "predict") == 1
    bad = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "x"}, headers={"x-request-timeout": "-1"}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-request-timeout"
    fine = httpx.post(f"{server.url}/invocations", json={"inputs": "x"}, headers={"x-request-timeout": "30"})
    assert fine.status_code == 200


def migrations(server: ServerProcess) -> float:
    match = re.search(r'^lmi_request_migrations_total\{model="stall"\} (\S+)$', metrics(server), re.M)
    return float(match.group(1)) if match else 0.0


def test_a_stalled_engine_is_detected_its_worker_restarted_and_the_stream_migrated(
    server: ServerProcess,
) -> None:
    (pid,) = server.worker_pids()
    started = time.monotonic()
    arrivals = []
    lines = []
    for line in stream_lines(server, {"inputs": "stall", "parameters": {"max_new_tokens": 5}}):
        arrivals.append(time.monotonic() - started)
        lines.append(line)
    # One worker: the stream waits for its restart and continues there, no token repeated.
    assert [line["token"]["text"] for line in lines] == [" t0", " t1", " t2", " t3", " t4"]
    assert lines[-1]["generated_text"] == " t0 t1 t2 t3 t4" and "error" not in lines[-1]
    assert server.worker_pids() not in ([], [pid])
    assert "engine stalled" in server.log() and migrations(server) == 1
    assert deadline_count(server, "stall") == 0  # the counter is of requests a deadline ended
    gap = arrivals[1] - arrivals[0]
    print(f"stall: detected and migrated; the client saw a {gap * 1000:.0f} ms gap (stall_timeout 1 s)")


def test_an_engine_that_stalls_on_every_worker_ends_after_max_migrations(server: ServerProcess) -> None:
    started = time.monotonic()
    lines = list(stream_lines(server, {"inputs": "wedged", "parameters": {"max_new_tokens": 5}}))
    # Each of the 4 attempts (the first and 3 migrations) gives one more token, then stalls.
    assert [line["token"]["text"] for line in lines[:-1]] == [" t0", " t1", " t2", " t3"]
    assert lines[-1]["error"]["code"] == 503 and "option.stall_timeout=1 s" in lines[-1]["error"]["message"]
    assert migrations(server) == 3 and deadline_count(server, "stall") == 1  # option.max_migrations=3
    print(f"4 stalls and 3 migrations took {time.monotonic() - started:.1f} s")
