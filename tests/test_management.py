"""The management API and worker scaling end to end: one real server, real CPU workers.

The server starts with the demo model as ``demo`` (minWorkers=1, maxWorkers=2, one request per
worker, max_idle_time=2 s), so queue pressure, idle retirement and PUT scaling are all visible
through ``GET /models/demo``. Other models come and go through ``POST``/``DELETE /models``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmi_core.launch.devices import cpu_count
from tests.conftest import ServerProcess, link_model, wait_for

pytestmark = pytest.mark.slow

LONG = {"inputs": "Hi", "parameters": {"max_new_tokens": 2000, "ignore_eos_token": True}}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, demo_model: Path, long_demo_model: Path) -> Path:
    root = tmp_path_factory.mktemp("models")
    scaling = "minWorkers=1\nmaxWorkers=2\noption.max_rolling_batch_size=1\nmax_idle_time=2\n"
    # Long-running requests: the queue still holds some when the second worker is ready.
    link_model(long_demo_model, root / "demo", scaling)
    # 2,000 tokens within its context: the two requests of the dispatch test overlap on any host.
    link_model(long_demo_model, root / "wide", "option.max_rolling_batch_size=4\n")
    link_model(demo_model, root / "bad_key", "option.max_rolling_batch_size=4\nfoo=bar\n")
    link_model(demo_model, root / "bad_option", "option.max_rolling_batch_size=4\noption.no_such_key=1\n")
    (root / "no_weights").mkdir()
    (root / "no_weights" / "serving.properties").write_text("option.model_id=/nonexistent/model\n")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models: Path) -> Iterator[ServerProcess]:
    env = {**os.environ, "SERVING_HEALTH_CHECK_INTERVAL": "0.5", "SERVING_HEALTH_CHECK_TIMEOUT": "3"}
    env.pop("OMP_NUM_THREADS", None)  # threads are split among the workers
    args = ["--model-dir", str(models / "demo"), "--model-name", "demo"]
    server = ServerProcess(args, env, tmp_path_factory.mktemp("log") / "server.log")
    server.wait_ready()
    yield server
    server.stop()


def describe(server: ServerProcess, name: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/models/{name}")
    assert response.status_code == 200, response.text
    [workflow] = response.json()
    assert workflow["workflowName"] == name
    [model] = workflow["models"]
    return dict(model)


def workers(server: ServerProcess, name: str) -> list[dict[str, Any]]:
    return [w for group in describe(server, name)["workerGroups"] for w in group["workers"]]


def summary(server: ServerProcess, name: str) -> dict[int, str]:
    return {w["id"]: w["status"] for w in workers(server, name)}


def send(pool: ThreadPoolExecutor, server: ServerProcess, path: str, n: int) -> list[Future[httpx.Response]]:
    return [pool.submit(httpx.post, f"{server.url}{path}", json=LONG, timeout=120) for _ in range(n)]


def until(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    wait_for(predicate, timeout=timeout, what=what)


def test_list_and_describe(server: ServerProcess, models: Path) -> None:
    listed = httpx.get(f"{server.url}/models").json()
    entry = {"modelName": "demo", "modelUrl": str(models / "demo"), "status": "READY", "residency": "loaded"}
    assert listed == {"models": [entry]}
    model = describe(server, "demo")
    assert model["status"] == "Healthy" and model["loadedAtStartup"] is True
    assert model["residency"]["state"] == "loaded" and model["residency"]["loads"] == 1
    assert (model["backend"], model["mode"]) == ("hf", "python")
    assert (model["minWorkers"], model["maxWorkers"]) == (1, 2)
    [group] = model["workerGroups"]
    assert group["device"] == {"deviceType": "cpu", "deviceId": -1}
    [worker] = group["workers"]
    assert worker["status"] == "READY" and worker["devices"] == []
    # CPU threads are split among maxWorkers, and the worker process really gets that many.
    assert worker["threads"] == max(1, cpu_count() // 2)
    [pid] = worker["pids"]
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert f"OMP_NUM_THREADS={worker['threads']}".encode() in environ
    missing = httpx.get(f"{server.url}/models/nope")
    assert missing.status_code == 404 and missing.json()["type"] == "ModelNotFoundException"


def test_queue_pressure_adds_a_worker_and_idle_retires_it(server: ServerProcess) -> None:
    assert summary(server, "demo") == {0: "READY"}
    with ThreadPoolExecutor(8) as pool:
        responses = send(pool, server, "/invocations", 6)  # one at a time per worker: the rest wait
        until(lambda: len(summary(server, "demo")) == 2, "a second worker")
        until(lambda: sorted(w["inFlight"] for w in workers(server, "demo")) == [1, 1], "both workers busy")
        assert all(r.result().status_code == 200 for r in responses)
    until(lambda: len(summary(server, "demo")) == 1, "idle retirement", timeout=15)
    assert "retiring worker" in server.log()


def test_least_loaded_dispatch(server: ServerProcess, models: Path) -> None:
    params = {"url": str(models / "wide"), "model_name": "wide", "min_worker": "2", "max_worker": "2"}
    response = httpx.post(f"{server.url}/models", params=params, timeout=120)
    assert response.status_code == 200 and response.json() == {"status": 'Model "wide" registered.'}
    pids = [pid for w in workers(server, "wide") for pid in w["pids"]]
    try:
        assert summary(server, "wide") == {0: "READY", 1: "READY"}
        with ThreadPoolExecutor(2) as pool:
            responses = send(pool, server, "/predictions/wide", 2)
            # Each worker takes up to 4; least-loaded dispatch still spreads two requests over both.
            until(
                lambda: [w["inFlight"] for w in workers(server, "wide")] == [1, 1], "one request per worker"
            )
            assert all(r.result().status_code == 200 for r in responses)
    finally:  # the module's later tests expect the demo model alone
        response = httpx.delete(f"{server.url}/models/wide", timeout=60)
    assert response.status_code == 200 and response.json() == {"status": 'Model "wide" unregistered'}
    assert httpx.get(f"{server.url}/models/wide").status_code == 404
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists() and not _zombie(pid)]


def _zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_put_scales_workers_up_and_down(server: ServerProcess) -> None:
    before = max(summary(server, "demo"))
    scale = {"min_worker": "2", "max_worker": "2"}
    response = httpx.put(f"{server.url}/models/demo", params=scale, timeout=60)
    assert response.status_code == 200
    assert response.json() == {
        "status": 'Workflow "demo" worker scaled. New Worker configuration min workers:2 max workers:2'
    }
    scaled = summary(server, "demo")
    assert len(scaled) == 2 and set(scaled.values()) == {"READY"}
    assert max(scaled) > before  # a new id, never a reused one
    response = httpx.put(f"{server.url}/models/demo", params={"max_worker": "1"}, timeout=60)
    assert "min workers:1 max workers:1" in response.json()["status"]
    assert list(summary(server, "demo").values()) == ["READY"]
    httpx.put(f"{server.url}/models/demo", params={"max_worker": "2"}, timeout=60)
    model = describe(server, "demo")
    assert (model["minWorkers"], model["maxWorkers"]) == (1, 2)


@pytest.mark.parametrize(
    ("method", "path", "params", "status", "param"),
    [
        ("PUT", "/models/demo", {"min_worker": "two"}, 400, "min_worker"),
        ("PUT", "/models/demo", {"min_worker": "3", "max_worker": "2"}, 400, "min_worker"),
        ("PUT", "/models/demo", {"max_worker": "0"}, 400, "max_worker"),
        ("PUT", "/models/demo", {"workers": "2"}, 400, "workers"),
        ("PUT", "/models/nope", {"min_worker": "1"}, 404, None),
        ("DELETE", "/models/nope", {}, 404, None),
        ("POST", "/models", {}, 400, "url"),
        ("POST", "/models", {"url": "/nonexistent/dir"}, 400, "url"),
        ("POST", "/models", {"url": "s3://bucket/model"}, 400, "url"),
        ("POST", "/models", {"url": "{models}/wide", "engine": "Java"}, 400, "engine"),
        ("POST", "/models", {"url": "{models}/wide", "model_name": "a/b"}, 400, "model_name"),
        ("POST", "/models", {"url": "{models}/wide", "max_worker": "x"}, 400, "max_worker"),
        ("POST", "/models", {"url": "{models}/bad_key"}, 400, "foo"),
        ("POST", "/models", {"url": "{models}/wide", "model_name": "demo"}, 409, None),
    ],
)
def test_bad_requests(
    server: ServerProcess,
    models: Path,
    method: str,
    path: str,
    params: dict[str, str],
    status: int,
    param: str | None,
) -> None:
    params = {k: v.replace("{models}", str(models)) for k, v in params.items()}
    response = httpx.request(method, f"{server.url}{path}", params=params, timeout=60)
    assert response.status_code == status, response.text
    body = response.json()
    assert body.get("param") == param
    if param:
        assert param in body["message"]


def test_bad_serving_properties_is_a_400_with_the_config_error(server: ServerProcess, models: Path) -> None:
    response = httpx.post(f"{server.url}/models", params={"url": str(models / "bad_key")})
    assert response.json()["message"].startswith("invalid configuration foo='bar': expected a known key")
    assert [m["modelName"] for m in httpx.get(f"{server.url}/models").json()["models"]] == ["demo"]


@pytest.mark.parametrize("synchronous", ["true", "false"])
def test_a_refused_registration_leaves_nothing_behind(
    server: ServerProcess, models: Path, synchronous: str
) -> None:
    """Before: with synchronous=false the 400 left the model listed as FAILED, and the corrected model
    posted again got 409."""
    params = {"url": str(models / "bad_option"), "model_name": "fixed", "synchronous": synchronous}
    refused = httpx.post(f"{server.url}/models", params=params, timeout=60)
    assert refused.status_code == 400 and refused.json()["param"] == "option.no_such_key"
    assert [m["modelName"] for m in httpx.get(f"{server.url}/models").json()["models"]] == ["demo"]
    assert httpx.get(f"{server.url}/models/fixed").status_code == 404
    corrected = {**params, "url": str(models / "wide")}
    accepted = httpx.post(f"{server.url}/models", params=corrected, timeout=120)
    assert accepted.status_code == (200 if synchronous == "true" else 202), accepted.text
    until(lambda: describe(server, "fixed")["status"] == "Healthy", "the corrected model to load")
    assert httpx.delete(f"{server.url}/models/fixed", timeout=60).status_code == 200


def test_json_body_and_background_registration(server: ServerProcess, models: Path) -> None:
    body = {"url": f"file://{models / 'wide'}", "model_name": "later", "synchronous": False}
    response = httpx.post(f"{server.url}/models", json=body)
    assert response.status_code == 202
    assert response.json() == {"status": 'Model "later" registration scheduled.'}
    assert httpx.get(f"{server.url}/ping").status_code == 503  # loading
    until(lambda: describe(server, "later")["status"] == "Healthy", "the background load")
    result = httpx.post(f"{server.url}/predictions/later", json={"inputs": "Hi"}, timeout=60)
    assert result.status_code == 200 and result.json()["generated_text"]
    assert httpx.delete(f"{server.url}/models/later", timeout=60).status_code == 200


def test_a_model_that_cannot_load(server: ServerProcess, models: Path) -> None:
    params = {"url": str(models / "no_weights"), "model_name": "broken"}
    response = httpx.post(f"{server.url}/models", params=params, timeout=120)
    assert response.status_code == 500 and "failed to load" in response.json()["message"]
    assert httpx.get(f"{server.url}/models/broken").status_code == 404  # the caller got the error: forgotten
    response = httpx.post(f"{server.url}/models", params={**params, "synchronous": "false"})
    assert response.status_code == 202
    until(lambda: describe(server, "broken")["status"] == "FAILED", "the background load to fail")
    assert "/nonexistent/model" in describe(server, "broken")["error"]
    assert httpx.get(f"{server.url}/ping").status_code == 500
    assert httpx.put(f"{server.url}/models/broken", params={"max_worker": "2"}).status_code == 503
    assert httpx.delete(f"{server.url}/models/broken").status_code == 200
    assert httpx.get(f"{server.url}/ping").status_code == 200
