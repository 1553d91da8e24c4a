"""The management API (DJL-compatible): list, describe, register, scale and unregister models.

``GET /models``, ``GET /models/{name}``, ``POST /models?url=<dir>``, ``PUT /models/{name}`` and
``DELETE /models/{name}``, with DJL's bodies and status messages. Query parameters (or, for POST, the
same fields as a JSON body) are validated by pydantic models: a bad one is a 400 that names it.

The handlers render the core's snapshots (``ModelService.describe``/``health``); every DJL wire name
(``modelName``, ``workerGroups``, ``Healthy``, ``UNLOADING``...) lives here, also for ``/ping`` and
the metrics, and so does each model's ``residency`` (registered, loading, loaded, unloading, failed).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lmi_core.config import load_model_config
from lmi_core.errors import BadRequestError, ServiceError, WorkerFailedError
from lmi_core.http.common import query_and_body
from lmi_core.http.lmi_protocol import parse_model
from lmi_core.http.state import AppState
from lmi_core.serving.pool import ModelStatus, PoolSnapshot
from lmi_core.serving.registry import Health, ModelSnapshot, Residency
from lmi_core.serving.supervisor import WorkerSnapshot, WorkerState

# Names end up in URLs and worker socket paths: no separators, and short (Unix socket path limit).
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkerBounds(_Params):
    """``PUT /models/{name}``; omitted bounds keep their values."""

    min_worker: int | None = Field(None, ge=0)
    max_worker: int | None = Field(None, ge=1)
    synchronous: bool = True


def _check_bounds(min_worker: int | None, max_worker: int | None, where: str = "") -> None:
    if min_worker is not None and max_worker is not None and min_worker > max_worker:
        message = f"min_worker={min_worker} is greater than max_worker={max_worker}{where}"
        raise BadRequestError(message, param="min_worker")


class RegisterParams(WorkerBounds):
    """``POST /models``: DJL's parameters; those lmi-core has no use for are accepted and ignored."""

    url: str = Field(min_length=1)
    model_name: str | None = Field(None, pattern=MODEL_NAME_PATTERN)
    engine: Literal["Python", "MPI"] | None = None
    device: str | None = None  # load_on_devices
    job_queue_size: int | None = Field(None, ge=1)
    max_idle_time: float | None = Field(None, gt=0)
    # DJL clients send these; lmi-core has no model versions and batches in the engine.
    model_version: str | None = None
    batch_size: int | None = None
    max_batch_delay: int | None = None


class ListParams(_Params):
    limit: int = Field(100, ge=1)
    next_page_token: int = Field(0, ge=0)


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.lmi
    return state


def _model_dir(url: str) -> str:
    """A local model directory from ``url`` (a path or ``file://`` URL)."""
    path = url.removeprefix("file://")
    if "://" in path:
        raise BadRequestError(
            f"url {url!r}: only a local directory (a path or file:// URL) can be loaded", "url"
        )
    if not Path(path).is_dir():
        raise BadRequestError(f"url {url!r} is not a directory", param="url")
    return path


# Every wire name of the model descriptions (DJL's) is here; the core reports plain snapshots.
LIST_STATUS = {ModelStatus.READY: "READY", ModelStatus.PENDING: "PENDING", ModelStatus.FAILED: "FAILED"}
HEALTH_STATUS = {ModelStatus.READY: "Healthy", ModelStatus.PENDING: "PENDING", ModelStatus.FAILED: "FAILED"}
WORKER_STATUS = {
    WorkerState.STARTING: "STARTING",
    WorkerState.READY: "READY",
    WorkerState.FAILED: "FAILED",
    WorkerState.STOPPED: "STOPPED",
}
RETIRING = "UNLOADING"  # DJL's name for a worker being scaled down


def model_status(health: Health) -> str:
    """DJL's model status: ``Healthy``, ``Unhealthy`` (serving below minWorkers), ``PENDING``, ``FAILED``."""
    return "Unhealthy" if health.below_minimum else HEALTH_STATUS[health.status]


