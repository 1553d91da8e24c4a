"""The management API (DJL-compatible): list, describe, register, scale and unregister models.

``GET /models``, ``GET /models/{name}``, ``POST /models?url=<dir>``, ``PUT /models/{name}`` and
``DELETE /models/{name}``, with DJL's bodies and status messages. Query parameters (or, for POST, the
same fields as a JSON body) are validated by pydantic models: a bad one is a 400 that names it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lmi_core.config import ModelConfig, load_model_config
from lmi_core.errors import BadRequestError, ServiceError, WorkerFailedError
from lmi_core.http.common import read_json
from lmi_core.http.lmi_api import PING_STATUS
from lmi_core.http.lmi_protocol import parse_model
from lmi_core.http.state import AppState
from lmi_core.pool import WorkerPool

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


async def list_models(request: Request) -> Response:
    params = parse_model(ListParams, dict(request.query_params))
    server = _state(request).server
    statuses = server.status()
    names = sorted(server.models)
    page = names[params.next_page_token : params.next_page_token + params.limit]
    models = [
        {"modelName": name, "modelUrl": _url(server.models[name]), "status": statuses[name]} for name in page
    ]
    body: dict[str, Any] = {"models": models}
    if params.next_page_token + params.limit < len(names):
        body["nextPageToken"] = str(params.next_page_token + params.limit)
    return JSONResponse(body)


def _url(config: ModelConfig) -> str:
    return str(config.model_dir or config.model_id)


def _health(pool: WorkerPool) -> str:
    """DJL's model status: ``Healthy``, ``Unhealthy`` (serving below minWorkers), ``PENDING``, ``FAILED``."""
    status = PING_STATUS[pool.status]
    return "Unhealthy" if status == "Healthy" and pool.ready_workers < pool.min_workers else status


def _worker(facts: dict[str, Any]) -> dict[str, Any]:
    """DJL's worker entry (``id``, ``startTime``, ``status``) plus its processes and resources."""
    return {
        "id": facts["id"],
        "startTime": facts["start_time"],
        "status": facts["status"],
        "pids": facts["pids"],
        "devices": facts["devices"],
        "threads": facts["threads"],
        "inFlight": facts["in_flight"],
        "restarts": facts["restarts"],
        "lastError": facts["last_error"],
    }


def _worker_groups(pool: WorkerPool, workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DJL's ``workerGroups``: all CPU workers form one group; on GPU, one group per device slice."""
    if not any(g.devices for g in pool.groups):
        bounds = {"minWorkers": pool.min_workers, "maxWorkers": pool.max_workers}
        return [{"device": {"deviceType": "cpu", "deviceId": -1}, **bounds, "workers": workers}]
    slices = [g.devices for g in pool.groups]
    # A worker may still hold a slice that a re-plan (PUT) dropped, until it has stopped.
    slices += [d for d in dict.fromkeys(tuple(w["devices"]) for w in workers) if d not in slices]
    return [
        {
            "device": {"deviceType": "gpu", "deviceId": devices[0]},
            "devices": list(devices),
            # A slice holds one worker; the first free slice is filled first, so slices < min stay busy.
            "minWorkers": int(i < pool.min_workers),
            "maxWorkers": 1,
            "workers": [w for w in workers if tuple(w["devices"]) == devices],
        }
        for i, devices in enumerate(slices)
    ]


async def describe_model(request: Request) -> Response:
    state = _state(request)
    name = request.path_params["model_name"]
    config = state.server.config(name)
    loaded_at_startup = name in {m.name for m in state.startup_models}
    pool = state.server.pools.get(name)
    if pool is None:  # failed to load
        model: dict[str, Any] = {
            "modelName": name,
            "modelUrl": _url(config),
            "status": "FAILED",
            "error": state.server.failed.get(name),
            "loadedAtStartup": loaded_at_startup,
            "workerGroups": [],
        }
    else:
        facts = pool.describe()
        model = {
            **{k: v for k, v in facts.items() if k != "workers"},
            "status": "PENDING" if name in state.server.loading else _health(pool),
            "loadedAtStartup": loaded_at_startup,
            "workerGroups": _worker_groups(pool, [_worker(w) for w in facts["workers"]]),
        }
    return JSONResponse([{"workflowName": name, "models": [model]}])


async def _params(request: Request) -> dict[str, Any]:
    """Query parameters, overridden by a JSON body's fields (DJL accepts either)."""
    params: dict[str, Any] = dict(request.query_params)
    if request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
        body = await read_json(request, _state(request).config.max_request_size)
        if not isinstance(body, dict):
            raise BadRequestError("request body must be a JSON object", param="body")
        params.update(body)
    return params


async def register_model(request: Request) -> Response:
    state = _state(request)
    params = parse_model(RegisterParams, await _params(request))
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
