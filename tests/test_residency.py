"""Residency end to end: a real ``lmi serve`` holding more models than its budget lets it load.

One server per backend for the swap tests (``hf`` here; ``vllm`` in the vLLM stage, ``-m vllm``),
with ``SERVING_MAX_LOADED_MODELS=1`` and three demo models: ``a`` loaded at startup, ``b`` and
``broken`` (its weights missing) registered to load on demand. The tests run in file order on it
but assert only what each one set up: every request names its model, and a request for an unloaded
one loads it. A second server (``pinned`` at startup, ``c`` with ``option.idle_timeout=2``) checks
that a pinned model is never evicted and that an idle one unloads; a third is killed mid-load.
No timing thresholds: events (the load and unload counters, by reason) and states, with generous
waits.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess, link_model, processes_matching, wait_for
from tests.test_backend_parity import BACKENDS, READY_TIMEOUT

pytestmark = pytest.mark.slow

TIMEOUT = 300.0  # a request may wait for one load and one unload (vLLM on a shared 2-core machine)
STREAM_TOKENS = 400  # a stream that runs while another model's load waits for it
CONTEXT = 512


def properties(backend: str, **extra: str) -> str:
    keys = {
        "option.backend": backend,
        "option.max_model_len": str(CONTEXT),
        "option.max_rolling_batch_size": "4",
        **({"option.cpu_kvcache_space": "1"} if backend == "vllm" else {}),
        **{f"option.{k}": v for k, v in extra.items()},
    }
    return "".join(f"{k}={v}\n" for k, v in keys.items())


class Box:
    """A server and its model directories, for one backend."""

    def __init__(self, base: Path, demo: Path, backend: str) -> None:
        self.base, self.demo, self.backend = base, demo, backend
        # vLLM's IPC sockets need a short path (Unix sockets: 107 bytes).
        self.tmp = Path(tempfile.mkdtemp(prefix="lmi-res-"))
        self.servers: list[ServerProcess] = []

    def model(self, name: str, **extra: str) -> Path:
        return link_model(self.demo, self.base / name, properties(self.backend, **extra))

    def start(self, startup: Path, wait: bool = True, **env: str) -> ServerProcess:
        full_env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "SERVING_HEALTH_CHECK_INTERVAL": "0.5",
            "SERVING_HEALTH_CHECK_TIMEOUT": "10",
            "VLLM_RPC_BASE_PATH": str(self.tmp),
            "TMPDIR": str(self.tmp),
            **env,
        }
        log = self.base / f"server{len(self.servers)}.log"
        server = ServerProcess(["--model-dir", str(startup)], full_env, log)
        self.servers.append(server)
        if wait:
            server.wait_ready(READY_TIMEOUT[self.backend])
        return server

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module", params=BACKENDS)
def box(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, demo_model: Path
) -> Iterator[Box]:
    made = Box(tmp_path_factory.mktemp(f"residency-{request.param}"), demo_model, request.param)
    yield made
    made.close()


@pytest.fixture(scope="module")
def swap(box: Box) -> ServerProcess:
    """Budget one model: ``a`` loaded at startup; ``b`` and ``broken`` registered on demand."""
    server = box.start(box.model("a"), SERVING_MAX_LOADED_MODELS="1")
    register(server, box.model("b", load_on_startup="false"))
    missing = box.model("broken", load_on_startup="false", model_id=str(box.base / "missing"))
    register(server, missing)
    return server


# -- helpers ------------------------------------------------------------------------------------


def register(server: ServerProcess, directory: Path) -> None:
    response = httpx.post(f"{server.url}/models", params={"url": str(directory)}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text


def residency(server: ServerProcess, name: str) -> dict[str, Any]:
    [workflow] = httpx.get(f"{server.url}/models/{name}", timeout=30).json()
    described: dict[str, Any] = workflow["models"][0]["residency"]
    return described


def state(server: ServerProcess, name: str) -> str:
    return str(residency(server, name)["state"])


def counter(server: ServerProcess, name: str, **labels: str) -> float:
    """A counter's value (0 before its first event)."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith(f"{name}{{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def predict(server: ServerProcess, model: str, **parameters: Any) -> httpx.Response:
    body = {"inputs": "hello world", "parameters": {"max_new_tokens": 4, **parameters}}
    return httpx.post(f"{server.url}/predictions/{model}", json=body, timeout=TIMEOUT)