def worker_status(worker: WorkerSnapshot) -> str:
    """``STARTING``, ``READY``, ``FAILED``, ``STOPPED``, or ``UNLOADING`` while it retires."""
    return RETIRING if worker.retiring else WORKER_STATUS[worker.state]


def ping_entry(health: Health) -> dict[str, Any]:
    """One model in the ``/ping`` body: its status, its workers (if it has a pool), why it failed."""
    entry: dict[str, Any] = {"status": model_status(health)}
    if health.workers is not None:
        entry["workers"] = {"ready": health.workers.ready, "total": health.workers.total}
    if health.error is not None:
        entry["error"] = health.error
    return entry


def ping_code(statuses: Iterable[ModelStatus]) -> int:
    """500 if a model failed, else 503 if one is loading or restarting, else 200 (also below minWorkers)."""
    seen = set(statuses)
    return 500 if ModelStatus.FAILED in seen else 503 if ModelStatus.PENDING in seen else 200


async def list_models(request: Request) -> Response:
    params = parse_model(ListParams, dict(request.query_params))
    server = _state(request).server
    names = server.names()
    start = params.next_page_token
    page = [server.describe(name) for name in names[start : start + params.limit]]
    models = [
        {
            "modelName": m.name,
            "modelUrl": m.url,
            "status": LIST_STATUS[m.health.status],
            "residency": m.residency.state.value,
        }
        for m in page
    ]
    body: dict[str, Any] = {"models": models}
    if start + params.limit < len(names):
        body["nextPageToken"] = str(start + params.limit)
    return JSONResponse(body)


def _worker(worker: WorkerSnapshot) -> dict[str, Any]:
    """DJL's worker entry (``id``, ``startTime``, ``status``) plus its processes and resources."""
    return {
        "id": worker.worker_id,
        "startTime": worker.started_at,
        "status": worker_status(worker),
        "pids": list(worker.pids),
        "devices": list(worker.devices),
        "threads": worker.threads,
        "inFlight": worker.in_flight,
        "restarts": worker.restarts,
        "lastError": worker.last_error,
    }


def worker_groups(snapshot: PoolSnapshot) -> list[dict[str, Any]]:
    """DJL's ``workerGroups``: all CPU workers form one group; on GPU, one group per device slice."""
    if not any(snapshot.groups):
        bounds = {"minWorkers": snapshot.min_workers, "maxWorkers": snapshot.max_workers}
        workers = [_worker(w) for w in snapshot.workers]
        return [{"device": {"deviceType": "cpu", "deviceId": -1}, **bounds, "workers": workers}]
    slices = list(snapshot.groups)
    # A worker may still hold a slice that a re-plan (PUT) dropped, until it has stopped.
    slices += [d for d in dict.fromkeys(w.devices for w in snapshot.workers) if d not in slices]
    return [
        {
            "device": {"deviceType": "gpu", "deviceId": devices[0]},
            "devices": list(devices),
            # A slice holds one worker; the first free slice is filled first, so slices < min stay busy.
            "minWorkers": int(i < snapshot.min_workers),
            "maxWorkers": 1,
            "workers": [_worker(w) for w in snapshot.workers if w.devices == devices],
        }
        for i, devices in enumerate(slices)
    ]


def residency(model: Residency) -> dict[str, Any]:
    """A model's residency (docs/management.md): its state, whether it is pinned, what holds it,
    what it holds, when it unloads idle."""
    return {
        "state": model.state.value,
        "onDemand": model.on_demand,
        "pinned": model.pinned,
        "asleep": model.asleep,
        "inUse": model.in_use,
        "waitingForLoad": model.waiting,
        "residentBytes": model.resident_bytes,
        "expiresInSeconds": model.expires_in,
        "loads": model.loads,
        "lastError": model.last_error,
    }


