"""LoRA adapters over HTTP: DJL's and vLLM's management routes, and which adapter a request names.

One registry per model (``ServedModel.adapters``, ``lmi_core.serving.adapters``), two management dialects:
DJL's ``/models/{model}/adapters[/{name}[/update]]`` (and ``/adapters...`` for the only model) with
DJL's bodies and errors, vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` with vLLM's
plain-text successes and ``{"error": {...}}`` failures. A request picks an adapter by OpenAI's
``model``, the LMI body's ``adapters`` or SageMaker's header (``adapter_for``); the handlers only
resolve names to ``LoraAdapter`` values, the pool routes them. Checking an adapter directory reads
files, so it runs in a thread; registering is then one dict insert: running requests carry their own
adapter and are never touched.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from lmi_core.engine import LoraAdapter
from lmi_core.errors import BadRequestError, ModelNotFoundError, NotFoundError, ServiceError
from lmi_core.http.common import query_and_body, read_json
from lmi_core.http.lmi_protocol import parse_model
from lmi_core.http.state import AppState, ServedModel
from lmi_core.serving.adapters import AdapterRegistry, RegisteredAdapter, check_name

# SageMaker's per-request adapter (multi-adapter inference components).
ADAPTER_HEADER = "X-Amzn-SageMaker-Adapter-Identifier"


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.lmi
    return state


def _named(request: Request, name: str | None, param: str) -> ServedModel:
    """The model ``name``, or when the request names none the only one (a 400 naming ``param`` if not)."""
    server = _state(request).server
    return server.get(name) if name is not None else server.default(param)


def registry(model: ServedModel) -> AdapterRegistry:
    """``model``'s adapters; a 400 saying so when it was started without ``option.enable_lora``."""
    if model.adapters is None:
        raise BadRequestError(
            f"LoRA is not enabled for model {model.name} (option.enable_lora=true enables it).",
            param="adapters",
        )
    return model.adapters


def adapter_for(model: ServedModel, name: str, param: str) -> LoraAdapter:
    """The registered adapter ``name`` of ``model``: 400 without LoRA, 404 naming an unknown one."""
    found = registry(model).find(name)
    if found is None:
        raise NotFoundError(f"The adapter {name} was not found for model {model.name}", param=param)
    return found.lora


def header_adapter(request: Request, model: ServedModel) -> LoraAdapter | None:
    """The adapter SageMaker's header names, if the request has it."""
    name = request.headers.get(ADAPTER_HEADER)
    return adapter_for(model, name, ADAPTER_HEADER) if name else None


def model_or_adapter(request: Request, name: str | None) -> tuple[ServedModel, LoraAdapter | None]:
    """OpenAI's ``model``: a served model (the header may add an adapter), else a registered adapter
    of one (vLLM: an adapter is a model whose parent is its base); 404 naming ``model`` otherwise.
    No name: the only model, else a 400 naming ``model``."""
    server = _state(request).server
    if name is None:
        model = server.default("model")
        return model, header_adapter(request, model)
    try:
        model = server.get(name)
    except ModelNotFoundError as exc:
        for served in server.served():
            if served.adapters is not None and (found := served.adapters.find(name)) is not None:
                return served, found.lora
        exc.param = "model"
        raise
    return model, header_adapter(request, model)


# -- DJL's routes --------------------------------------------------------------------------------


def _model(request: Request) -> ServedModel:
    """The path's model, or for ``/adapters...`` the only one (DJL's rule)."""
    return _named(request, request.path_params.get("model_name"), "model_name")


def _flag(value: Any, param: str) -> bool | None:
    """A DJL boolean option ("true"/"false", any case); None when absent."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "false"):
        return text == "true"
    raise BadRequestError(f"invalid request field '{param}': expected true or false", param=param)


class RegisterParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    src: str = Field(min_length=1)
    preload: Any = None
    pin: Any = None


class UpdateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    src: str | None = None
    preload: Any = None
    pin: Any = None


class ListParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(100, ge=1)
    next_page_token: int = Field(0, ge=0)


def describe(entry: RegisteredAdapter) -> dict[str, Any]:
    """DJL's ``DescribeAdapterResponse`` (and list item)."""
    return {"name": entry.name, "src": entry.src, "preload": entry.preload, "pin": entry.pin}


async def list_adapters(request: Request) -> Response:
    adapters = registry(_model(request))
    params = parse_model(ListParams, dict(request.query_params))
    entries = adapters.entries()
    start, end = params.next_page_token, params.next_page_token + params.limit
    body: dict[str, Any] = {"adapters": [describe(e) for e in entries[start:end]]}
    if end < len(entries):
        body["nextPageToken"] = str(end)
    return JSONResponse(body)