def in_thread(call: Callable[[], httpx.Response]) -> Callable[[], httpx.Response]:
    """Run ``call`` in a thread; the returned function joins it and gives its response."""
    result: list[httpx.Response | BaseException] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as exc:  # re-raised in the test's thread
            result.append(exc)

    thread = threading.Thread(target=run)
    thread.start()

    def join() -> httpx.Response:
        thread.join(TIMEOUT + 30)
        outcome = result[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return join


# -- one model at a time ------------------------------------------------------------------------


def test_registered_models_are_listed_with_their_state_and_the_server_is_healthy(swap: ServerProcess) -> None:
    cards = {c["id"]: c["status"] for c in httpx.get(f"{swap.url}/v1/models", timeout=30).json()["data"]}
    assert cards["broken"] == "registered" and {cards["a"], cards["b"]} <= {"loaded", "registered"}
    listed = {m["modelName"]: m for m in httpx.get(f"{swap.url}/models", timeout=30).json()["models"]}
    assert listed["broken"]["status"] == "READY" and listed["broken"]["residency"] == "registered"
    assert httpx.get(f"{swap.url}/ping", timeout=30).status_code == 200
    assert httpx.get(f"{swap.url}/health", timeout=30).status_code == 200


def test_a_stream_keeps_its_model_while_another_models_load_waits_then_that_load_evicts_it(
    swap: ServerProcess,
) -> None:
    evicted = counter(swap, "lmi_model_unloads_total", model="a", reason="evicted")
    body = {
        "inputs": "hello",
        "parameters": {"max_new_tokens": STREAM_TOKENS, "ignore_eos_token": True},
        "stream": True,
    }
    lines: list[str] = []
    other: Callable[[], httpx.Response] | None = None
    with httpx.stream("POST", f"{swap.url}/predictions/a", json=body, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line:
                lines.append(line)
            if other is None:  # a has started streaming: b's load needs a's room
                other = in_thread(lambda: predict(swap, "b"))
    assert other is not None
    assert len(lines) == STREAM_TOKENS and "generated_text" in lines[-1] and "error" not in lines[-1]
    answered = other()
    assert answered.status_code == 200, answered.text
    assert answered.json()["generated_text"]
    assert state(swap, "b") == "loaded" and state(swap, "a") == "registered"
    assert counter(swap, "lmi_model_unloads_total", model="a", reason="evicted") == evicted + 1


def test_requests_during_a_load_wait_for_it_and_concurrent_ones_share_it(swap: ServerProcess) -> None:
    if state(swap, "b") != "loaded":
        assert predict(swap, "b").status_code == 200
    loads = counter(swap, "lmi_model_loads_total", model="a", tier="cold")
    first, second = in_thread(lambda: predict(swap, "a")), in_thread(lambda: predict(swap, "a"))
    wait_for(lambda: state(swap, "a") == "loading", TIMEOUT, "a's load to start")
    during = in_thread(lambda: predict(swap, "b"))  # b was evicted for a: it waits for a, then for room
    for join in (first, second, during):
        response = join()
        assert response.status_code == 200, response.text
    assert counter(swap, "lmi_model_loads_total", model="a", tier="cold") == loads + 1  # one load for both
    assert counter(swap, "lmi_model_unloads_total", model="b", reason="evicted") >= 1


def test_keep_alive_zero_unloads_the_model_after_the_response(swap: ServerProcess) -> None:
    before = counter(swap, "lmi_model_unloads_total", model="b", reason="keep_alive")
    response = predict(swap, "b", keep_alive=0)
    assert response.status_code == 200, response.text
    wait_for(lambda: state(swap, "b") == "registered", TIMEOUT, "b to unload")
    assert counter(swap, "lmi_model_unloads_total", model="b", reason="keep_alive") == before + 1
    # Nothing may be loaded now: the models that load on demand still serve.
    assert httpx.get(f"{swap.url}/ping", timeout=30).status_code == 200
    assert httpx.get(f"{swap.url}/health", timeout=30).status_code == 200


def test_a_load_that_fails_answers_every_waiter_with_its_error(swap: ServerProcess) -> None:
    waiters = [in_thread(lambda: predict(swap, "broken")) for _ in range(3)]
    for join in waiters:
        response = join()
        assert response.status_code == 503, response.text
        assert "missing" in response.json()["message"], response.text  # the load's own error
    described = residency(swap, "broken")
    assert described["state"] == "registered" and "missing" in described["lastError"]
    assert httpx.get(f"{swap.url}/ping", timeout=30).status_code == 200  # the others still serve


# -- pinned, idle, killed ------------------------------------------------------------------------


def test_a_pinned_model_is_never_evicted_and_an_idle_one_unloads(box: Box) -> None:
    server = box.start(box.model("pinned", pinned="true"), SERVING_MAX_LOADED_MODELS="1")
    register(server, box.model("c", load_on_startup="false", idle_timeout="2"))
    refused = predict(server, "c")  # only the pinned model holds the room: no wait, 503
    assert refused.status_code == 503 and "Retry-After" in refused.headers, refused.text
    assert "pinned" in refused.json()["message"]
    assert state(server, "pinned") == "loaded" and state(server, "c") == "registered"
    removed = httpx.delete(f"{server.url}/models/pinned", timeout=TIMEOUT)
    assert removed.status_code == 200 and counter(server, "lmi_model_unloads_total", reason="api") == 1
    assert predict(server, "c").status_code == 200
    described = residency(server, "c")
    assert described["state"] != "loaded" or described["expiresInSeconds"] <= 2  # its idle timer runs
    wait_for(lambda: state(server, "c") == "registered", TIMEOUT, "c to unload idle")
    assert counter(server, "lmi_model_unloads_total", model="c", reason="idle") == 1


def test_a_server_killed_mid_load_leaves_no_process(box: Box) -> None:
    server = box.start(box.model("first", load_on_startup="false"))
    loading = in_thread(lambda: predict(server, "first"))
    wait_for(lambda: bool(server.worker_pids()), TIMEOUT, "a worker to start loading")
    assert state(server, "first") == "loading"
    pids = server.worker_pids()
    server.proc.kill()  # SIGKILL the server alone
    server.proc.wait()
    with pytest.raises(httpx.HTTPError):
        loading()
    wait_for(lambda: not set(pids) & set(processes_matching("lmi_core.worker")), 60, "workers to die")
