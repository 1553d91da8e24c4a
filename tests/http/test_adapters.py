"""LoRA over HTTP against a fake ``ModelService``: DJL's and vLLM's management routes, and which
adapter each API's request runs with (``GenerationRequest.adapter``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from lmi_core.engine import EngineStats, LoraAdapter
from lmi_core.http.metrics import LoraTotals
from lmi_core.serving.supervisor import WorkerSnapshot
from tests.http.fakes import FakeModel, FakeModels, client, model, pool, worker
from tests.serving.test_adapters import write_adapter

LORA = {"enable_lora": "true"}


def serving(*names: str, lora: tuple[str, ...] = ("m",)) -> FakeModels:
    models = FakeModels(*(model(n, pool(n, worker(0))) for n in names))
    for name in lora:
        models.served_models[name] = FakeModel(name, options=LORA)
    return models


@pytest.fixture
def models() -> FakeModels:
    return serving("m")


@pytest.fixture
def http(models: FakeModels) -> TestClient:
    return client(models)


@pytest.fixture
def src(tmp_path: Path) -> str:
    return str(write_adapter(tmp_path / "a1"))


def test_djl_register_list_describe_update_unregister(
    http: TestClient, models: FakeModels, src: str, tmp_path: Path
) -> None:
    fake = models.served_models["m"]
    created = http.post("/models/m/adapters", params={"name": "a1", "src": src})
    assert created.status_code == 200 and created.json() == {"status": "Adapter a1 registered"}
    assert fake.adapter_changes == [("load", LoraAdapter("a1", src))]  # preload defaults to true
    other = str(write_adapter(tmp_path / "a2"))
    http.post("/models/m/adapters", params={"name": "a2", "src": other, "preload": "false"})
    listed = http.get("/models/m/adapters").json()
    assert listed == {
        "adapters": [
            {"name": "a1", "src": src, "preload": True, "pin": False},
            {"name": "a2", "src": other, "preload": False, "pin": False},
        ]
    }
    page = http.get("/models/m/adapters", params={"limit": "1"}).json()
    assert [a["name"] for a in page["adapters"]] == ["a1"] and page["nextPageToken"] == "1"
    assert http.get("/models/m/adapters/a1").json() == {
        "name": "a1",
        "src": src,
        "preload": True,
        "pin": False,
    }
    updated = http.post("/models/m/adapters/a1/update", params={"pin": "true"})
    assert updated.json() == {"status": "Adapter a1 updated"}
    assert fake.adapter_changes[-1] == ("load", LoraAdapter("a1", src, pinned=True))
    assert http.get("/adapters/a1").json()["pin"] is True  # the only model: no prefix needed
    gone = http.delete("/models/m/adapters/a1")
    assert gone.json() == {"status": "Adapter a1 unregistered"}
    assert fake.adapter_changes[-1] == ("unload", LoraAdapter("a1", src, pinned=True))
    missing = http.get("/models/m/adapters/a1")
    assert missing.status_code == 404 and "The adapter a1 was not found" in missing.json()["message"]


def test_djl_register_errors(http: TestClient, src: str, tmp_path: Path) -> None:
    def post(**params: str) -> tuple[int, dict[str, str]]:
        response = http.post("/models/m/adapters", params=params)
        return response.status_code, response.json()

    code, body = post(name="a1")
    assert code == 400 and body["param"] == "src"
    code, body = post(name="a1", src=str(tmp_path / "nowhere"))
    assert code == 400 and body["param"] == "src" and "nowhere" in body["message"]
    big = str(write_adapter(tmp_path / "big", r=64))
    code, body = post(name="big", src=big)
    assert code == 400 and "above option.max_lora_rank=16" in body["message"]
    code, body = post(name="bad/name", src=src)
    assert code == 400 and body["param"] == "name"
    assert post(name="a1", src=src)[0] == 200
    code, body = post(name="a1", src=src)
    assert code == 409 and "already exists" in body["message"]
    code, body = post(name="a1", src=src, pin="maybe")
    assert code == 400 and body["param"] == "pin"
    code, body = post(name="x", src=src, preload="false", pin="true")
    assert code == 400 and "pin to true" in body["message"]
    update = http.post("/models/m/adapters/a1/update", params={"src": big})
    assert update.status_code == 400 and "Updating adapter path is not supported." in update.json()["message"]
    assert http.post("/models/nope/adapters", params={"name": "a", "src": src}).status_code == 404


def test_a_model_without_lora_says_so(src: str) -> None:
    http = client(serving("m", "plain"))
    for response in (
        http.get("/models/plain/adapters"),
        http.post("/models/plain/adapters", params={"name": "a1", "src": src}),
        http.post("/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": src, "model": "plain"}),
        http.post("/predictions/plain", json={"inputs": "hi", "adapters": "a1"}),
    ):
        assert response.status_code == 400 and "LoRA is not enabled" in response.text
    several = http.get("/adapters")
    assert several.status_code == 400 and several.json()["param"] == "model_name"


def test_vllm_load_and_unload_answer_as_vllm(http: TestClient, src: str, tmp_path: Path) -> None:
    loaded = http.post("/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": src})
    assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'a1' added successfully."
    again = http.post("/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": src})
    assert again.status_code == 400
    assert again.json()["error"]["type"] == "InvalidUserInput"
    assert "has already been loaded" in again.json()["error"]["message"]
    inplace = http.post(
        "/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": src, "load_inplace": True}
    )
    assert inplace.status_code == 200
    lost = http.post("/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": str(tmp_path / "no")})
    assert lost.status_code == 404
    assert lost.json()["error"] == {
        "message": f"Loading lora a2 failed: No adapter found for {tmp_path / 'no'}",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }
    big = http.post(
        "/v1/load_lora_adapter",
        json={"lora_name": "b", "lora_path": str(write_adapter(tmp_path / "b", r=32))},
    )
    assert big.status_code == 400 and big.json()["error"]["type"] == "BadRequestError"
    empty = http.post("/v1/load_lora_adapter", json={"lora_name": "", "lora_path": src})
    assert empty.json()["error"]["message"] == "Both 'lora_name' and 'lora_path' must be provided."
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "x"}).status_code == 400
    base = http.post("/v1/load_lora_adapter", json={"lora_name": "m", "lora_path": src})
    assert "conflicts with a served base model" in base.json()["error"]["message"]
    unloaded = http.post("/v1/unload_lora_adapter", json={"lora_name": "a1"})
    assert unloaded.status_code == 200 and unloaded.text == "Success: LoRA adapter 'a1' removed successfully."
    unknown = http.post("/v1/unload_lora_adapter", json={"lora_name": "a1"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"] == "The lora adapter 'a1' cannot be found."


def test_each_api_selects_the_adapter(http: TestClient, models: FakeModels, src: str, tmp_path: Path) -> None:
    other = str(write_adapter(tmp_path / "b"))
    http.post("/models/m/adapters", params={"name": "a1", "src": src})
    http.post("/models/m/adapters", params={"name": "b", "src": other})
    fake = models.served_models["m"]
    a1, b = LoraAdapter("a1", src), LoraAdapter("b", other)

    def used(response_status: int) -> list[LoraAdapter | None]:
        assert response_status == 200
        adapters = [r.adapter for r in fake.requests]
        fake.requests.clear()
        return adapters

    completion = http.post("/v1/completions", json={"model": "a1", "prompt": "hi"})
    assert completion.json()["model"] == "a1"  # vLLM names the adapter in the response
    assert used(completion.status_code) == [a1]
    chat = {"model": "b", "messages": [{"role": "user", "content": "hi"}]}
    assert used(http.post("/v1/chat/completions", json=chat).status_code) == [b]
    assert used(http.post("/v1/completions", json={"model": "m", "prompt": "hi"}).status_code) == [None]
    header = {"X-Amzn-SageMaker-Adapter-Identifier": "b"}
    assert used(http.post("/v1/completions", json={"prompt": "hi"}, headers=header).status_code) == [b]
    assert used(http.post("/invocations", json={"inputs": "hi", "adapters": "a1"}).status_code) == [a1]
    assert used(http.post("/invocations", json={"inputs": "hi"}, headers=header).status_code) == [b]
    batch = {"inputs": ["x", "y", "z"], "adapters": ["a1", "b", "a1"]}
    assert sorted(str(a) for a in used(http.post("/invocations", json=batch).status_code)) == sorted(
        str(a) for a in [a1, b, a1]
    )
    native_chat = {"messages": [{"role": "user", "content": "hi"}], "adapters": "b"}
    assert used(http.post("/invocations", json=native_chat).status_code) == [b]


def test_unknown_adapters_are_404s_naming_them(http: TestClient, src: str) -> None:
    http.post("/models/m/adapters", params={"name": "a1", "src": src})
    completion = http.post("/v1/completions", json={"model": "zz", "prompt": "hi"})
    assert completion.status_code == 404 and completion.json()["error"]["param"] == "model"
    lmi = http.post("/invocations", json={"inputs": "hi", "adapters": "zz"})
    assert lmi.status_code == 404 and "The adapter zz was not found" in lmi.json()["message"]
    header = http.post(
        "/invocations", json={"inputs": "hi"}, headers={"X-Amzn-SageMaker-Adapter-Identifier": "zz"}
    )
    assert header.status_code == 404 and "zz" in header.json()["message"]
    mismatch = http.post("/invocations", json={"inputs": ["x", "y"], "adapters": ["a1"]})
    assert mismatch.status_code == 400 and mismatch.json()["param"] == "adapters"
    not_a_list = http.post("/invocations", json={"inputs": "x", "adapters": ["a1"]})
    assert not_a_list.status_code == 400 and not_a_list.json()["param"] == "adapters"
    assert http.post("/invocations", json={"inputs": "x", "adapters": 3}).status_code == 400


def test_v1_models_lists_adapters_with_their_parent(http: TestClient, src: str) -> None:
    http.post("/models/m/adapters", params={"name": "a1", "src": src})
    cards = http.get("/v1/models").json()["data"]
    assert [(c["id"], c["parent"]) for c in cards] == [("m", None), ("a1", "m")]
    assert cards[1]["root"] == src
    card = http.get("/v1/models/a1").json()
    assert card["id"] == "a1" and card["parent"] == "m"


def test_v1_models_shows_the_context_length_the_engine_reported(
    models: FakeModels, http: TestClient, src: str
) -> None:
    models.served_models["n"] = FakeModel("n", max_model_len=321)  # its engine reported 321
    models.snapshots["n"] = model("n", pool("n", worker(0)))
    http.post("/models/m/adapters", params={"name": "a1", "src": src})
    cards = http.get("/v1/models").json()["data"]
    assert [(c["id"], c["max_model_len"]) for c in cards] == [("m", None), ("a1", None), ("n", 321)]
    assert {c["status"] for c in cards} == {"loaded"}  # an adapter's is its base model's
    assert http.get("/v1/models/n").json()["max_model_len"] == 321


def test_requests_by_adapter_are_counted(http: TestClient, src: str) -> None:
    http.post("/models/m/adapters", params={"name": "a1", "src": src})
    for _ in range(2):
        http.post("/v1/completions", json={"model": "a1", "prompt": "hi"})
    http.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    text = http.get("/metrics").text
    assert 'lmi_lora_requests_total{adapter="a1",model="m"} 2.0' in text
    assert 'lmi_lora_loads_total{model="m"} 0.0' in text


def test_lora_totals_stay_monotonic_across_restarts_and_retirements() -> None:
    def at(loads: int, evictions: int, restarts: int = 0, worker_id: int = 0) -> WorkerSnapshot:
        stats = EngineStats(lora_loads_total=loads, lora_evictions_total=evictions)
        return dataclasses.replace(worker(worker_id, stats=stats), restarts=restarts)

    totals = LoraTotals()
    assert totals.update("m", pool("m", at(3, 1), at(2, 0, worker_id=1))) == (5, 1)
    assert totals.update("m", pool("m", at(4, 2), at(2, 0, worker_id=1))) == (6, 2)
    assert totals.update("m", pool("m", at(0, 0, restarts=1), at(2, 0, worker_id=1))) == (6, 2)  # restarted
    assert totals.update("m", pool("m", at(1, 0, restarts=1), at(2, 0, worker_id=1))) == (7, 2)
    assert totals.update("m", pool("m", at(1, 0, restarts=1))) == (7, 2)  # worker 1 retired
