"""The management API rendered from a fake ``ModelService``: DJL's bodies, codes and parameters."""

from __future__ import annotations

from pathlib import Path

from lmi_core.serving.pool import ModelStatus
from lmi_core.serving.registry import ModelState
from lmi_core.serving.supervisor import WorkerState
from tests.http.fakes import FakeModels, client, model, pool, worker


def three_models() -> FakeModels:
    return FakeModels(
        model("a", pool("a", worker(0)), at_startup=True),
        model("b", state=ModelState.REGISTERED, at_startup=True),
        model("c", state=ModelState.FAILED, error="no such model"),
    )


def test_list_shows_every_model_with_its_status_and_pages() -> None:
    http = client(three_models())
    assert http.get("/models").json() == {
        "models": [
            {"modelName": "a", "modelUrl": "/models/a", "status": "READY", "residency": "loaded"},
            {"modelName": "b", "modelUrl": "/models/b", "status": "PENDING", "residency": "registered"},
            {"modelName": "c", "modelUrl": "/models/c", "status": "FAILED", "residency": "failed"},
        ]
    }
    first = http.get("/models", params={"limit": "2"}).json()
    assert [m["modelName"] for m in first["models"]] == ["a", "b"] and first["nextPageToken"] == "2"
    rest = http.get("/models", params={"limit": "2", "next_page_token": "2"}).json()
    assert [m["modelName"] for m in rest["models"]] == ["c"] and "nextPageToken" not in rest
    bad = http.get("/models", params={"limit": "0"})
    assert bad.status_code == 400 and bad.json()["param"] == "limit"


def test_describe_renders_the_pool_snapshot_in_djl_names() -> None:
    snapshot = pool("a", worker(0), worker(1, WorkerState.STARTING), worker(2, retiring=True), max_workers=3)
    [workflow] = client(FakeModels(model("a", snapshot, at_startup=True))).get("/models/a").json()
    assert workflow["workflowName"] == "a"
    [described] = workflow["models"]
    groups = described.pop("workerGroups")
    assert described.pop("residency")["state"] == "loaded"
    assert described == {
        "modelName": "a",
        "modelUrl": "/models/a",
        "status": "Healthy",
        "backend": "hf",
        "mode": "python",
        "tensorParallelDegree": 1,
        "pipelineParallelDegree": 1,
        "minWorkers": 1,
        "maxWorkers": 3,
        "maxIdleSeconds": 60.0,
        "queueSize": 1000,
        "requestInQueue": 0,
        "maxRollingBatchSize": 32,
        "loadedAt": 1_700_000_000.0,
        "lastFailure": None,
        "loadedAtStartup": True,
    }
    [group] = groups
    assert group["device"] == {"deviceType": "cpu", "deviceId": -1}
    assert (group["minWorkers"], group["maxWorkers"]) == (1, 3)
    statuses = [(w["id"], w["status"]) for w in group["workers"]]
    assert statuses == [(0, "READY"), (1, "STARTING"), (2, "UNLOADING")]
    assert group["workers"][0] == {
        "id": 0,
        "startTime": 1_700_000_000.0,
        "status": "READY",
        "pids": [1000],
        "devices": [],
        "threads": 2,
        "inFlight": 0,
        "restarts": 0,
        "lastError": None,
    }


def test_describe_status_is_unhealthy_below_min_workers_and_pending_while_loading() -> None:
    below = model("a", pool("a", worker(0), worker(1, retiring=True), min_workers=2))
    loading = model("b", pool("b", worker(0)), state=ModelState.LOADING)
    restarting = model("c", pool("c", worker(0, WorkerState.STARTING), status=ModelStatus.PENDING))
    http = client(FakeModels(below, loading, restarting))
    assert [http.get(f"/models/{name}").json()[0]["models"][0]["status"] for name in "abc"] == [
        "Unhealthy",
        "PENDING",
        "PENDING",
    ]


