"""Error bodies in the six dialects a client of this server parses, chosen by path.

Invariant: every error this server answers goes through ``render`` (a response) or ``body`` (a
streamed error line, once headers are sent), with the dialect ``dialect_for`` picks from the
request's path: vLLM's own routes (LoRA, tokenize, score, rerank) answer vLLM's ``ErrorResponse``,
TEI's ``/embed`` TEI's, TGI's routes TGI's ``{"error", "error_type"}``, Anthropic's Messages routes
Anthropic's error envelope, the rest of ``/v1`` OpenAI's error object, every other route DJL's. The
status code is the error's in every dialect, except where DJL answers another on its own routes
(``DJL_STATUS``: a prompt too long is DJL's 424); a full queue adds ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from starlette.responses import JSONResponse

from lmi_core.errors import BadRequestError, PromptTooLongError, QueueFullError, ServiceError

Dialect = Literal["djl", "openai", "vllm", "tei", "anthropic", "tgi"]

RETRY_AFTER_SECONDS = "1"
# vLLM's own routes (LoRA management, tokenizing): vLLM's error types, not OpenAI's.
VLLM_PATHS = frozenset(
    {"/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/tokenize", "/detokenize", "/score", "/rerank"}
)
# Text Embeddings Inference's routes.
TEI_PATHS = frozenset({"/embed"})
ANTHROPIC_PREFIX = "/v1/messages"  # /v1/messages and /v1/messages/count_tokens
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
# Anthropic's error types by status (its API reference); other statuses: api_error. A full queue (503)
# is its overloaded_error, which its SDK retries.
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def dialect_for(path: str) -> Dialect:
    """The error shape the clients of ``path`` parse."""
    if path in VLLM_PATHS:
        return "vllm"
    if path in TEI_PATHS:
        return "tei"
    if path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/"):
        return "anthropic"
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


def _anthropic(exc: ServiceError) -> dict[str, Any]:
    """Anthropic's ``{"type": "error", "error": {"type", "message"}}``; the message names the field at
    fault (its envelope has no ``param``)."""
    return {
        "type": "error",
        "error": {"type": ANTHROPIC_TYPES.get(exc.status, "api_error"), "message": str(exc)},
    }


def _tei(exc: ServiceError) -> dict[str, Any]:
    """TEI's ``ErrorResponse``: ``{"error", "error_type"}`` (Validation, Overloaded, Backend...)."""
    kind = "Overloaded" if exc.status in (429, 503) else "Backend" if exc.status >= 500 else "Validation"
    return {"error": str(exc), "error_type": kind}


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
    "anthropic": _anthropic,
    "tei": _tei,
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
