"""The native LMI (DJL-compatible) API: /ping, /invocations, /predictions/{model}.

A request on it goes, in DJL's order: to the model's ``handle()`` when the model is served by one
(``handler_api``); else SageMaker's session requests and checks (``sessions``); the model's custom
input formatter (``formatters``); then an LMI request (``inputs``) or a chat request (``messages``),
answered in the format ``option.output_formatter`` and ``option.tgi_compat`` choose (``lmi_render``),
each response object through the custom output formatter when the model has one.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import lmi_core
from lmi_core.djl_options import DjlOptions
from lmi_core.engine import GenerationEvent, GenerationRequest, LoraAdapter
from lmi_core.errors import BadRequestError
from lmi_core.http import errors, formatters, handler_api, lmi_render, sessions
from lmi_core.http.adapters import adapter_for, header_adapter
from lmi_core.http.common import (
    collect,
    collect_each,
    merge,
    new_request_id,
    read_json,
    stream_response,
    until_disconnected,
)
from lmi_core.http.context import keep_alive, request_context
from lmi_core.http.formatters import OutputFormatter
from lmi_core.http.handler_api import serves_handle
from lmi_core.http.lmi_protocol import LmiRequest, parse_model
from lmi_core.http.lmi_render import DJL, Shape
from lmi_core.http.management import ping_code, ping_entry
from lmi_core.http.openai_api import native_chat, run_call, unknown_fields, with_ignored
from lmi_core.http.openai_render import JSON_LINES, SSE, Call, Framing
from lmi_core.http.pooling_api import pooling_invocation
from lmi_core.http.state import AppState, ServedModel
from lmi_core.http.structured import check
from lmi_core.serving.pool import ModelStatus


async def ping(request: Request) -> Response:
    """200 only when every model can serve; 503 while any is loading or restarting; 500 if failed.

    A model that loads on demand can serve whether loaded or not (a request loads it): residency
    never turns ``/ping`` away from 200 (``registry.health_of``)."""
    state: AppState = request.app.state.lmi
    healths = {name: state.server.health(name) for name in state.server.names()}
    body = {name: ping_entry(health) for name, health in healths.items()}
    return JSONResponse(body, status_code=ping_code(h.status for h in healths.values()))


async def health(request: Request) -> Response:
    """vLLM's probe (guidellm, load balancers): 200 with no body while some model can serve (one
    loaded, or one a request loads), else 503."""
    state: AppState = request.app.state.lmi
    statuses = [state.server.health(name).status for name in state.server.names()]
    return Response(status_code=200 if ModelStatus.READY in statuses else 503)


async def version(request: Request) -> Response:
    return JSONResponse({"version": lmi_core.__version__})


def model_for(request: Request, body: Any) -> ServedModel:
    state: AppState = request.app.state.lmi
    name = _name(request)
    if name is None and isinstance(body, dict) and isinstance(body.get("model_name"), str):
        name = body["model_name"]
    return state.server.get(name) if name else state.server.default("model_name")


def _name(request: Request) -> str | None:
    return request.query_params.get("model_name") or request.headers.get("model_name")


def _handler_model(request: Request) -> ServedModel | None:
    """The model a request names outside its body (or the only one), when it serves a ``handle()``:
    its body is the handler's, whatever its type, so it is not read as JSON here."""
    state: AppState = request.app.state.lmi
    name = _name(request)
    served = state.server.served()
    model = state.server.get(name) if name else served[0] if len(served) == 1 else None
    return model if model is not None and serves_handle(model) else None


async def invocations(request: Request) -> Response:
    state: AppState = request.app.state.lmi
    if (handler := _handler_model(request)) is not None:
        return await handler_api.invoke(request, handler)
    body = await read_json(request, state.config.max_request_size)
    return await predict(request, model_for(request, body), body)


