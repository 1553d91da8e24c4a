"""The OpenAI Responses API: ``POST /v1/responses``, ``GET /v1/responses/{id}``, ``POST .../cancel``.

Invariant: one core. A Responses request is translated onto a chat request (``responses_protocol``),
run by the chat path's ``chat_call``/``run_call`` (same pool, metrics, tool parsers, structured output),
and its chat result or chunks are rendered as a response or as events (``responses_render``). It is
stateless unless the model keeps responses (``option.responses_store=memory``, ``response_store``):
then a response (``store`` true, OpenAI's default) is kept, ``GET`` and ``cancel`` find it, and a
follow-up naming it in ``previous_response_id`` continues its conversation on the routing session of
its chain, so the pool sends it to the worker that holds its prefix (unless the client named its own
session). Without the store, ``previous_response_id`` is a 404 that says the store is off.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lmi_core.errors import BadRequestError, ServiceError
from lmi_core.http.common import ClientDisconnected, Stopped, stream_response
from lmi_core.http.context import request_context
from lmi_core.http.openai_api import chat_call, parse_body, run_call, unknown_fields, with_ignored
from lmi_core.http.openai_render import named_sse
from lmi_core.http.response_store import StoredResponse
from lmi_core.http.responses_protocol import ITEMS, ResponsesRequest, chat_messages
from lmi_core.http.responses_render import ResponseRender
from lmi_core.http.state import AppState

EVENT_STREAM = "text/event-stream"


def conversation_after(messages: list[dict[str, Any]], response: dict[str, Any]) -> list[dict[str, Any]]:
    """``messages`` followed by ``response``'s output as chat messages (the output items read back as
    input items: one translation for both)."""
    items = [ITEMS[item["type"]].model_validate(item) for item in response["output"]]
    return [*messages, *chat_messages(items)]


async def _stopped() -> AsyncGenerator[dict[str, Any], None]:
    """The chunks of a response cancelled before its first one."""
    raise Stopped()
    yield {}  # pragma: no cover - makes this an async generator


async def create_response(request: Request) -> Response:
    state: AppState = request.app.state.lmi
    pool, adapter, body = await parse_body(request, ResponsesRequest)
    translation = body.translate()
    ignored = unknown_fields(pool, body, translation.ignored)
    store = state.responses.of(pool.config)
    history: list[dict[str, Any]] = []
    session = None
    if body.previous_response_id is not None:
        previous = state.responses.previous(pool.config, body.previous_response_id)
        history, session = previous.messages, previous.session
    messages = [*history, *translation.messages]
    chat = body.chat_request(messages, translation.tools)
    call = chat_call(pool, chat, body.constraint()).with_adapter(adapter)
    call.prompt_field = "input"
    render = ResponseRender(body, call, translation.namespaces, stored=store is not None and body.store)
    entry = None
    if store is not None and body.store:
        entry = StoredResponse(render.response("in_progress", []), messages, session or render.id)
        store.put(render.id, entry)
        context = request_context(request)
        if context is not None and context.session_id is None:  # the chain's worker holds its prefix
            context.session_id = entry.session

        def keep(response: dict[str, Any]) -> None:
            entry.response = response
            entry.messages = conversation_after(messages, response)

        render.on_end = keep
    framing = (lambda chunks: named_sse(render.events(chunks)), EVENT_STREAM)
    try:
        response = await run_call(request, call, framing, render.result, entry.stop if entry else None)
    except Stopped:  # cancelled before its first token
        if body.stream:
            response = await stream_response(request, render.events(_stopped()), named_sse, EVENT_STREAM)
        else:
            cancelled = render.response("cancelled", [])
            render.on_end(cancelled)
            response = JSONResponse(cancelled)
    except (ServiceError, ClientDisconnected) as exc:
        if entry is not None:  # the stored response ended with the request
            error = {"code": str(exc.status), "message": str(exc)} if isinstance(exc, ServiceError) else None
            entry.response = render.response("failed" if error else "cancelled", [], error=error)
        raise
    return with_ignored(response, ignored)


def _stored(request: Request) -> StoredResponse:
    state: AppState = request.app.state.lmi
    return state.responses.find(request.path_params["response_id"], [m.config for m in state.server.served()])


async def retrieve_response(request: Request) -> Response:
    return JSONResponse(_stored(request).response)


async def cancel_response(request: Request) -> Response:
    """Stop a stored response that is running (at its next token); its status turns ``cancelled``."""
    entry = _stored(request)
    if not entry.running:
        name, status = request.path_params["response_id"][:80], entry.response.get("status")
        raise BadRequestError(
            f"response {name} is {status}: only a running response can be cancelled",
            param="response_id",
        )
    entry.stop.set()
    entry.response = {**entry.response, "status": "cancelled"}
    return JSONResponse(entry.response)


routes = [
    Route("/v1/responses", create_response, methods=["POST"]),
    Route("/v1/responses/{response_id}", retrieve_response, methods=["GET"]),
    Route("/v1/responses/{response_id}/cancel", cancel_response, methods=["POST"]),
]
