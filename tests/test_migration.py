"""Stream migration end to end: a worker SIGKILLed mid-request, and its request continues on the
other worker (2 workers) or on the restarted one (1 worker). The client sees no error and no repeated
text: the full text equals an uninterrupted run's, greedy or seeded, streamed or not, on the LMI and
the OpenAI routes. ``option.max_migrations=0`` gives the old behaviour: the request ends in a 503.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess, link_model, ping, wait_for

pytestmark = pytest.mark.slow

MODEL = "demo"
GREEDY = {"max_new_tokens": 300, "ignore_eos_token": True}
SEEDED = {**GREEDY, "do_sample": True, "temperature": 1.3, "seed": 5}
HEALTH_ENV = {"SERVING_HEALTH_CHECK_INTERVAL": "0.5", "SERVING_HEALTH_CHECK_TIMEOUT": "3"}


def serve(base: Path, demo_model: Path, properties: str) -> ServerProcess:
    model = link_model(demo_model, base / MODEL, properties)
    server = ServerProcess(["--model-dir", str(model)], {**os.environ, **HEALTH_ENV}, base / "server.log")
    server.wait_ready()
    return server


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[ServerProcess]:
    server = serve(tmp_path_factory.mktemp("two"), demo_model, "minWorkers=2\nmaxWorkers=2\n")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[ServerProcess]:
    server = serve(tmp_path_factory.mktemp("one"), demo_model, "")
    yield server
    server.stop()


def workers(server: ServerProcess) -> dict[int, dict[str, Any]]:
    (entry,) = httpx.get(f"{server.url}/models/{MODEL}", timeout=10).json()
    (group,) = entry["models"][0]["workerGroups"]
    return {w["id"]: w for w in group["workers"]}


def settled(server: ServerProcess, count: int) -> bool:
    found = workers(server)
    return ping(server) == 200 and sum(w["status"] == "READY" for w in found.values()) == count


def migrations(server: ServerProcess) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    match = re.search(rf'^lmi_request_migrations_total\{{model="{MODEL}"\}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def kill(server: ServerProcess, worker: int) -> None:
    os.kill(workers(server)[worker]["pids"][0], signal.SIGKILL)


def reference(server: ServerProcess, parameters: dict[str, Any]) -> str:
    body = {"inputs": "Hi", "parameters": parameters}
    response = httpx.post(f"{server.url}/invocations", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return str(response.json()["generated_text"])


def stream_killing_its_worker(
    server: ServerProcess, path: str, body: dict[str, Any], after: int
) -> tuple[list[str], list[float], int]:
    """Stream ``body``; SIGKILL the worker named in ``x-lmi-worker`` after ``after`` lines. Return the
    lines, their arrival times and the worker killed."""
    lines: list[str] = []
    arrivals: list[float] = []
    with httpx.stream("POST", f"{server.url}{path}", json=body, timeout=120) as response:
        assert response.status_code == 200
        victim = int(response.headers["x-lmi-worker"])
        for line in response.iter_lines():
            if not line:
                continue
            lines.append(line)
            arrivals.append(time.monotonic())
            if len(lines) == after:
                kill(server, victim)
    return lines, arrivals, victim


def gap_ms(arrivals: list[float], after: int) -> float:
    """The longest pause between two lines from the kill on: what the client saw of the migration."""
    return max(b - a for a, b in zip(arrivals[after - 1 :], arrivals[after:], strict=False)) * 1000


@pytest.mark.parametrize("parameters", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_an_lmi_stream_moves_to_the_other_worker(two: ServerProcess, parameters: dict[str, Any]) -> None:
    wait_for(lambda: settled(two, 2), timeout=120, what="both workers ready")
    expected = reference(two, parameters)
    before = migrations(two)
    body = {"inputs": "Hi", "parameters": parameters, "stream": True}
    lines, arrivals, _ = stream_killing_its_worker(two, "/invocations", body, after=5)
    events = [json.loads(line) for line in lines]
    assert "error" not in events[-1], events[-1]
    assert "".join(e["token"]["text"] for e in events) == expected
    assert events[-1]["generated_text"] == expected
    assert len(events) == 300 and migrations(two) == before + 1
    print(f"migration gap seen by the client: {gap_ms(arrivals, 5):.0f} ms (2 workers)")


def test_an_openai_stream_moves_to_the_other_worker(two: ServerProcess) -> None:
    wait_for(lambda: settled(two, 2), timeout=120, what="both workers ready")
    expected = reference(two, GREEDY)
    before = migrations(two)
    body = {
        "model": MODEL,
        "prompt": "Hi",
        "max_tokens": 300,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    lines, _, _ = stream_killing_its_worker(two, "/v1/completions", body, after=5)
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines if line != "data: [DONE]"]
    assert lines[-1] == "data: [DONE]" and not any("error" in c for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert migrations(two) == before + 1


def test_a_non_streaming_request_continues_on_the_restarted_worker(one: ServerProcess) -> None:
    expected = reference(one, GREEDY)
    before = migrations(one)
    (old,) = workers(one).values()
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    result: dict[str, httpx.Response] = {}
    for _ in range(5):  # a fast machine can finish 300 tokens before the kill lands: try again
        thread = threading.Thread(
            target=lambda: result.update(r=httpx.post(f"{one.url}/v1/completions", json=body, timeout=120))
        )
        thread.start()
        started = thread.is_alive
        wait_for(lambda s=started: workers(one)[old["id"]]["inFlight"] == 1 or not s(), what="the request")
        # Freeze the worker first: once it is stopped, a request still unanswered is surely mid-generation.
        pid = workers(one)[old["id"]]["pids"][0]
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.05)
        if thread.is_alive():
            os.kill(pid, signal.SIGKILL)
            break
        os.kill(pid, signal.SIGCONT)
        thread.join()
    else:
        pytest.fail("the request always finished before its worker could be killed")
    thread.join()
    response = result["r"]
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["choices"][0]["text"] == expected
    assert answer["usage"]["completion_tokens"] == 300
    assert migrations(one) == before + 1
    (new,) = workers(one).values()
    assert new["pids"] != old["pids"]  # served by the restarted process


def test_max_migrations_0_ends_the_stream_with_the_workers_error(
    tmp_path_factory: pytest.TempPathFactory, demo_model: Path
) -> None:
    server = serve(tmp_path_factory.mktemp("none"), demo_model, "option.max_migrations=0\n")
    try:
        body = {"inputs": "Hi", "parameters": GREEDY, "stream": True}
        lines, _, _ = stream_killing_its_worker(server, "/invocations", body, after=3)
        last = json.loads(lines[-1])
        assert len(lines) < 300
        assert last["details"]["finish_reason"] == "error"
        assert last["error"]["code"] == 503 and "worker" in last["error"]["message"]
        assert migrations(server) == 0
        wait_for(lambda: settled(server, 1), timeout=120, what="the restart")
        (worker,) = workers(server)
        result: dict[str, httpx.Response] = {}
        thread = threading.Thread(
            target=lambda: result.update(
                r=httpx.post(
                    f"{server.url}/invocations", json={"inputs": "Hi", "parameters": GREEDY}, timeout=120
                )
            )
        )
        thread.start()
        wait_for(lambda: workers(server)[worker]["inFlight"] == 1, what="the request to run")
        kill(server, worker)
        thread.join()
        assert result["r"].status_code == 503
        assert result["r"].json()["type"] == "WorkerFailedException"
    finally:
        server.stop()
