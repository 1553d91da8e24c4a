"""Python mode end to end: a real server, real worker processes, the LMI API, and fault handling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, ping, processes_matching, stream_lines, wait_for

pytestmark = pytest.mark.slow

LONG = {"inputs": "Hi", "parameters": {"max_new_tokens": 480, "ignore_eos_token": True}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[ServerProcess]:
    env = {**os.environ, "SERVING_HEALTH_CHECK_INTERVAL": "0.5", "SERVING_HEALTH_CHECK_TIMEOUT": "3"}
    server = ServerProcess(
        ["--model-dir", str(demo_model), "--model-name", "demo"],
        env,
        tmp_path_factory.mktemp("log") / "s.log",
    )
    server.wait_ready()
    yield server
    server.stop()


def test_lmi_api(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/ping").json() == {
        "demo": {"status": "Healthy", "workers": {"ready": 1, "total": 1}}
    }
    body = {"inputs": "Hello world", "parameters": {"max_new_tokens": 8, "details": True}}
    response = httpx.post(f"{server.url}/invocations", json=body, headers={"x-request-id": "abc-1"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "abc-1"
    result = response.json()
    details = result["details"]
    assert details["generated_tokens"] == len(details["tokens"]) <= 8
    assert details["finish_reason"] in ("length", "eos_token") and details["inputs"] == "Hello world"
    assert result["generated_text"] == "".join(t["text"] for t in details["tokens"])
    for url in ("/predictions/demo", "/models/demo/invoke", "/invocations?model_name=demo"):
        assert httpx.post(f"{server.url}{url}", json=body).json() == result  # greedy: same everywhere
    plain = httpx.post(
        f"{server.url}/invocations", content="Hello world", headers={"content-type": "text/plain"}
    )
    assert plain.json()["generated_text"].startswith(result["generated_text"][:5])


def test_v1_models_shows_the_context_length_the_engine_computed(server: ServerProcess) -> None:
    # No option.max_model_len: the HF engine takes the model config's max_position_embeddings
    # (the demo model's 512) and its worker reports it when it loads.
    (card,) = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert (card["id"], card["max_model_len"]) == ("demo", 512)


def test_streamed_texts_join_to_the_generated_text(server: ServerProcess) -> None:
    body = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 25, "details": True}}
    lines = list(stream_lines(server, body))
    assert all("token" in line for line in lines)
    assert "generated_text" in lines[-1] and all("generated_text" not in line for line in lines[:-1])
    streamed = "".join(line["token"]["text"] for line in lines)
    assert streamed == lines[-1]["generated_text"]
    assert streamed == httpx.post(f"{server.url}/invocations", json=body).json()["generated_text"]
    assert lines[-1]["details"]["generated_tokens"] == len(lines)


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"inputs": "x", "parameters": {"max_new_tokenz": 3}}, 400, "parameters.max_new_tokenz"),
        ({"inputs": "x", "parameters": {"temperature": -1}}, 400, "parameters.temperature"),
        ({"inputs": ""}, 400, "inputs"),
        ({"parameters": {}}, 400, "inputs"),
        # Longer than the model's 512-token context: DJL's 424 on the native API (docs/api.md).
        ({"inputs": "hello " * 700}, 424, "inputs"),
        ([1, 2], 400, "body"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(
    server: ServerProcess, body: object, status: int, field: str
) -> None:
    response = httpx.post(f"{server.url}/invocations", json=body)
    assert response.status_code == status, response.text
    assert response.json()["param"] == field


def test_unknown_model_is_404_and_bad_json_is_400(server: ServerProcess) -> None:
    response = httpx.post(f"{server.url}/predictions/nope", json={"inputs": "x"})
    assert response.status_code == 404 and "nope" in response.json()["message"]
    response = httpx.post(
        f"{server.url}/invocations", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "JSON" in response.json()["message"]


def test_concurrent_requests_all_complete_with_their_own_output(server: ServerProcess) -> None:
    prompts = [f"request number {i} says" for i in range(16)]
    single = [
        httpx.post(
            f"{server.url}/invocations", json={"inputs": p, "parameters": {"max_new_tokens": 12}}
        ).json()
        for p in prompts[:3]
    ]
    results: dict[int, dict] = {}

    def call(i: int) -> None:
        results[i] = httpx.post(
            f"{server.url}/invocations",
            json={"inputs": prompts[i], "parameters": {"max_new_tokens": 12}},
            timeout=60,
        ).json()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i] for i in range(3)] == single


def test_sigstop_is_detected_by_the_heartbeat_and_the_worker_replaced(server: ServerProcess) -> None:
    (pid,) = server.worker_pids()
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: ping(server) == 503, timeout=15, what="/ping to report the hung worker")
        wait_for(lambda: ping(server) == 200, timeout=60, what="a replacement worker")
        assert pid not in server.worker_pids()
        assert pid not in processes_matching("lmi_core.worker")  # the stopped process was killed, not left
        assert "did not answer a health check" in server.log()
    finally:
        if pid in processes_matching("lmi_core.worker"):
            os.kill(pid, signal.SIGKILL)


def test_worker_failing_more_than_retry_threshold_marks_the_model_failed(
    start_server: Callable[..., ServerProcess], model_dir: Callable[..., Path]
) -> None:
    server = start_server("--model-dir", str(model_dir("flaky", retry_threshold="1")))
    for _ in range(2):
        wait_for(lambda: ping(server) == 200 and len(server.worker_pids()) == 1, what="worker up")
        os.kill(server.worker_pids()[0], signal.SIGKILL)
        wait_for(lambda: ping(server) != 200, what="failure noticed")
    wait_for(lambda: ping(server) == 500, what="model FAILED")
    assert httpx.get(f"{server.url}/ping").json()["flaky"]["status"] == "FAILED"
    response = httpx.post(f"{server.url}/invocations", json={"inputs": "x"})
    assert response.status_code == 503


def test_no_worker_outlives_a_sigkilled_server(
    start_server: Callable[..., ServerProcess], demo_model: Path
) -> None:
    server = start_server("--model-dir", str(demo_model))
    pids = server.worker_pids()
    assert pids
    server.proc.kill()  # SIGKILL the server process alone
    server.proc.wait()
    wait_for(
        lambda: not set(pids) & set(processes_matching("lmi_core.worker")), timeout=10, what="workers to die"
    )


def test_model_that_cannot_load_exits_with_a_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "serving.properties").write_text(
        f"option.model_id={tmp_path / 'missing'}\noption.rolling_batch=disable\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "lmi_core", "serve", "--model-dir", str(broken), "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert "model failed to load" in run.stderr and "missing" in run.stderr


def test_bad_configuration_is_reported_before_serving(tmp_path: Path) -> None:
    (tmp_path / "serving.properties").write_text("option.model_id=/m\noption.tensor_parallel_degree=two\n")
    run = subprocess.run(
        [sys.executable, "-m", "lmi_core", "serve", "--model-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    expected = "option.tensor_parallel_degree='two': expected a positive integer or 'max'"
    assert run.stderr.strip() == f"lmi: error: invalid configuration {expected}"


def test_a_listener_port_taken_twice_is_reported_before_serving(tmp_path: Path) -> None:
    (tmp_path / "serving.properties").write_text("option.model_id=/m\n")
    ports = ["--port", "8123", "--metrics-port", "9100", "--worker-ports", "9101,8123"]
    run = subprocess.run(
        [sys.executable, "-m", "lmi_core", "serve", "--model-dir", str(tmp_path), *ports],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "worker_ports=8123" in run.stderr and "a port no other listener of this server uses" in run.stderr