def model_description(model: ModelSnapshot) -> dict[str, Any]:
    """One model of ``GET /models/{name}``; one without workers (registered, failed) has only its
    status and residency."""
    head = {
        "modelName": model.name,
        "modelUrl": model.url,
        "status": model_status(model.health),
        "residency": residency(model.residency),
    }
    snapshot = model.pool
    if snapshot is None:
        loaded_at_startup = model.loaded_at_startup
        return {**head, "error": model.health.error, "loadedAtStartup": loaded_at_startup, "workerGroups": []}
    return {
        **head,
        "backend": snapshot.backend,
        "mode": snapshot.mode,
        "tensorParallelDegree": snapshot.tensor_parallel_degree,
        "pipelineParallelDegree": snapshot.pipeline_parallel_degree,
        "minWorkers": snapshot.min_workers,
        "maxWorkers": snapshot.max_workers,
        "maxIdleSeconds": snapshot.max_idle_seconds,
        "queueSize": snapshot.queue_size,
        "requestInQueue": snapshot.queued,
        "maxRollingBatchSize": snapshot.max_rolling_batch_size,
        "loadedAt": snapshot.loaded_at,
        "lastFailure": snapshot.last_failure,
        "loadedAtStartup": model.loaded_at_startup,
        "workerGroups": worker_groups(snapshot),
    }


async def describe_model(request: Request) -> Response:
    name = request.path_params["model_name"]
    model = _state(request).server.describe(name)
    return JSONResponse([{"workflowName": name, "models": [model_description(model)]}])


async def register_model(request: Request) -> Response:
    state = _state(request)
    params = parse_model(
        RegisterParams, await query_and_body(request, _state(request).config.max_request_size)
    )
    # environ={}: the server's OPTION_* variables configure its startup model, not this one.
    config = load_model_config(_model_dir(params.url), name=params.model_name, environ={})
    overrides = {
        "name": params.model_name,
        "engine": params.engine,
        "load_on_devices": params.device,
        "job_queue_size": params.job_queue_size,
        "max_idle_time": params.max_idle_time,
        "min_workers": params.min_worker,
        "max_workers": params.max_worker,
    }
    for field, value in overrides.items():
        if value is not None:
            setattr(config, field, value)
    _check_bounds(config.min_workers, config.max_workers, " (with the model's serving.properties)")
    try:
        await state.server.load(config, wait=params.synchronous, keep_failed=not params.synchronous)
    except WorkerFailedError as exc:
        raise ServiceError(f'Model "{config.name}" failed to load: {exc}', status=500) from None
    if params.synchronous:
        return JSONResponse({"status": f'Model "{config.name}" registered.'})
    return JSONResponse({"status": f'Model "{config.name}" registration scheduled.'}, status_code=202)


async def scale_model(request: Request) -> Response:
    name = request.path_params["model_name"]
    params = parse_model(WorkerBounds, dict(request.query_params))
    _check_bounds(params.min_worker, params.max_worker)
    server = _state(request).server
    pool = await server.scale(name, params.min_worker, params.max_worker, wait=params.synchronous)
    message = (
        f'Workflow "{name}" worker scaled. New Worker configuration '
        f"min workers:{pool.min_workers} max workers:{pool.max_workers}"
    )
    return JSONResponse({"status": message}, status_code=200 if params.synchronous else 202)


async def unregister_model(request: Request) -> Response:
    name = request.path_params["model_name"]
    await _state(request).server.unload(name)
    return JSONResponse({"status": f'Model "{name}" unregistered'})


routes = [
    Route("/models", list_models, methods=["GET"]),
    Route("/models", register_model, methods=["POST"]),
    Route("/models/{model_name}", describe_model, methods=["GET"]),
    Route("/models/{model_name}", scale_model, methods=["PUT"]),
    Route("/models/{model_name}", unregister_model, methods=["DELETE"]),
]
