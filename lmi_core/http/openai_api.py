"""The OpenAI-compatible API: /v1/completions, /v1/chat/completions, /v1/models; chat on /invocations.

One request becomes one generation per choice (``n`` per prompt), run concurrently through the same
pool and metrics path as the native API. Responses are built by one set of renderers for both
endpoints, streamed or not: a streamed chunk is the same choice object holding one token. The
OpenAI endpoints stream server-sent events ending ``data: [DONE]`` and answer errors in OpenAI's
shape; chat on ``/invocations`` (DJL behaviour) streams JSON lines and keeps DJL's error shape.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lmi_core.engine import Finished, GenerationEvent, GenerationRequest, Token
from lmi_core.errors import BadRequestError, EngineError, ModelNotFoundError, ServiceError
from lmi_core.http.common import collect, read_json, stream_response, until_disconnected
from lmi_core.http.lmi_protocol import parse_model
from lmi_core.http.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    error_for_path,
    openai_error,
)
from lmi_core.http.routing import route_hint
from lmi_core.http.state import AppState, ServedModel
from lmi_core.pool import new_request_id

# Engine finish reasons -> OpenAI's.
FINISH_REASONS = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Chat without max_tokens runs until the model stops or its context is full (engines clamp to it).
UNLIMITED = 2**31 - 1

Handler = Callable[[Request], Awaitable[Response]]
OpenAIRequest = CompletionRequest | ChatCompletionRequest


@dataclass
class Call:
    """A parsed OpenAI request: its generations (choice ``i`` runs ``generations[i]``) and rendering."""

    pool: ServedModel
    chat: bool
    stream: bool
    n: int  # choices per prompt
    generations: list[GenerationRequest]
    echo: list[str]  # text shown before each choice's output (completions ``echo``)
    logprobs: int | None  # top alternatives per token; None: no logprobs at all
    include_usage: bool
    id: str = field(init=False)
    created: int = field(init=False, default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    @property
    def prompt_param(self) -> str:
        return "messages" if self.chat else "prompt"

    def envelope(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.pool.name}


def completion_call(pool: ServedModel, body: CompletionRequest) -> Call:
    body.check_supported()
    max_tokens = body.max_tokens or COMPLETION_MAX_TOKENS
    generations = [
        GenerationRequest(new_request_id(), prompt=prompt, params=body.sampling(max_tokens, body.logprobs, i))
        for prompt in body.prompts
        for i in range(body.n)
    ]
    echo = [(g.prompt or "") if body.echo else "" for g in generations]
    return Call(pool, False, body.stream, body.n, generations, echo, body.logprobs, body.include_usage)


def chat_call(pool: ServedModel, body: ChatCompletionRequest) -> Call:
    body.check_supported()
    messages = [m.for_template() for m in body.messages]
    max_tokens = body.token_limit or UNLIMITED
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    generations = [
        GenerationRequest(new_request_id(), messages=messages, params=body.sampling(max_tokens, logprobs, i))
        for i in range(body.n)
    ]
    return Call(pool, True, body.stream, body.n, generations, [""] * body.n, logprobs, body.include_usage)


# -- rendering -----------------------------------------------------------------------------------


def _chat_logprobs(tokens: list[Token]) -> dict[str, Any]:
    def entry(text: str, log_prob: float) -> dict[str, Any]:
        return {"token": text, "logprob": log_prob, "bytes": list(text.encode())}

    return {
        "content": [
            {**entry(t.text, t.log_prob), "top_logprobs": [entry(s, lp) for _, s, lp in t.top_logprobs or []]}
            for t in tokens
        ]
    }


def _completion_logprobs(tokens: list[Token], offset: int) -> dict[str, Any]:
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.log_prob for t in tokens],
        "top_logprobs": [{s: lp for _, s, lp in t.top_logprobs or []} for t in tokens],
        "text_offset": offsets,
    }


def _choice(
    call: Call, index: int, text: str, tokens: list[Token], finish: str | None, offset: int, delta: bool
) -> dict[str, Any]:
    """One choice: a whole result, or (``delta``) a streamed piece of one."""
    logprobs = None
    if call.logprobs is not None and tokens:
        logprobs = _chat_logprobs(tokens) if call.chat else _completion_logprobs(tokens, offset)
    if not call.chat:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
    if delta:
        return {"index": index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": finish}
    message = {"role": "assistant", "content": text}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def _usage(call: Call, finished: dict[int, Finished]) -> dict[str, int]:
    # The n choices of one prompt share it: count its tokens once.
    prompt = sum(f.prompt_tokens for i, f in finished.items() if i % call.n == 0)
    completion = sum(f.generated_tokens for f in finished.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish_reason(event: Finished) -> str:
    return FINISH_REASONS.get(event.finish_reason, event.finish_reason)


def render_result(call: Call, results: list[list[GenerationEvent]]) -> dict[str, Any]:
    """The non-streamed response object."""
    choices, finished = [], {}
    for index, events in enumerate(results):
        tokens = [e for e in events if isinstance(e, Token)]
        done = next(e for e in events if isinstance(e, Finished))
        finished[index] = done
        text = call.echo[index] + "".join(t.text for t in tokens)
        choices.append(_choice(call, index, text, tokens, _finish_reason(done), len(call.echo[index]), False))
    return {**call.envelope(chunk=False), "choices": choices, "usage": _usage(call, finished)}


async def render_chunks(
    call: Call, events: AsyncIterator[tuple[int, GenerationEvent]]
) -> AsyncIterator[dict[str, Any]]:
    """The streamed chunk objects: per token, then per choice its finish, then (if asked) the usage."""
    usage: dict[str, Any] = {"usage": None} if call.include_usage else {}

    def chunk(choice: dict[str, Any]) -> dict[str, Any]:
        return {**call.envelope(chunk=True), "choices": [choice], **usage}

    offsets = [len(text) for text in call.echo]
    finished: dict[int, Finished] = {}
    for index, text in enumerate(call.echo):
        if call.chat:  # OpenAI opens each chat choice with the assistant's role
            opening = _choice(call, index, "", [], None, 0, True)
            yield chunk({**opening, "delta": {"role": "assistant", "content": ""}})
        elif text:
            yield chunk(_choice(call, index, text, [], None, 0, True))
    try:
        async for index, event in events:
            if isinstance(event, Token):
                yield chunk(_choice(call, index, event.text, [event], None, offsets[index], True))
                offsets[index] += len(event.text)
            else:
                finished[index] = event
                yield chunk(_choice(call, index, "", [], _finish_reason(event), offsets[index], True))
    except ServiceError as exc:
        yield openai_error(exc)  # headers are sent: the error becomes the last chunk
        return
    if call.include_usage:
        yield {**call.envelope(chunk=True), "choices": [], "usage": _usage(call, finished)}


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


async def sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    async for obj in chunks:
        yield b"data: " + _json(obj) + b"\n\n"
    yield b"data: [DONE]\n\n"


async def jsonlines(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    async for obj in chunks:
        yield _json(obj) + b"\n"


Framing = tuple[Callable[[AsyncIterator[dict[str, Any]]], AsyncIterator[bytes]], str]
SSE: Framing = (sse, "text/event-stream")
JSON_LINES: Framing = (jsonlines, "application/jsonlines")


# -- running -------------------------------------------------------------------------------------

_END = object()


async def merge(streams: list[AsyncIterator[GenerationEvent]]) -> AsyncIterator[tuple[int, GenerationEvent]]:
    """The events of every stream as they come, tagged with the stream's index; closing it (or a
    failure of one stream) closes them all, which cancels their generations."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[GenerationEvent]) -> None:
        try:
            async for event in stream:
                queue.put_nowait((index, event))
        except Exception as exc:
            queue.put_nowait((index, exc))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
            queue.put_nowait((index, _END))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is _END:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)


