"""Error bodies in the four dialects a client of this server parses, chosen by path.

Invariant: every error this server answers goes through ``render`` (a response) or ``body`` (a
streamed error line, once headers are sent), with the dialect ``dialect_for`` picks from the
request's path: vLLM's own routes (LoRA, tokenize) answer vLLM's ``ErrorResponse``, the rest of
``/v1`` OpenAI's error object, TGI's routes TGI's ``{"error", "error_type"}``, every other route
DJL's. The status code is the error's in every dialect, except where DJL answers another on its
own routes (``DJL_STATUS``: a prompt too long is DJL's 424); a full queue adds ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from starlette.responses import JSONResponse

from lmi_core.errors import BadRequestError, PromptTooLongError, QueueFullError, ServiceError

Dialect = Literal["djl", "openai", "vllm", "tgi"]

RETRY_AFTER_SECONDS = "1"
# vLLM's own routes (LoRA management, tokenizing): vLLM's error types, not OpenAI's.
VLLM_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/tokenize", "/detokenize"})
# TGI's routes (``lmi_core.http.tgi_api``): TGI's error body, which huggingface_hub raises by type.
TGI_PATHS = frozenset({"/", "/generate", "/generate_stream"})
# DJL's status where it differs from the error's own, by error type (docs/api.md, "Status codes").
DJL_STATUS = {PromptTooLongError.type: 424}

# OpenAI's error types by status; other statuses: server_error from 500 up, else invalid_request_error.
OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


def dialect_for(path: str) -> Dialect:
    """The error shape the clients of ``path`` parse."""
    if path in VLLM_PATHS:
        return "vllm"
    if path in TGI_PATHS:
        return "tgi"
    return "openai" if path.startswith("/v1/") else "djl"


def status(exc: ServiceError, dialect: Dialect) -> int:
    """The HTTP status of ``exc`` on a route of ``dialect``."""
    return DJL_STATUS.get(exc.type, exc.status) if dialect == "djl" else exc.status


def _djl(exc: ServiceError) -> dict[str, Any]:
    """DJL's ``{"code", "type", "message"}``, plus ``param`` when a field is at fault."""
    body: dict[str, Any] = {"code": status(exc, "djl"), "type": exc.type, "message": str(exc)}
    if exc.param:
        body["param"] = exc.param
    return body


def _openai(exc: ServiceError) -> dict[str, Any]:
    """OpenAI's ``{"error": {"message", "type", "param", "code"}}``; code = the HTTP status (vLLM)."""
    fallback = "server_error" if exc.status >= 500 else "invalid_request_error"
    error = {"message": str(exc), "type": OPENAI_TYPES.get(exc.status, fallback), "param": exc.param}
    return {"error": {**error, "code": exc.status}}


def _vllm(exc: ServiceError) -> dict[str, Any]:
    """vLLM's ``ErrorResponse``: OpenAI's object with vLLM's own types (``BadRequestError``...)."""
    kind = "BadRequestError" if exc.type == BadRequestError.type else exc.type
    return {"error": {"message": str(exc), "type": kind, "param": exc.param, "code": exc.status}}


def _tgi(exc: ServiceError) -> dict[str, Any]:
    """TGI's ``{"error", "error_type"}``: ``validation`` for a bad request, ``overloaded`` for a full
    queue, else ``generation``."""
    kind = "validation" if exc.status in (400, 413, 415, 422) else "generation"
    if isinstance(exc, QueueFullError):
        kind = "overloaded"
    return {"error": str(exc), "error_type": kind}


DIALECTS: dict[Dialect, Callable[[ServiceError], dict[str, Any]]] = {
    "djl": _djl,
    "openai": _openai,
    "vllm": _vllm,
    "tgi": _tgi,
}


def body(exc: ServiceError, dialect: Dialect) -> dict[str, Any]:
    """``exc`` as a JSON object in ``dialect``."""
    return DIALECTS[dialect](exc)


def render(exc: ServiceError, dialect: Dialect) -> JSONResponse:
    """``exc`` as a response in ``dialect``: its status, and ``Retry-After`` on a full queue (the
    client should come back, not give up)."""
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if isinstance(exc, QueueFullError) else None
    return JSONResponse(body(exc, dialect), status_code=status(exc, dialect), headers=headers)
