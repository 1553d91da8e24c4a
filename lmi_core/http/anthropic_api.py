"""Anthropic's Messages API: ``POST /v1/messages`` (Claude Code's only API) and ``.../count_tokens``.

Invariant: one core. A Messages request is translated onto a chat request (``anthropic_protocol``),
run by the chat path's ``chat_call``/``run_call``, and its chat result or chunks are rendered as an
Anthropic message or events (``anthropic_render``). Errors answer in Anthropic's envelope (the
``anthropic`` dialect of ``http/errors.py``, picked by path, in-stream errors included). Claude Code's
``?beta=true`` query and the ``anthropic-version``/``anthropic-beta`` headers are accepted and change
nothing; ``x-api-key`` carries the API key (``http/security.py``). ``count_tokens`` runs the worker's
``Tokenize`` operation on the generation ``chat_call`` builds for the same prompt (messages, system,
the tools its tool_choice shows the model), so it equals that request's ``usage.input_tokens``.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lmi_core.http.anthropic_protocol import CountTokensRequest, MessagesRequest
from lmi_core.http.anthropic_render import MessageRender
from lmi_core.http.common import until_disconnected
from lmi_core.http.context import request_context
from lmi_core.http.openai_api import (
    chat_call,
    parse_body,
    read_images,
    run_call,
    unknown_fields,
    with_ignored,
)
from lmi_core.http.openai_render import named_sse
from lmi_core.operations import Tokenize


async def create_message(request: Request) -> Response:
    pool, adapter, body = await parse_body(request, MessagesRequest)
    translation = body.translate()
    ignored = unknown_fields(pool, body, translation.ignored)
    call = chat_call(pool, body.chat_request(translation)).with_adapter(adapter)
    call.dialect, call.prompt_field = "anthropic", "messages"
    render = MessageRender(body, call)
    framing = (lambda chunks: named_sse(render.events(chunks)), "text/event-stream")
    return with_ignored(await run_call(request, call, framing, render.result), ignored)


async def count_tokens(request: Request) -> Response:
    pool, adapter, body = await parse_body(request, CountTokensRequest)
    translation = body.translate()
    ignored = unknown_fields(pool, body, translation.ignored)
    call = chat_call(pool, body.chat_request(translation)).with_adapter(adapter)
    await read_images(call)  # an image's tokens are counted from its pixels, as its generation's are
    (generation,) = call.generations
    result = await until_disconnected(request, pool.perform(Tokenize(generation), request_context(request)))
    return with_ignored(JSONResponse({"input_tokens": len(result.ids)}), ignored)


routes = [
    Route("/v1/messages", create_message, methods=["POST"]),
    Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
]
