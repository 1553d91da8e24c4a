"""Anthropic's Messages API: ``POST /v1/messages`` (Claude Code's only API).

Invariant: one core. A Messages request is translated onto a chat request (``anthropic_protocol``),
run by the chat path's ``chat_call``/``run_call``, and its chat result or chunks are rendered as an
Anthropic message or events (``anthropic_render``). Errors answer in Anthropic's envelope (the
``anthropic`` dialect of ``http/errors.py``, picked by path, in-stream errors included). Claude Code's
``?beta=true`` query and the ``anthropic-version``/``anthropic-beta`` headers are accepted and change
nothing; ``x-api-key`` carries the API key (``http/security.py``).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from lmi_core.http.anthropic_protocol import MessagesRequest
from lmi_core.http.anthropic_render import MessageRender
from lmi_core.http.openai_api import chat_call, parse_body, run_call, unknown_fields, with_ignored
from lmi_core.http.openai_render import named_sse


async def create_message(request: Request) -> Response:
    pool, adapter, body = await parse_body(request, MessagesRequest)
    translation = body.translate()
    ignored = unknown_fields(pool, body, translation.ignored)
    call = chat_call(pool, body.chat_request(translation)).with_adapter(adapter)
    call.dialect, call.prompt_field = "anthropic", "messages"
    render = MessageRender(body, call)
    framing = (lambda chunks: named_sse(render.events(chunks)), "text/event-stream")
    return with_ignored(await run_call(request, call, framing, render.result), ignored)


routes = [Route("/v1/messages", create_message, methods=["POST"])]