async def predictions(request: Request) -> Response:
    state: AppState = request.app.state.lmi
    pool = state.server.get(request.path_params["model_name"])
    if serves_handle(pool):
        return await handler_api.invoke(request, pool)
    body = await read_json(request, state.config.max_request_size)
    return await predict(request, pool, body)


@dataclass(frozen=True)
class RouteStyle:
    """What a route fixes of the response: TGI's routes their shape and whether they stream."""

    shape: Shape | None = None  # None: the model's (DJL's, or TGI's with option.tgi_compat)
    stream: bool | None = None  # None: the request's ``stream``


NATIVE = RouteStyle()


async def predict(request: Request, pool: ServedModel, body: Any, route: RouteStyle = NATIVE) -> Response:
    """Run an LMI request (or a chat request, when the body has ``messages``) on ``pool``: sessions,
    the model's custom input formatter, then the request in the format the model and route say."""
    if not isinstance(body, dict):
        raise BadRequestError("request body must be a JSON object", param="body")
    if serves_handle(pool):  # named in the body: its JSON is the handler's body
        return await handler_api.invoke(request, pool, orjson.dumps(body))
    body = {k: v for k, v in body.items() if k != "model_name"}
    if not pool.config.pooling.generates:  # an embedding model: DJL's bare vectors
        return await pooling_invocation(request, pool, body)
    if "requestType" in body:
        return await sessions.answer(request, pool, body)
    sessions.check(request, pool)
    body, output = await formatters.format_input(request, pool, body)
    djl = pool.config.djl
    if "messages" in body:
        chat_adapter = body.pop("adapters", None)
        if chat_adapter is not None and not isinstance(chat_adapter, str):
            raise BadRequestError("adapters of a chat request must be one adapter name", param="adapters")
        named = adapter_for(pool, chat_adapter, "adapters") if chat_adapter else None
        adapter = named or header_adapter(request, pool)
        stream, framing = chat_framing(djl)
        return await native_chat(request, pool, body, adapter, framing, stream, output)
    lmi = parse_model(LmiRequest, body)
    ignored = unknown_fields(pool, lmi)
    keep_alive(request, lmi.parameters.keep_alive_seconds)
    adapters = _adapters(request, pool, lmi)
    if (constrained := lmi.parameters.constraint("parameters.")) is not None:
        await check(*constrained)
    if isinstance(lmi.inputs, list):  # DJL's batch: one JSON list, streamed or not
        return with_ignored(JSONResponse(await _batch(request, pool, lmi, adapters, output)), ignored)
    stream = lmi.stream if route.stream is None else route.stream
    name = output_format(djl, stream) if route.shape is None else "sse" if stream else "json"
    if name.endswith("_chat"):
        response = await _as_chat(request, pool, lmi, adapters[0], name, output)
        return with_ignored(response, ignored)
    shape = route.shape or (TGI_COMPAT if djl.tgi_compat and name in ("json", "sse") else DJL)
    generation = GenerationRequest(
        new_request_id(),
        prompt=lmi.inputs,
        params=lmi.parameters.sampling(),
        adapter=adapters[0],
        priority=lmi.parameters.priority,
    )
    state: AppState = request.app.state.lmi
    events = state.instrument(pool, generation, request_context(request))
    if name == "json":
        result = lmi_render.result(await until_disconnected(request, collect(events)), lmi, lmi.inputs, shape)
        answer: Any = await output(result) if output is not None else result
        return with_ignored(JSONResponse([answer] if shape.as_list else answer), ignored)
    frame, media_type = lmi_render.SSE if name == "sse" else lmi_render.JSON_LINES
    dialect = errors.dialect_for(request.url.path)

    def render(source: AsyncGenerator[GenerationEvent, None]) -> AsyncGenerator[bytes, None]:
        objects = lmi_render.lines(source, lmi, shape, dialect)
        if output is not None:
            objects = output.each(objects, lambda exc: lmi_render.error_line(exc, "", 0, shape, dialect))
        return frame(objects)

    return with_ignored(await stream_response(request, events, render, media_type), ignored)


