"""The native LMI (DJL-compatible) API: /ping, /invocations, /predictions/{model}."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import lmi_core
from lmi_core.engine import Finished, GenerationEvent, GenerationRequest, LoraAdapter, Token
from lmi_core.errors import BadRequestError, ServiceError
from lmi_core.http import errors
from lmi_core.http.adapters import adapter_for, header_adapter
from lmi_core.http.common import (
    collect,
    collect_each,
    new_request_id,
    read_json,
    stream_response,
    until_disconnected,
)
from lmi_core.http.context import keep_alive, request_context
from lmi_core.http.lmi_protocol import LmiRequest, parse_model
from lmi_core.http.management import ping_code, ping_entry
from lmi_core.http.openai_api import native_chat
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


def _model_for(request: Request, body: Any) -> ServedModel:
    state: AppState = request.app.state.lmi
    name = request.query_params.get("model_name") or request.headers.get("model_name")
    if name is None and isinstance(body, dict) and isinstance(body.get("model_name"), str):
        name = body["model_name"]
    return state.server.get(name) if name else state.server.default("model_name")


async def invocations(request: Request) -> Response:
    state: AppState = request.app.state.lmi
    body = await read_json(request, state.config.max_request_size)
    return await predict(request, _model_for(request, body), body)


async def predictions(request: Request) -> Response:
    state: AppState = request.app.state.lmi
    pool = state.server.get(request.path_params["model_name"])
    body = await read_json(request, state.config.max_request_size)
    return await predict(request, pool, body)


async def predict(request: Request, pool: ServedModel, body: Any) -> Response:
    """Run an LMI request (or a chat request, when the body has ``messages``) on ``pool``."""
    if not isinstance(body, dict):
        raise BadRequestError("request body must be a JSON object", param="body")
    body = {k: v for k, v in body.items() if k != "model_name"}
    state: AppState = request.app.state.lmi
    if "messages" in body:
        chat_adapter = body.pop("adapters", None)
        if chat_adapter is not None and not isinstance(chat_adapter, str):
            raise BadRequestError("adapters of a chat request must be one adapter name", param="adapters")
        named = adapter_for(pool, chat_adapter, "adapters") if chat_adapter else None
        adapter = named or header_adapter(request, pool)
        return await native_chat(request, pool, body, adapter)
    lmi = parse_model(LmiRequest, body)
    keep_alive(request, lmi.parameters.keep_alive_seconds)
    adapters = _adapters(request, pool, lmi)
    params = lmi.parameters.sampling()
    if (constrained := lmi.parameters.constraint("parameters.")) is not None:
        await check(*constrained)
    if isinstance(lmi.inputs, list):
        if lmi.stream:
            raise BadRequestError("a list of inputs (a batch) cannot be streamed", param="stream")
        return JSONResponse(await _batch(request, pool, lmi, adapters))
    generation = GenerationRequest(new_request_id(), prompt=lmi.inputs, params=params, adapter=adapters[0])
    events = state.instrument(pool, generation, request_context(request))
    if lmi.stream:
        return await stream_response(request, events, lambda e: lmi_lines(e, lmi), "application/jsonlines")
    result = await until_disconnected(request, collect(events))
    return JSONResponse(lmi_result(result, lmi, lmi.inputs))


def _adapters(request: Request, pool: ServedModel, lmi: LmiRequest) -> list[LoraAdapter | None]:
    """Each prompt's LoRA adapter: the body's ``adapters``, else SageMaker's header, else none."""
    if lmi.adapters is None:
        return [header_adapter(request, pool)] * len(lmi.prompts)
    return [adapter_for(pool, n, "adapters") if n else None for n in lmi.adapter_names()]


async def _batch(
    request: Request, pool: ServedModel, lmi: LmiRequest, adapters: list[LoraAdapter | None]
) -> list[dict[str, Any]]:
    """DJL batch: every input runs at once in the engine's continuous batch; results in input order."""
    state: AppState = request.app.state.lmi
    generations = [
        GenerationRequest(new_request_id(), prompt=p, params=lmi.parameters.sampling(), adapter=a)
        for p, a in zip(lmi.prompts, adapters, strict=True)
    ]

    context = request_context(request)
    streams = [state.instrument(pool, g, context) for g in generations]
    # One failed (or the client left): merge closes the rest, which cancels their generations.
    results = await until_disconnected(request, collect_each(streams))
    return [lmi_result(events, lmi, prompt) for events, prompt in zip(results, lmi.prompts, strict=True)]


def _token_json(token: Token, lmi: LmiRequest) -> dict[str, Any]:
    out: dict[str, Any] = {"id": token.id, "text": token.text, "log_prob": token.log_prob}
    if token.special:
        out["special_token"] = True
    if lmi.parameters.top_n_tokens and token.top_logprobs:
        out["top_tokens"] = [{"id": i, "text": t, "log_prob": lp} for i, t, lp in token.top_logprobs]
    return out


def _details(finished: Finished, generated: int) -> dict[str, Any]:
    details: dict[str, Any] = {
        "finish_reason": finished.finish_reason,
        "generated_tokens": generated,
        "inputs": finished.prompt,
    }
    if finished.prompt_logprobs is not None:  # decoder_input_details (TGI's prefill tokens)
        details["prefill"] = [
            {"id": token, "text": text, "log_prob": log_prob}
            for token, text, log_prob, _, _ in finished.prompt_logprobs
        ]
    return details


def lmi_result(events: list[GenerationEvent], lmi: LmiRequest, prompt: str) -> dict[str, Any]:
    tokens = [e for e in events if isinstance(e, Token)]
    finished = next((e for e in events if isinstance(e, Finished)), None)
    text = "".join(t.text for t in tokens)
    if lmi.parameters.return_full_text:
        text = prompt + text
    result: dict[str, Any] = {"generated_text": text}
    if lmi.parameters.details and finished is not None:
        details = _details(finished, len(tokens))
        details["tokens"] = [_token_json(t, lmi) for t in tokens]
        result["details"] = details
    return result


async def lmi_lines(
    events: AsyncGenerator[GenerationEvent, None], lmi: LmiRequest
) -> AsyncGenerator[bytes, None]:
    """JSON lines: one ``{"token": ...}`` per token; the last also has ``generated_text``."""
    texts: list[str] = [lmi.prompts[0]] if lmi.parameters.return_full_text else []
    held: Token | None = None  # the last token, written together with the Finished that follows it
    count = 0
    try:
        async for event in events:
            if isinstance(event, Token):
                count += 1
                texts.append(event.text)
                if event.last:
                    held = event
                    continue
                yield _line({"token": _token_json(event, lmi)})
            elif isinstance(event, Finished):
                line: dict[str, Any] = {"token": _token_json(held, lmi)} if held else {}
                line["generated_text"] = "".join(texts)
                if lmi.parameters.details:
                    line["details"] = _details(event, count)
                yield _line(line)
                return
    except ServiceError as exc:
        # Headers are sent: the error becomes the last line, in DJL's shape.
        yield _line(
            {
                "token": {"id": -1, "text": "", "log_prob": -1.0, "special_token": True},
                "generated_text": "".join(texts),
                "details": {"finish_reason": "error", "generated_tokens": count},
                "error": errors.body(exc, "djl"),
            }
        )


def _line(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj) + b"\n"


routes = [
    Route("/ping", ping, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/version", version, methods=["GET"]),
    Route("/invocations", invocations, methods=["POST"]),
    Route("/predictions/{model_name}", predictions, methods=["POST"]),
    Route("/models/{model_name}/invoke", predictions, methods=["POST"]),
]
