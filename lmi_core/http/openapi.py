"""``GET /openapi.json``: the HTTP API as OpenAPI 3.1, request bodies generated from the pydantic models.

The request schemas are the validators themselves, so the document cannot drift from what the server
accepts; response schemas are written here. The fuzz tests (schemathesis) generate requests from it.
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lmi_core import __version__
from lmi_core.http.anthropic_protocol import CountTokensRequest, MessagesRequest
from lmi_core.http.lmi_protocol import LmiRequest
from lmi_core.http.openai_protocol import ChatCompletionRequest, CompletionRequest
from lmi_core.http.responses_protocol import ResponsesRequest

REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    LmiRequest,
    CompletionRequest,
    ChatCompletionRequest,
    ResponsesRequest,
    MessagesRequest,
    CountTokensRequest,
)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


STRING, INTEGER = {"type": "string"}, {"type": "integer"}
NULLABLE_STRING = {"type": ["string", "null"]}
FINISH_REASON = {"type": ["string", "null"], "enum": ["stop", "length", None]}
USAGE = _obj(
    ["prompt_tokens", "completion_tokens", "total_tokens"],
    prompt_tokens=INTEGER,
    completion_tokens=INTEGER,
    total_tokens=INTEGER,
)


def _openai_result(kind: str, choice: dict[str, Any]) -> dict[str, Any]:
    return _obj(
        ["id", "object", "created", "model", "choices", "usage"],
        id=STRING,
        object={"const": kind},
        created=INTEGER,
        model=STRING,
        usage=USAGE,
        choices={"type": "array", "items": choice},
    )


RESPONSE_SCHEMAS: dict[str, Any] = {
    "LmiError": _obj(["code", "type", "message"], code=INTEGER, type=STRING, message=STRING, param=STRING),
    "OpenAIError": _obj(
        ["error"],
        error=_obj(
            ["message", "type", "param", "code"],
            message=STRING,
            type=STRING,
            param=NULLABLE_STRING,
            code={"type": ["integer", "string", "null"]},
        ),
    ),
    "LmiResult": _obj(["generated_text"], generated_text=STRING, details={"type": "object"}),
    "Completion": _openai_result(
        "text_completion",
        _obj(["index", "text", "finish_reason"], index=INTEGER, text=STRING, finish_reason=FINISH_REASON),
    ),
    "ChatCompletion": _openai_result(
        "chat.completion",
        _obj(
            ["index", "message", "finish_reason"],
            index=INTEGER,
            finish_reason=FINISH_REASON,
            message=_obj(["role", "content"], role={"const": "assistant"}, content=STRING),
        ),
    ),
    "Response": _obj(
        ["id", "object", "created_at", "status", "model", "output"],
        id=STRING,
        object={"const": "response"},
        created_at=INTEGER,
        status={"enum": ["completed", "incomplete", "in_progress", "cancelled", "failed"]},
        model=STRING,
        output={"type": "array", "items": _obj(["type"], type=STRING)},
        usage={"type": ["object", "null"]},
    ),
    "AnthropicMessage": _obj(
        ["id", "type", "role", "model", "content", "stop_reason", "usage"],
        id=STRING,
        type={"const": "message"},
        role={"const": "assistant"},
        model=STRING,
        content={"type": "array", "items": _obj(["type"], type=STRING)},
        stop_reason={"enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use"]},
        stop_sequence=NULLABLE_STRING,
        usage=_obj(["input_tokens", "output_tokens"], input_tokens=INTEGER, output_tokens=INTEGER),
    ),
    "AnthropicError": _obj(
        ["type", "error"],
        type={"const": "error"},
        error=_obj(["type", "message"], type=STRING, message=STRING),
    ),
    "Model": _obj(
        ["id", "object", "created", "owned_by"],
        id=STRING,
        object={"const": "model"},
        created=INTEGER,
        owned_by=STRING,
    ),
    "ModelList": _obj(
        ["object", "data"], object={"const": "list"}, data={"type": "array", "items": _ref("Model")}
    ),
}

# What each error status means, for every route that runs a model.
ERRORS = {
    "400": "Bad request: the message and `param` name the field",
    "401": "Missing or wrong API key (when one is configured)",
    "404": "Unknown model",
    "413": "Body larger than max_request_size",
    "415": "Body whose content type is not JSON",
    "424": "The engine failed this request",
    "503": "Queue full (with Retry-After), model not ready, or its worker failed",
    "504": "The request took longer than option.predict_timeout",
    "507": "The engine ran out of memory",
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


# A streamed response, one item at a time: a server-sent event, or a line of JSON.
STREAMS = {
    "text/event-stream": _obj(["data"], data=STRING, event=STRING),
    "application/jsonlines": {"type": "object"},
}


def _generation_op(
    summary: str, body: dict[str, Any], result: dict[str, Any], stream: str | None, error: str
) -> dict[str, Any]:
    """A POST that runs the model; ``stream``: the media type of its stream (None: never streamed)."""
    content = {"application/json": {"schema": result}}
    if stream is not None:
        content[stream] = {"schema": STREAMS[stream]}
    responses: dict[str, Any] = {
        "200": {"description": "The result, or (with `stream: true`) its stream", "content": content}
    }
    responses.update({code: _json(_ref(error), text) for code, text in ERRORS.items()})
    return {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": responses,
    }


def _get_op(summary: str, response: dict[str, Any], error: str = "LmiError", *codes: str) -> dict[str, Any]:
    responses = {"200": response}
    responses.update({code: _json(_ref(error), ERRORS[code]) for code in ("401", *codes)})
    return {"summary": summary, "responses": responses}


def _model_param(where: str, required: bool) -> dict[str, Any]:
    return {"name": "model_name", "in": where, "required": required, "schema": STRING}


@functools.cache
def build_spec() -> dict[str, Any]:
    _, defs = models_json_schema(
        [(model, "validation") for model in REQUEST_MODELS], ref_template="#/components/schemas/{model}"
    )
    lmi_body = _ref("LmiRequest")
    native = {"anyOf": [lmi_body, _ref("ChatCompletionRequest")]}
    # A list of inputs (DJL batch) gives a list of results.
    lmi_results = {"anyOf": [_ref("LmiResult"), {"type": "array", "items": _ref("LmiResult")}]}
    native_result = {"anyOf": [*lmi_results["anyOf"], _ref("ChatCompletion")]}
    predict = _generation_op(
        "Run the model on an LMI request", lmi_body, lmi_results, "application/jsonlines", "LmiError"
    )
    predict["parameters"] = [_model_param("path", True)]
    invocations = _generation_op(
        "LMI request, or chat (a body with `messages`)",
        native,
        native_result,
        "application/jsonlines",
        "LmiError",
    )
    invocations["parameters"] = [_model_param("query", False)]
    ping = {
        "summary": "200 when every model is ready",
        "security": [],
        "responses": {
            code: _json({"type": "object"}, text)
            for code, text in (("200", "All models ready"), ("500", "A model failed"), ("503", "Loading"))
        },
    }
    health = {
        "summary": "vLLM's probe: 200 (no body) when every model can serve, 503 otherwise",
        "security": [],
        "responses": {"200": {"description": "Serving"}, "503": {"description": "Not serving"}},
    }
    live = {
        "summary": "200 while the server and its supervision loop run, even while models load",
        "security": [],
        "responses": {"200": _json({"type": "object"}, "Alive")},
    }
    count_tokens = _generation_op(
        "The prompt tokens of a Messages request",
        _ref("CountTokensRequest"),
        _obj(["input_tokens"], input_tokens=INTEGER),
        None,
        "AnthropicError",
    )
    count_tokens["responses"]["501"] = _json(_ref("AnthropicError"), "The model's engine does not tokenize")
    response_id = {"name": "response_id", "in": "path", "required": True, "schema": STRING}
    metrics = {"description": "Prometheus text format", "content": {"text/plain": {"schema": STRING}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "lmi-core", "version": __version__},
        "paths": {
            "/ping": {"get": ping},
            "/health": {"get": health},
            "/version": {
                "get": _get_op("The server's version", _json(_obj(["version"], version=STRING), "Version"))
            },
            "/live": {"get": live},
            "/invocations": {"post": invocations},
            "/predictions/{model_name}": {"post": predict},
            "/models/{model_name}/invoke": {"post": predict},
            "/v1/completions": {
                "post": _generation_op(
                    "OpenAI completions",
                    _ref("CompletionRequest"),
                    _ref("Completion"),
                    "text/event-stream",
                    "OpenAIError",
                )
            },
            "/v1/chat/completions": {
                "post": _generation_op(
                    "OpenAI chat completions",
                    _ref("ChatCompletionRequest"),
                    _ref("ChatCompletion"),
                    "text/event-stream",
                    "OpenAIError",
                )
            },
            "/v1/responses": {
                "post": _generation_op(
                    "OpenAI Responses API (on the chat path)",
                    _ref("ResponsesRequest"),
                    _ref("Response"),
                    "text/event-stream",
                    "OpenAIError",
                )
            },
            "/v1/responses/{response_id}": {
                "get": {
                    **_get_op(
                        "A stored response", _json(_ref("Response"), "The response"), "OpenAIError", "404"
                    ),
                    "parameters": [response_id],
                }
            },
            "/v1/responses/{response_id}/cancel": {
                "post": {
                    **_get_op(
                        "Cancel a running stored response",
                        _json(_ref("Response"), "It"),
                        "OpenAIError",
                        "400",
                        "404",
                    ),
                    "parameters": [response_id],
                }
            },
            "/v1/messages": {
                "post": _generation_op(
                    "Anthropic Messages API (on the chat path)",
                    _ref("MessagesRequest"),
                    _ref("AnthropicMessage"),
                    "text/event-stream",
                    "AnthropicError",
                )
            },
            "/v1/messages/count_tokens": {"post": count_tokens},
            "/v1/models": {"get": _get_op("Models", _json(_ref("ModelList"), "The models"), "OpenAIError")},
            "/v1/models/{model}": {
                "get": {
                    **_get_op("One model", _json(_ref("Model"), "The model"), "OpenAIError", "404"),
                    "parameters": [{"name": "model", "in": "path", "required": True, "schema": STRING}],
                }
            },
            "/metrics": {"get": _get_op("Prometheus metrics", metrics)},
            "/openapi.json": {"get": _get_op("This document", _json({"type": "object"}, "OpenAPI 3.1"))},
        },
        "components": {
            "schemas": {**defs["$defs"], **RESPONSE_SCHEMAS},
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"apiKey": []}],
    }


async def openapi_json(request: Request) -> Response:
    return JSONResponse(build_spec())


routes = [Route("/openapi.json", openapi_json, methods=["GET"])]
