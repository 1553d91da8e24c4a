"""Routing end to end: a real server with 2 HF workers; ``x-lmi-worker`` says which one served.

Requests here are short and sequential unless a test holds one open, so without routing every one
would go to worker 0 (least loaded, ties to the oldest): what sends a request elsewhere is the
feature under test.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess, link_model, ping, wait_for

pytestmark = pytest.mark.slow

MODEL = "demo"
SHORT = {"parameters": {"max_new_tokens": 2}}
LONG = {"inputs": "Hi", "parameters": {"max_new_tokens": 480, "ignore_eos_token": True}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("routing")
    # DJL's session lifecycle off: SageMaker's session header is a plain routing key, as x-session-id.
    properties = (
        "minWorkers=2\nmaxWorkers=2\noption.routing=prefix_aware\noption.responses_store=memory\n"
        "option.enable_stateful_sessions=false\n"
    )
    model = link_model(demo_model, base / MODEL, properties)
    env = {**os.environ, "SERVING_HEALTH_CHECK_INTERVAL": "0.5", "SERVING_HEALTH_CHECK_TIMEOUT": "3"}
    server = ServerProcess(["--model-dir", str(model)], env, base / "server.log")
    server.wait_ready()
    yield server
    server.stop()


def invoke(
    server: ServerProcess, prompt: str, session: str | None = None, header: str = "x-session-id"
) -> httpx.Response:
    headers = {header: session} if session else {}
    response = httpx.post(
        f"{server.url}/invocations", json={"inputs": prompt, **SHORT}, headers=headers, timeout=60
    )
    assert response.status_code == 200, response.text
    return response


def workers(server: ServerProcess) -> dict[int, dict[str, Any]]:
    (entry,) = httpx.get(f"{server.url}/models/{MODEL}", timeout=10).json()
    (group,) = entry["models"][0]["workerGroups"]
    return {w["id"]: w for w in group["workers"]}


def idle(server: ServerProcess) -> bool:
    found = workers(server)
    return len(found) == 2 and all(w["status"] == "READY" and w["inFlight"] == 0 for w in found.values())


def decisions(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith("lmi_routing_decisions_total{"):
            reason = line.split('reason="')[1].split('"')[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


def test_a_session_sticks_to_its_worker_on_every_api(server: ServerProcess) -> None:
    wait_for(lambda: idle(server), what="both workers idle")
    before = decisions(server)
    with httpx.stream("POST", f"{server.url}/invocations", json={**LONG, "stream": True}, timeout=60) as busy:
        assert busy.headers["x-lmi-worker"] == "0"  # streamed: named before the first line
        assert invoke(server, "hi", "s1").headers["x-lmi-worker"] == "1"  # worker 0 is busy
    wait_for(lambda: idle(server), what="the long request to be cancelled")
    assert invoke(server, "hello").headers["x-lmi-worker"] == "0"  # no session: least loaded
    assert invoke(server, "hello", "s1").headers["x-lmi-worker"] == "1"
    assert invoke(server, "hey", "s1", "X-Amzn-SageMaker-Session-Id").headers["x-lmi-worker"] == "1"
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=chat, headers={"x-session-id": "s1"}, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["x-lmi-worker"] == "1"
        assert "x-lmi-session-moved" not in response.headers
        assert response.read().endswith(b"data: [DONE]\n\n")
    completion = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "n": 2}
    response = httpx.post(
        f"{server.url}/v1/completions", json=completion, headers={"x-session-id": "s1"}, timeout=60
    )
    assert response.headers["x-lmi-worker"] == "1"  # both choices on the session's worker
    after = decisions(server)
    assert after["session"] - before.get("session", 0) == 5  # all but s1's first


def test_a_previous_response_id_goes_to_the_worker_of_its_conversation(server: ServerProcess) -> None:
    wait_for(lambda: idle(server), what="both workers idle")

    def respond(**body: Any) -> httpx.Response:
        body = {"model": MODEL, "max_output_tokens": 2, **body}
        response = httpx.post(f"{server.url}/v1/responses", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response

    with httpx.stream("POST", f"{server.url}/invocations", json={**LONG, "stream": True}, timeout=60) as busy:
        assert busy.headers["x-lmi-worker"] == "0"
        first = respond(input="tell me a story")  # worker 0 is busy
        assert first.headers["x-lmi-worker"] == "1"
    wait_for(lambda: idle(server), what="the long request to be cancelled")
    before = decisions(server)
    follow = respond(input="go on", previous_response_id=first.json()["id"])
    assert follow.headers["x-lmi-worker"] == "1"  # least loaded would be worker 0 (ties to the oldest)
    assert decisions(server)["session"] - before.get("session", 0) == 1  # the chain's session, not chance
    unrelated = respond(input="something else")
    assert unrelated.headers["x-lmi-worker"] == "0"


def test_prompt_families_stick_to_one_worker_each(server: ServerProcess) -> None:
    wait_for(lambda: idle(server), what="both workers idle")
    before = decisions(server)
    contexts = {name: f"You are {name}'s assistant. " + f"{name} has a long policy. " * 12 for name in "AB"}
    served: dict[str, set[str]] = {"A": set(), "B": set()}
    for question in range(3):
        for name, context in contexts.items():
            served[name].add(invoke(server, f"{context} Question {question}?").headers["x-lmi-worker"])
    assert all(len(w) == 1 for w in served.values()), served
    assert served["A"] != served["B"]  # and both workers are used
    assert decisions(server)["prefix"] - before.get("prefix", 0) == 4


def test_the_death_of_its_worker_moves_the_session(server: ServerProcess) -> None:
    wait_for(lambda: idle(server), what="both workers idle")
    home = int(invoke(server, "hi", "s2").headers["x-lmi-worker"])
    restarts = workers(server)[home]["restarts"]
    os.kill(workers(server)[home]["pids"][0], signal.SIGKILL)
    wait_for(lambda: workers(server)[home]["restarts"] > restarts, what="the worker to restart")
    moved = invoke(server, "hi again", "s2")
    assert moved.headers["x-lmi-session-moved"] == str(home)
    settled = invoke(server, "and again", "s2")
    assert "x-lmi-session-moved" not in settled.headers
    assert settled.headers["x-lmi-worker"] == moved.headers["x-lmi-worker"]
    wait_for(lambda: ping(server) == 200 and idle(server), what="the worker back")
