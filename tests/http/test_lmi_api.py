"""``/ping`` and the native API rendered from a fake ``ModelService`` (no worker processes)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lmi_core.serving.pool import ModelStatus
from lmi_core.serving.registry import ModelSnapshot, ModelState
from lmi_core.serving.supervisor import WorkerState
from tests.http.fakes import FakeModels, client, model, pool, worker


def test_ping_is_200_and_healthy_when_every_model_serves() -> None:
    models = FakeModels(model("a", pool("a", worker(0))), model("b", pool("b", worker(0), worker(1))))
    response = client(models).get("/ping")
    assert response.status_code == 200
    assert response.json() == {
        "a": {"status": "Healthy", "workers": {"ready": 1, "total": 1}},
        "b": {"status": "Healthy", "workers": {"ready": 2, "total": 2}},
    }


def test_ping_says_unhealthy_but_200_below_min_workers_and_a_retiring_worker_is_not_ready() -> None:
    retiring = pool("a", worker(0), worker(1, retiring=True), min_workers=2)
    response = client(FakeModels(model("a", retiring))).get("/ping")
    assert response.status_code == 200
    assert response.json() == {"a": {"status": "Unhealthy", "workers": {"ready": 1, "total": 2}}}


@pytest.mark.parametrize(
    ("snapshot", "entry"),
    [
        (model("a", state=ModelState.REGISTERED), {"status": "PENDING"}),  # a startup model not yet loading
        (
            model("a", pool("a", worker(0), status=ModelStatus.READY), state=ModelState.LOADING),
            {"status": "PENDING", "workers": {"ready": 1, "total": 1}},  # loading: not done yet
        ),
        (
            model("a", pool("a", worker(0, WorkerState.STARTING), status=ModelStatus.PENDING)),
            {"status": "PENDING", "workers": {"ready": 0, "total": 1}},  # its only worker restarts
        ),
    ],
)
def test_ping_is_503_while_a_model_loads_or_restarts(snapshot: ModelSnapshot, entry: dict[str, Any]) -> None:
    models = FakeModels(snapshot, model("b", pool("b", worker(0))))
    response = client(models).get("/ping")
    assert response.status_code == 503
    assert response.json()["a"] == entry
    assert response.json()["b"]["status"] == "Healthy"


def test_ping_is_500_with_the_error_when_a_model_failed_even_if_another_loads() -> None:
    crashed = pool("c", worker(0, WorkerState.FAILED), status=ModelStatus.FAILED, last_failure="segfault")
    models = FakeModels(
        model("a", state=ModelState.FAILED, error="no such model"),
        model("b", state=ModelState.REGISTERED),
        model("c", crashed),
    )
    response = client(models).get("/ping")
    assert response.status_code == 500
    assert response.json() == {
        "a": {"status": "FAILED", "error": "no such model"},
        "b": {"status": "PENDING"},
        "c": {"status": "FAILED", "workers": {"ready": 0, "total": 1}, "error": "segfault"},
    }


def test_a_recovered_pool_shows_no_error() -> None:
    snapshot = model("a", pool("a", worker(0), last_failure="crashed once"))
    assert client(FakeModels(snapshot)).get("/ping").json() == {
        "a": {"status": "Healthy", "workers": {"ready": 1, "total": 1}}
    }


def test_invocations_run_on_the_only_model_or_the_named_one() -> None:
    models = FakeModels(model("a", pool("a", worker(0))))
    http = client(models)
    response = http.post("/invocations", json={"inputs": "Say", "parameters": {"max_new_tokens": 4}})
    assert response.status_code == 200 and response.json() == {"generated_text": "Hello"}
    assert models.get("a").requests[0].prompt == "Say"
    assert http.post("/predictions/a", json={"inputs": "x"}).json() == {"generated_text": "Hello"}
    missing = http.post("/predictions/nope", json={"inputs": "x"})
    assert missing.status_code == 404 and missing.json()["type"] == "ModelNotFoundException"


def test_invocations_need_a_model_name_when_several_models_serve() -> None:
    models = FakeModels(model("a", pool("a", worker(0))), model("b", pool("b", worker(0))))
    http = client(models)
    response = http.post("/invocations", json={"inputs": "x"})
    assert response.status_code == 400 and "model_name" in response.json()["message"]
    named = http.post("/invocations", params={"model_name": "b"}, json={"inputs": "x"})
    assert named.status_code == 200 and len(models.get("b").requests) == 1


def test_a_failed_model_takes_no_request() -> None:
    models = FakeModels(model("a", state=ModelState.FAILED, error="broken"))
    response = client(models).post("/predictions/a", json={"inputs": "x"})
    assert response.status_code == 404


def test_streamed_invocation_is_json_lines_with_the_text_on_the_last() -> None:
    models = FakeModels(model("a", pool("a", worker(0))))
    response = client(models).post("/invocations", json={"inputs": "x", "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/jsonlines")
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert [line["token"]["text"] for line in lines] == ["Hel", "lo"]
    assert lines[-1]["generated_text"] == "Hello" and "generated_text" not in lines[0]
