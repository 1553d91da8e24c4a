"""GET /metrics: Prometheus text from a per-app registry, complete across several workers."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from lmi_core.config import ServerConfig
from lmi_core.http.app import create_app
from tests.conftest import ServerProcess, link_model, wait_for

MODEL = "demo"


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[tuple[str, frozenset[Any]], float]:
    """Every sample at ``url``/metrics, by (sample name, labels)."""
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def metric(url: str, name: str, headers: dict[str, str] | None = None, **labels: str) -> float:
    """One sample's value (0 when absent: a labelled counter appears on its first increment)."""
    return scrape(url, headers).get((name, frozenset(labels.items())), 0.0)


LONG = {"inputs": "Hi", "parameters": {"max_new_tokens": 8000, "ignore_eos_token": True}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, long_demo_model: Path) -> Iterator[ServerProcess]:
    """Two workers: the counts must include both."""
    base = tmp_path_factory.mktemp("metrics")
    model = link_model(long_demo_model, base / MODEL, "minWorkers=2\nmaxWorkers=2\n")
    env = {**os.environ, "SERVING_HEALTH_CHECK_INTERVAL": "0.3", "SERVING_HEALTH_CHECK_TIMEOUT": "3"}
    server = ServerProcess(["--model-dir", str(model)], env, base / "server.log")
    server.wait_ready()
    yield server
    server.stop()


def _snapshot(url: str) -> dict[str, float]:
    samples = scrape(url)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, frozenset({"model": MODEL, **labels}.items())), 0.0)

    return {
        "lmi_200": value("lmi_http_requests_total", route="/invocations", status="200"),
        "openai_200": value("lmi_http_requests_total", route="/v1/completions", status="200"),
        "generated": value("lmi_generation_tokens_total"),
        "prompt": value("lmi_prompt_tokens_total"),
        "length": value("lmi_requests_finished_total", finish_reason="length"),
        "ttft": value("lmi_time_to_first_token_seconds_count"),
        "tpot": value("lmi_time_per_output_token_seconds_count"),
        "e2e": value("lmi_e2e_request_latency_seconds_count"),
        "queue": value("lmi_request_queue_time_seconds_count"),
        "engine_finished": value("lmi_engine_finished_requests_total"),
    }