def test_gpu_workers_are_grouped_by_device_slice_even_a_dropped_one() -> None:
    # Scaled down to one slice; the worker on the dropped slice 2,3 has not stopped yet.
    snapshot = pool(
        "g",
        worker(0, devices=("0", "1")),
        worker(1, devices=("2", "3"), retiring=True),
        min_workers=1,
        max_workers=1,
        groups=(("0", "1"),),
    )
    [workflow] = client(FakeModels(model("g", snapshot))).get("/models/g").json()
    groups = workflow["models"][0]["workerGroups"]
    assert [(g["device"], g["devices"], g["minWorkers"], g["maxWorkers"]) for g in groups] == [
        ({"deviceType": "gpu", "deviceId": "0"}, ["0", "1"], 1, 1),
        ({"deviceType": "gpu", "deviceId": "2"}, ["2", "3"], 0, 1),
    ]
    assert [[w["id"] for w in g["workers"]] for g in groups] == [[0], [1]]
    assert groups[0]["workers"][0]["threads"] is None


def test_a_model_without_workers_is_described_by_its_status_and_error() -> None:
    http = client(three_models())
    assert http.get("/models/c").json() == [
        {
            "workflowName": "c",
            "models": [
                {
                    "modelName": "c",
                    "modelUrl": "/models/c",
                    "status": "FAILED",
                    "residency": {
                        "state": "failed",
                        "onDemand": False,
                        "pinned": False,
                        "asleep": False,
                        "inUse": 0,
                        "waitingForLoad": 0,
                        "residentBytes": None,
                        "expiresInSeconds": None,
                        "loads": 0,
                        "lastError": None,
                    },
                    "error": "no such model",
                    "loadedAtStartup": False,
                    "workerGroups": [],
                }
            ],
        }
    ]
    waiting = http.get("/models/b").json()[0]["models"][0]
    assert (waiting["status"], waiting["error"], waiting["loadedAtStartup"]) == ("PENDING", None, True)
    missing = http.get("/models/nope")
    assert missing.status_code == 404 and missing.json()["type"] == "ModelNotFoundException"


def test_scale_passes_the_bounds_and_renders_the_new_ones() -> None:
    models = three_models()
    http = client(models)
    response = http.put("/models/a", params={"max_worker": "4"})
    assert response.status_code == 200
    assert response.json() == {
        "status": 'Workflow "a" worker scaled. New Worker configuration min workers:1 max workers:4'
    }
    assert http.put("/models/a", params={"min_worker": "2", "synchronous": "false"}).status_code == 202
    assert models.calls == [("scale", ("a", None, 4, True)), ("scale", ("a", 2, None, False))]
    crossed = http.put("/models/a", params={"min_worker": "3", "max_worker": "2"})
    assert crossed.status_code == 400 and crossed.json()["param"] == "min_worker"
    unknown = http.put("/models/a", params={"workers": "2"})
    assert unknown.status_code == 400 and unknown.json()["param"] == "workers"
    assert len(models.calls) == 2


def test_unregister_removes_the_model() -> None:
    models = three_models()
    http = client(models)
    response = http.delete("/models/c")
    assert response.status_code == 200 and response.json() == {"status": 'Model "c" unregistered'}
    assert models.calls == [("unload", "c")]
    assert http.delete("/models/c").status_code == 404


def test_register_loads_the_directory_with_the_request_overrides(tmp_path: Path) -> None:
    (tmp_path / "serving.properties").write_text("option.model_id=/models/x\nmaxWorkers=4\n")
    models = three_models()
    http = client(models)
    params = {"url": f"file://{tmp_path}", "model_name": "x", "min_worker": "2", "synchronous": "false"}
    response = http.post("/models", params=params)
    assert response.status_code == 202
    assert response.json() == {"status": 'Model "x" registration scheduled.'}
    [(call, (config, wait, keep_failed))] = models.calls
    assert (call, config.name, config.min_workers, config.max_workers) == ("load", "x", 2, 4)
    assert (wait, keep_failed) == (False, True)  # nobody hears of a background failure: keep it listed
    body = http.post("/models", json={"url": str(tmp_path), "model_name": "y"})
    assert body.status_code == 200 and body.json() == {"status": 'Model "y" registered.'}
    assert models.calls[-1][1][1:] == (True, False)  # the caller gets the error: forget the model
    not_a_dir = http.post("/models", params={"url": str(tmp_path / "nope")})
    assert not_a_dir.status_code == 400 and not_a_dir.json()["param"] == "url"