async def _register(
    adapters: AdapterRegistry, name: str, src: str, *, preload: bool, pin: bool, source: Any
) -> RegisteredAdapter:
    """Check ``src`` off the event loop, then register it (a concurrent registration of the same name
    meanwhile makes this one the 409)."""
    check_name(name)
    adapters.check_free(name)  # a taken name: the 409 before any file IO
    await asyncio.to_thread(adapters.check, src)
    return adapters.add(name, src, preload=preload, pin=pin, source=source)


async def register_adapter(request: Request) -> Response:
    adapters = registry(_model(request))
    params = parse_model(
        RegisterParams, await query_and_body(request, _state(request).config.max_request_size)
    )
    preload = _flag(params.preload, "preload")
    pin = _flag(params.pin, "pin") or False
    await _register(
        adapters, params.name, params.src, preload=True if preload is None else preload, pin=pin, source="djl"
    )
    return JSONResponse({"status": f"Adapter {params.name} registered"})


async def describe_adapter(request: Request) -> Response:
    adapters = registry(_model(request))
    return JSONResponse(describe(adapters.get(request.path_params["adapter_name"])))


async def update_adapter(request: Request) -> Response:
    adapters = registry(_model(request))
    name = request.path_params["adapter_name"]
    params = parse_model(UpdateParams, await query_and_body(request, _state(request).config.max_request_size))
    entry = adapters.get(name)
    if params.src is not None and params.src != entry.src:
        raise BadRequestError("Updating adapter path is not supported.", param="src")
    adapters.update(name, preload=_flag(params.preload, "preload"), pin=_flag(params.pin, "pin"))
    return JSONResponse({"status": f"Adapter {name} updated"})


async def unregister_adapter(request: Request) -> Response:
    adapters = registry(_model(request))
    name = request.path_params["adapter_name"]
    adapters.remove(name)
    return JSONResponse({"status": f"Adapter {name} unregistered"})


# -- vLLM's routes -------------------------------------------------------------------------------


def invalid_input(message: str, status: int = 400, kind: str = "InvalidUserInput") -> ServiceError:
    return ServiceError(message, status=status, type=kind)


class LoadLoraRequest(BaseModel):
    """vLLM's ``LoadLoRAAdapterRequest``; ``model`` (which base, when the server has several) is ours."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str
    lora_path: str
    load_inplace: bool = False
    is_3d_lora_weight: bool = False
    model: str | None = None


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str
    lora_int_id: int | None = None
    model: str | None = None


async def load_lora_adapter(request: Request) -> Response:
    body = parse_model(LoadLoraRequest, await read_json(request, _state(request).config.max_request_size))
    model = _named(request, body.model, "model")
    adapters = registry(model)
    name, path = body.lora_name, body.lora_path
    if not name or not path:
        raise invalid_input("Both 'lora_name' and 'lora_path' must be provided.")
    if name == model.name:
        raise invalid_input(f"The lora adapter '{name}' conflicts with a served base model.")
    existing = adapters.find(name)
    if existing is not None and not body.load_inplace:
        raise invalid_input(
            f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in "
            "place, set 'load_inplace' to True."
        )
    check_name(name, param="lora_name")
    try:
        await asyncio.to_thread(adapters.check, path)
    except BadRequestError as exc:
        if "no such directory" in str(exc):
            raise invalid_input(
                f"Loading lora {name} failed: No adapter found for {path}", 404, "NotFoundError"
            ) from None
        raise BadRequestError(f"Loading lora {name} failed: {exc}", param="lora_path") from None
    if adapters.find(name) is not None:  # load_inplace, or registered meanwhile in place
        adapters.remove(name)
    adapters.add(name, path, source="vllm")
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(request: Request) -> Response:
    body = parse_model(UnloadLoraRequest, await read_json(request, _state(request).config.max_request_size))
    adapters = registry(_named(request, body.model, "model"))
    name = body.lora_name
    if not name:
        raise invalid_input("'lora_name' needs to be provided to unload a LoRA adapter.")
    if adapters.find(name) is None:
        raise invalid_input(f"The lora adapter '{name}' cannot be found.", 404, "NotFoundError")
    adapters.remove(name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


routes = [
    *(
        route
        for prefix in ("/models/{model_name}", "")
        for route in (
            Route(f"{prefix}/adapters", list_adapters, methods=["GET"]),
            Route(f"{prefix}/adapters", register_adapter, methods=["POST"]),
            Route(f"{prefix}/adapters/{{adapter_name}}", describe_adapter, methods=["GET"]),
            Route(f"{prefix}/adapters/{{adapter_name}}", unregister_adapter, methods=["DELETE"]),
            Route(f"{prefix}/adapters/{{adapter_name}}/update", update_adapter, methods=["POST"]),
        )
    ),
    Route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"]),
    Route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"]),
]