TGI_COMPAT = Shape(tgi=True, as_list=True, details=True)  # DJL's option.tgi_compat on its routes


def output_format(djl: DjlOptions, stream: bool) -> str:
    """DJL's output formatter of an LMI request: the model's ``option.output_formatter`` whatever the
    request's ``stream`` (as DJL), else JSON, or when streamed JSON lines (SSE in TGI mode)."""
    if djl.output_formatter is not None:
        return djl.output_formatter
    if not stream:
        return "json"
    return "sse" if djl.tgi_compat else "jsonlines"


def chat_framing(djl: DjlOptions) -> tuple[bool | None, Framing]:
    """A chat response's framing on the native API: DJL's JSON lines unless the model's output
    formatter names a chat one (``json_chat``: never streamed; ``sse_chat``: OpenAI's events)."""
    name = djl.output_formatter
    if name == "json_chat":
        return False, JSON_LINES
    if name == "sse_chat":
        return True, SSE
    return (True if name == "jsonlines_chat" else None), JSON_LINES


async def _as_chat(
    request: Request,
    pool: ServedModel,
    lmi: LmiRequest,
    adapter: LoraAdapter | None,
    name: str,
    output: OutputFormatter | None,
) -> Response:
    """An LMI request answered in the chat completion schema (DJL's ``*_chat`` output formatters)."""
    assert isinstance(lmi.inputs, str)
    generation = GenerationRequest(
        new_request_id(),
        prompt=lmi.inputs,
        params=lmi.parameters.sampling(),
        priority=lmi.parameters.priority,
    )
    call = Call(pool, True, name != "json_chat", 1, [generation], [""], None, False).with_adapter(adapter)
    return await run_call(request, call, SSE if name == "sse_chat" else JSON_LINES, output=output)


def _adapters(request: Request, pool: ServedModel, lmi: LmiRequest) -> list[LoraAdapter | None]:
    """Each prompt's LoRA adapter: the body's ``adapters`` (or TGI's ``parameters.adapter_id``), else
    SageMaker's header, else none."""
    tgi = lmi.parameters.adapter_id
    if tgi is not None:
        if lmi.adapters is not None:
            raise BadRequestError(
                "give adapters or parameters.adapter_id, not both", param="parameters.adapter_id"
            )
        return [adapter_for(pool, tgi, "parameters.adapter_id")] * len(lmi.prompts)
    if lmi.adapters is None:
        return [header_adapter(request, pool)] * len(lmi.prompts)
    return [adapter_for(pool, n, "adapters") if n else None for n in lmi.adapter_names()]


async def _batch(
    request: Request,
    pool: ServedModel,
    lmi: LmiRequest,
    adapters: list[LoraAdapter | None],
    output: OutputFormatter | None,
) -> list[Any]:
    """DJL batch: every input runs at once in the engine's continuous batch; results in input order."""
    state: AppState = request.app.state.lmi
    generations = [
        GenerationRequest(
            new_request_id(),
            prompt=p,
            params=lmi.parameters.sampling(),
            adapter=a,
            priority=lmi.parameters.priority,
        )
        for p, a in zip(lmi.prompts, adapters, strict=True)
    ]

    context = request_context(request)
    streams = [state.instrument(pool, g, context) for g in generations]
    # One failed (or the client left): merge closes the rest, which cancels their generations.
    results = await until_disconnected(request, collect_each(merge(streams), len(streams)))
    shape = TGI_COMPAT if pool.config.djl.tgi_compat else DJL
    answers = [lmi_render.result(r, lmi, p, shape) for r, p in zip(results, lmi.prompts, strict=True)]
    return [await output(a) for a in answers] if output is not None else answers


routes = [
    Route("/ping", ping, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/version", version, methods=["GET"]),
    Route("/invocations", invocations, methods=["POST"]),
    Route("/predictions/{model_name}", predictions, methods=["POST"]),
    Route("/models/{model_name}/invoke", predictions, methods=["POST"]),
]