@pytest.mark.slow
def test_every_request_is_counted_across_workers(server: ServerProcess, long_demo_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(long_demo_model)
    before = _snapshot(server.url)
    prompts = [f"hello world {'one two ' * i}" for i in range(9)]
    lengths = [3 + i for i in range(9)]

    def lmi(i: int) -> int:
        body = {"inputs": prompts[i], "parameters": {"max_new_tokens": lengths[i], "ignore_eos_token": True}}
        if i % 3 == 0:  # some of them streamed
            with httpx.stream(
                "POST", f"{server.url}/invocations", json={**body, "stream": True}, timeout=60
            ) as r:
                lines = [json.loads(line) for line in r.iter_lines() if line]
            assert "generated_text" in lines[-1]
        else:
            assert httpx.post(f"{server.url}/invocations", json=body, timeout=60).status_code == 200
        return len(tokenizer.encode(prompts[i]))

    def openai(i: int) -> int:
        body = {"model": MODEL, "prompt": prompts[i], "max_tokens": lengths[i], "ignore_eos": True}
        return int(
            httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["usage"]["prompt_tokens"]
        )

    with ThreadPoolExecutor(8) as pool:
        prompt_tokens = sum(pool.map(lmi, range(6))) + sum(pool.map(openai, range(6, 9)))

    after = _snapshot(server.url)
    delta = {key: after[key] - before[key] for key in after}
    assert delta["lmi_200"] == 6 and delta["openai_200"] == 3
    assert delta["generated"] == sum(lengths)
    assert delta["prompt"] == prompt_tokens
    assert delta["length"] == delta["ttft"] == delta["tpot"] == delta["e2e"] == delta["queue"] == 9
    # The engines' own counters, summed over both workers' heartbeats: both served requests.
    wait_for(
        lambda: _snapshot(server.url)["engine_finished"] - before["engine_finished"] == 9, 30, "engine counts"
    )


@pytest.mark.slow
def test_running_gauge_sums_the_workers(server: ServerProcess) -> None:
    body = {**LONG, "stream": True}
    with (
        httpx.stream("POST", f"{server.url}/invocations", json=body, timeout=60) as first,
        httpx.stream("POST", f"{server.url}/invocations", json=body, timeout=60) as second,
    ):
        # Keep the line iterators: a discarded one closes its connection, which cancels the request.
        lines = [first.iter_lines(), second.iter_lines()]
        for stream in lines:
            next(stream)
        # Least-loaded dispatch puts them on different workers: 2 only if both are summed.
        wait_for(lambda: metric(server.url, "lmi_requests_running", model=MODEL) == 2, 30, "2 running")
    wait_for(lambda: metric(server.url, "lmi_requests_running", model=MODEL) == 0, 30, "none running")
    assert metric(server.url, "lmi_requests_waiting", model=MODEL) == 0
    assert metric(server.url, "lmi_workers", model=MODEL, state="READY") == 2


@pytest.mark.slow
def test_failures_and_unknown_routes_are_counted_without_client_strings(server: ServerProcess) -> None:
    before = scrape(server.url)
    assert (
        httpx.post(f"{server.url}/v1/completions", json={"model": "x" * 50, "prompt": "hi"}).status_code
        == 404
    )
    assert httpx.get(f"{server.url}/no/such/route").status_code == 404
    after = scrape(server.url)

    def delta(**labels: str) -> float:
        key = ("lmi_http_requests_total", frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    # No model label for a request that never reached one, and no raw path as a label.
    assert delta(model="", route="/v1/completions", status="404") == 1
    assert delta(model="", route="unmatched", status="404") == 1
    assert not any("x" * 50 in str(labels) or "/no/such" in str(labels) for _, labels in after)


def test_heartbeat_round_trips_are_observed(server: ServerProcess) -> None:
    # Every 0.3 s each of the two workers is pinged: its round trips land in the histogram.
    count = ("lmi_worker_heartbeat_seconds_count", frozenset({"model": MODEL}.items()))
    before = scrape(server.url).get(count, 0.0)
    wait_for(lambda: scrape(server.url).get(count, 0.0) >= before + 4, 10, "pings observed")
    total = scrape(server.url)[("lmi_worker_heartbeat_seconds_sum", frozenset({"model": MODEL}.items()))]
    assert 0 < total < scrape(server.url)[count] * 3  # each under the 3 s health-check timeout


@pytest.mark.slow
def test_worker_restart_is_counted(server: ServerProcess) -> None:
    assert metric(server.url, "lmi_worker_restarts_total", model=MODEL) == 0
    os.kill(server.worker_pids()[0], signal.SIGKILL)
    wait_for(lambda: metric(server.url, "lmi_worker_restarts_total", model=MODEL) == 1, 30, "restart counted")
    wait_for(lambda: metric(server.url, "lmi_workers", model=MODEL, state="READY") == 2, 60, "worker back")


@pytest.mark.slow
@pytest.mark.mpi
def test_mpi_mode_counts_each_request_once(
    tmp_path_factory: pytest.TempPathFactory, demo_model: Path
) -> None:
    """Two ranks run every request; the metrics count it once, from rank 0's answer."""
    base = tmp_path_factory.mktemp("mpi-metrics")
    model = demo_model
    env = {**os.environ, "OPTION_MPI_MODE": "true", "OPTION_TENSOR_PARALLEL_DEGREE": "2"}
    server = ServerProcess(["--model-id", str(model), "--model-name", MODEL], env, base / "server.log")
    try:
        server.wait_ready(timeout=180)
        before = _snapshot(server.url)
        for tokens in (3, 5, 7):
            body = {
                "inputs": "hello world",
                "parameters": {"max_new_tokens": tokens, "ignore_eos_token": True},
            }
            assert httpx.post(f"{server.url}/invocations", json=body, timeout=120).status_code == 200
        after = _snapshot(server.url)
        assert after["lmi_200"] - before["lmi_200"] == 3
        assert after["generated"] - before["generated"] == 15
        assert after["length"] - before["length"] == after["e2e"] - before["e2e"] == 3
        engine_finished = before["engine_finished"] + 3
        wait_for(lambda: _snapshot(server.url)["engine_finished"] == engine_finished, 30, "rank 0's counts")
    finally:
        server.stop()


def test_each_app_has_its_own_registry(tmp_path: Path) -> None:
    # Two apps in one process: the global registry would refuse the second one's metrics.
    apps = [create_app(ServerConfig(runtime_dir=str(tmp_path))) for _ in range(2)]
    for app in apps:
        assert "lmi_requests_running" in TestClient(app).get("/metrics").text
    assert not [name for name in REGISTRY._names_to_collectors if name.startswith("lmi_")]