async def run_call(request: Request, call: Call, route: str, framing: Framing) -> Response:
    """Run ``call``'s generations; stream them in ``framing`` or answer once."""
    state: AppState = request.app.state.lmi
    hint = route_hint(request)
    streams = [state.instrument(call.pool, g, route, hint) for g in call.generations]
    try:
        if call.stream:
            frame, media_type = framing
            events = merge(streams)
            return await stream_response(request, events, lambda e: frame(render_chunks(call, e)), media_type)
        results: list[list[GenerationEvent]] = [[] for _ in streams]
        for index, event in await until_disconnected(request, collect(merge(streams))):
            results[index].append(event)
        return JSONResponse(render_result(call, results))
    except EngineError as exc:
        if exc.param == "inputs":  # the engine's name for the prompt
            exc.param = call.prompt_param
        raise


# -- handlers ------------------------------------------------------------------------------------


def openai_errors(handler: Handler) -> Handler:
    """Answer a failed request in OpenAI's error shape (with ``Retry-After`` on a full queue)."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ServiceError as exc:
            return error_for_path(request.url.path, exc)

    return wrapped


async def _body(request: Request, kind: type[OpenAIRequest]) -> tuple[ServedModel, Any]:
    """The parsed body and the model it names (404 if unknown; the only model if it names none)."""
    state: AppState = request.app.state.lmi
    body = parse_model(kind, await read_json(request, state.config.max_request_size))
    if body.model is None:
        if len(state.server.served()) != 1:
            raise BadRequestError("model is required: this server has several models", param="model")
        return state.server.default(), body
    try:
        return state.server.get(body.model), body
    except ModelNotFoundError as exc:
        exc.param = "model"
        raise


@openai_errors
async def completions(request: Request) -> Response:
    pool, body = await _body(request, CompletionRequest)
    return await run_call(request, completion_call(pool, body), "/v1/completions", SSE)


@openai_errors
async def chat_completions(request: Request) -> Response:
    pool, body = await _body(request, ChatCompletionRequest)
    return await run_call(request, chat_call(pool, body), "/v1/chat/completions", SSE)


async def native_chat(request: Request, pool: ServedModel, body: dict[str, Any]) -> Response:
    """A body with ``messages`` on the native API: the chat completion schema, streamed as JSON lines."""
    chat = parse_model(ChatCompletionRequest, body)
    return await run_call(request, chat_call(pool, chat), "/invocations", JSON_LINES)


def _model_card(pool: ServedModel) -> dict[str, Any]:
    return {"id": pool.name, "object": "model", "created": int(pool.loaded_at), "owned_by": "lmi-core"}


@openai_errors
async def list_models(request: Request) -> Response:
    state: AppState = request.app.state.lmi
    return JSONResponse({"object": "list", "data": [_model_card(p) for p in state.server.served()]})


@openai_errors
async def retrieve_model(request: Request) -> Response:
    state: AppState = request.app.state.lmi
    return JSONResponse(_model_card(state.server.get(request.path_params["model"])))


routes = [
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
]
