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
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lmi_core.engine import (
    Finished,
    GenerationEvent,
    GenerationRequest,
    LoraAdapter,
    PromptLogprob,
    StructuredOutput,
    Token,
)
from lmi_core.errors import BadRequestError, EngineError, ServiceError
from lmi_core.http.adapters import header_adapter, model_or_adapter
from lmi_core.http.common import collect, read_json, stream_response, until_disconnected
from lmi_core.http.lmi_protocol import parse_model
from lmi_core.http.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    error_for_path,
    ignored_fields,
    openai_error,
)
from lmi_core.http.routing import route_hint
from lmi_core.http.state import AppState, ServedModel
from lmi_core.http.structured import check
from lmi_core.http.tool_calls import ToolPlan, ToolStream
from lmi_core.http.tool_parsers import ParserFactory, parser_registry
from lmi_core.plugins import get_plugin_manager
from lmi_core.serving.pool import new_request_id

logger = logging.getLogger(__name__)

IGNORED_FIELDS_HEADER = "x-lmi-ignored-fields"
_logged_fields: set[str] = set()  # ignored field names already logged (once each per process)
# Bounds against bodies made of unique keys: the log set and the header stay small.
MAX_LOGGED_FIELDS = 1000
MAX_HEADER_CHARS = 2000

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
    continuous_usage: bool = False  # usage so far on every streamed chunk (vLLM)
    # echo: the prompt's text and (with logprobs) its tokens come before the output.
    echo_prompt: bool = False
    prompt_logprobs: bool = False  # vLLM's prompt_logprobs: shown apart from the output's
    # The output constraint of every generation and the request field that set it.
    constraint: tuple[StructuredOutput, str] | None = None
    tools: ToolPlan | None = None  # chat with tools: how the output becomes tool calls
    adapter: LoraAdapter | None = None  # the LoRA adapter every generation runs with
    id: str = field(init=False)
    created: int = field(init=False, default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    @property
    def prompt_param(self) -> str:
        return "messages" if self.chat else "prompt"

    def envelope(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        model = self.adapter.name if self.adapter is not None else self.pool.name  # vLLM names the adapter
        return {"id": self.id, "object": kind, "created": self.created, "model": model}

    def with_adapter(self, adapter: LoraAdapter | None) -> Call:
        """This call with every generation on ``adapter`` (None: the base model)."""
        self.adapter = adapter
        for generation in self.generations:
            generation.adapter = adapter
        return self


def completion_call(pool: ServedModel, body: CompletionRequest) -> Call:
    body.check_supported()
    max_tokens = COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    if body.stream and body.echo and any(not isinstance(p, str) for p in body.prompts):
        # The streamed echo is written before the engine has decoded the ids.
        raise BadRequestError("streaming echo needs text prompts, not token ids", param="echo")
    # echo with logprobs scores the prompt too (vLLM: prompt_logprobs defaults to logprobs).
    scored = body.logprobs if body.echo else None
    generations = [
        GenerationRequest(
            new_request_id(),
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_ids=None if isinstance(prompt, str) else prompt,
            params=body.sampling(max_tokens, body.logprobs, i, prompt_logprobs=scored),
        )
        for prompt in body.prompts
        for i in range(body.n)
    ]
    echo = [(g.prompt or "") if body.echo else "" for g in generations]
    call = Call(
        pool,
        False,
        body.stream,
        body.n,
        generations,
        echo,
        body.logprobs,
        body.include_usage,
        continuous_usage=body.include_usage and body.continuous_usage,
        echo_prompt=body.echo,
        prompt_logprobs=body.prompt_logprobs is not None,
    )
    return constrain(call, body.constraint())


def chat_call(pool: ServedModel, body: ChatCompletionRequest) -> Call:
    body.check_supported()
    messages = [m.for_template() for m in body.messages]
    limit = body.token_limit
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    generations = [
        GenerationRequest(
            new_request_id(),
            messages=messages,
            params=body.sampling(limit or UNLIMITED, logprobs, i, strict_max_tokens=limit is not None),
        )
        for i in range(body.n)
    ]
    call = Call(
        pool,
        True,
        body.stream,
        body.n,
        generations,
        [""] * body.n,
        logprobs,
        body.include_usage,
        continuous_usage=body.include_usage and body.continuous_usage,
        prompt_logprobs=body.prompt_logprobs is not None,
    )
    constraint = body.constraint()
    call.tools = body.tool_plan(tool_parsers(), pool.config.options)
    if call.tools is not None:
        for generation in generations:
            generation.tools = call.tools.template_tools
        if call.tools.constraint is not None:
            if constraint is not None:
                message = f"tool_choice {call.tools.mode} constrains the output: it excludes {constraint[1]}"
                raise BadRequestError(message, param=constraint[1])
            constraint = (call.tools.constraint, "tools")
    return constrain(call, constraint)


@functools.cache
def tool_parsers() -> dict[str, ParserFactory]:
    """The built-in tool-call parsers and the plugins' (``register_tool_parsers``)."""
    return parser_registry(get_plugin_manager().hook.register_tool_parsers())


def constrain(call: Call, constraint: tuple[StructuredOutput, str] | None) -> Call:
    """``call`` with ``constraint`` on each of its generations."""
    call.constraint = constraint
    for generation in call.generations:
        generation.params.structured = constraint[0] if constraint else None
    return call


# -- rendering -----------------------------------------------------------------------------------


def _chat_logprobs(tokens: list[Token]) -> dict[str, Any]:
    def entry(text: str, log_prob: float | None) -> dict[str, Any]:
        return {"token": text, "logprob": log_prob, "bytes": list(text.encode())}

    return {
        "content": [
            {**entry(t.text, t.log_prob), "top_logprobs": [entry(s, lp) for _, s, lp in t.top_logprobs or []]}
            for t in tokens
        ]
    }


# One position of a completions ``logprobs`` object: (text, log-prob, alternatives {text: log-prob}).
Position = tuple[str, float | None, dict[str, float] | None]


def _token_position(token: Token) -> Position:
    # vLLM's shape: the chosen token first, then the alternatives (so logprobs=0 still shows it).
    top = {token.text: token.log_prob} if token.log_prob is not None else {}
    top.update({s: lp for _, s, lp in token.top_logprobs or []})
    return token.text, token.log_prob, top


def _prompt_position(entry: PromptLogprob) -> Position:
    _, text, log_prob, _, alternatives = entry
    if log_prob is None:  # the first prompt token: nothing to condition on
        return text, None, None
    top = {text: log_prob}
    top.update({s: lp for _, s, lp in alternatives})
    return text, log_prob, top


def _completion_logprobs(positions: list[Position], offset: int) -> dict[str, Any]:
    offsets = []
    for text, _, _ in positions:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": [p[0] for p in positions],
        "token_logprobs": [p[1] for p in positions],
        "top_logprobs": [p[2] for p in positions],
        "text_offset": offsets,
    }


def _vllm_prompt_logprobs(entries: list[PromptLogprob] | None) -> list[dict[str, Any] | None] | None:
    """vLLM's ``prompt_logprobs``: per prompt token None (the first) or {token id: Logprob}."""
    if entries is None:
        return None
    out: list[dict[str, Any] | None] = []
    for token, text, log_prob, rank, alternatives in entries:
        if log_prob is None:
            out.append(None)
            continue
        position = {str(token): {"logprob": log_prob, "rank": rank, "decoded_token": text}}
        for r, (alt, alt_text, alt_lp) in enumerate(alternatives, start=1):
            position.setdefault(str(alt), {"logprob": alt_lp, "rank": r, "decoded_token": alt_text})
        out.append(position)
    return out


def _choice(
    call: Call,
    index: int,
    text: str,
    tokens: list[Token],
    finish: str | None,
    offset: int,
    delta: bool,
    prompt: list[PromptLogprob] | None = None,
) -> dict[str, Any]:
    """One choice: a whole result, or (``delta``) a streamed piece of one; ``prompt``: the echoed
    prompt's tokens, before the output's."""
    logprobs = None
    if call.logprobs is not None and (tokens or prompt):
        if call.chat:
            logprobs = _chat_logprobs(tokens)
        else:
            positions = [_prompt_position(e) for e in prompt or []] + [_token_position(t) for t in tokens]
            logprobs = _completion_logprobs(positions, 0 if prompt else offset)
    if not call.chat:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
    if delta:
        return {"index": index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": finish}
    message = {"role": "assistant", "content": text}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def _running_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


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
    prompt_logprobs = None
    for index, events in enumerate(results):
        tokens = [e for e in events if isinstance(e, Token)]
        done = next(e for e in events if isinstance(e, Finished))
        finished[index] = done
        # The engine's prompt text: a token-id prompt is decoded there.
        echo = done.prompt if call.echo_prompt else ""
        scored = done.prompt_logprobs if call.echo_prompt else None
        text = echo + "".join(t.text for t in tokens)
        choice = _choice(call, index, text, tokens, _finish_reason(done), len(echo), False, scored)
        if call.prompt_logprobs:
            prompt_logprobs = _vllm_prompt_logprobs(done.prompt_logprobs)
            if not call.chat:  # vLLM: per choice for completions, once per response for chat
                choice["prompt_logprobs"] = prompt_logprobs
        if call.tools is not None:  # the same parser as the stream: its calls equal the streamed ones
            stream = ToolStream(call.tools)
            stream.feed(text)
            stream.finish()
            choice["message"] = stream.message()
            choice["finish_reason"] = call.tools.finish_reason(_finish_reason(done), stream.has_calls)
        choices.append(choice)
    result = {**call.envelope(chunk=False), "choices": choices, "usage": _usage(call, finished)}
    if call.chat and call.prompt_logprobs:
        result["prompt_logprobs"] = prompt_logprobs
    return result


async def render_chunks(
    call: Call, events: AsyncGenerator[tuple[int, GenerationEvent], None]
) -> AsyncGenerator[dict[str, Any], None]:
    """The streamed chunk objects: per token, then per choice its finish, then (if asked) the usage."""
    usage: dict[str, Any] = {"usage": None} if call.include_usage else {}
    prompt_tokens = [0] * len(call.generations)
    generated = [0] * len(call.generations)

    def chunk(choice: dict[str, Any]) -> dict[str, Any]:
        if call.continuous_usage:
            i = choice["index"]
            return {
                **call.envelope(chunk=True),
                "choices": [choice],
                "usage": _running_usage(prompt_tokens[i], generated[i]),
            }
        return {**call.envelope(chunk=True), "choices": [choice], **usage}

    offsets = [len(text) for text in call.echo]
    finished: dict[int, Finished] = {}
    plan = call.tools
    tools = [ToolStream(plan) for _ in call.echo] if plan is not None else None
    for index, text in enumerate(call.echo):
        if call.chat:  # OpenAI opens each chat choice with the assistant's role
            opening = _choice(call, index, "", [], None, 0, True)
            yield chunk({**opening, "delta": {"role": "assistant", "content": ""}})
        elif text:
            yield chunk(_choice(call, index, text, [], None, 0, True))
    try:
        async for index, event in events:
            if tools is not None:  # tool calls: content and tool_calls deltas, as the parser finds them
                deltas = tools[index].feed(event.text) if isinstance(event, Token) else tools[index].finish()
                for delta in deltas:
                    yield chunk({"index": index, "delta": delta, "logprobs": None, "finish_reason": None})
                if isinstance(event, Finished):
                    finished[index] = event
                    reason = tools[index].plan.finish_reason(_finish_reason(event), tools[index].has_calls)
                    yield chunk({"index": index, "delta": {}, "logprobs": None, "finish_reason": reason})
            elif isinstance(event, Token):
                if event.prompt_tokens is not None:
                    prompt_tokens[index] = event.prompt_tokens
                generated[index] += 1
                yield chunk(_choice(call, index, event.text, [event], None, offsets[index], True))
                offsets[index] += len(event.text)
            else:
                finished[index] = event
                prompt_tokens[index] = event.prompt_tokens
                yield chunk(_choice(call, index, "", [], _finish_reason(event), offsets[index], True))
    except ServiceError as exc:
        yield openai_error(exc)  # headers are sent: the error becomes the last chunk
        return
    if call.include_usage:
        yield {**call.envelope(chunk=True), "choices": [], "usage": _usage(call, finished)}


def _json(obj: dict[str, Any]) -> bytes:
    # orjson: one chunk per token or batch is the server's hottest path; json.dumps + encode costs
    # ~15x as much per chunk (measured 16 vs 1.1 µs for a chat chunk on the shared 2-core machine).
    return orjson.dumps(obj)


async def sse(chunks: AsyncGenerator[dict[str, Any], None]) -> AsyncGenerator[bytes, None]:
    async for obj in chunks:
        yield b"data: " + _json(obj) + b"\n\n"
    yield b"data: [DONE]\n\n"


async def jsonlines(chunks: AsyncGenerator[dict[str, Any], None]) -> AsyncGenerator[bytes, None]:
    async for obj in chunks:
        yield _json(obj) + b"\n"


Framing = tuple[Callable[[AsyncGenerator[dict[str, Any], None]], AsyncGenerator[bytes, None]], str]
SSE: Framing = (sse, "text/event-stream")
JSON_LINES: Framing = (jsonlines, "application/jsonlines")


# -- running -------------------------------------------------------------------------------------

_END = object()


async def merge(
    streams: list[AsyncGenerator[GenerationEvent, None]],
) -> AsyncGenerator[tuple[int, GenerationEvent], None]:
    """The events of every stream as they come, tagged with the stream's index; closing it (or a
    failure of one stream) closes them all, which cancels their generations."""
    if len(streams) == 1:  # n=1, nearly every request: no task and no queue hop per token
        (stream,) = streams
        try:
            async for event in stream:
                yield 0, event
        finally:
            await stream.aclose()
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[GenerationEvent, None]) -> None:
        try:
            async for event in stream:
                queue.put_nowait((index, event))
        except Exception as exc:
            queue.put_nowait((index, exc))
        finally:
            await stream.aclose()
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
    if call.constraint is not None:
        await check(*call.constraint)
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


def unknown_fields(pool: ServedModel, body: OpenAIRequest) -> list[str]:
    """The fields of ``body`` this server does not know: a 400 naming the first for a model with
    ``option.strict_request_fields``, else ignored (each name logged once) and returned for the header.

    Names are escaped to printable ASCII (a header is latin-1 without control characters; a JSON
    key may be anything, "\\r" included)."""
    names = [name.encode("unicode_escape").decode("ascii") for name in ignored_fields(body)]
    if names and pool.config.strict_request_fields:
        raise BadRequestError(f"invalid request field '{names[0]}': unknown field", param=names[0])
    for name in names:
        if name not in _logged_fields and len(_logged_fields) < MAX_LOGGED_FIELDS:
            _logged_fields.add(name)
            logger.info("ignoring unknown request field %s (logged once)", name)
    return names


def with_ignored(response: Response, names: list[str]) -> Response:
    if names:
        listed = ",".join(names)
        if len(listed) > MAX_HEADER_CHARS:
            listed = listed[:MAX_HEADER_CHARS] + ",..."
        response.headers[IGNORED_FIELDS_HEADER] = listed
    return response


async def _body(request: Request, kind: type[OpenAIRequest]) -> tuple[ServedModel, LoraAdapter | None, Any]:
    """The parsed body, the model it names (404 if unknown; the only model if it names none) and the
    LoRA adapter (``model`` naming an adapter, or SageMaker's header)."""
    state: AppState = request.app.state.lmi
    body = parse_model(kind, await read_json(request, state.config.max_request_size, allow_text=False))
    if body.model is None:
        if len(state.server.served()) != 1:
            raise BadRequestError("model is required: this server has several models", param="model")
        pool = state.server.default()
        return pool, header_adapter(request, pool), body
    pool, adapter = model_or_adapter(request, body.model)
    return pool, adapter, body


@openai_errors
async def completions(request: Request) -> Response:
    pool, adapter, body = await _body(request, CompletionRequest)
    ignored = unknown_fields(pool, body)
    call = completion_call(pool, body).with_adapter(adapter)
    return with_ignored(await run_call(request, call, "/v1/completions", SSE), ignored)


@openai_errors
async def chat_completions(request: Request) -> Response:
    pool, adapter, body = await _body(request, ChatCompletionRequest)
    ignored = unknown_fields(pool, body)
    call = chat_call(pool, body).with_adapter(adapter)
    return with_ignored(await run_call(request, call, "/v1/chat/completions", SSE), ignored)


async def native_chat(
    request: Request, pool: ServedModel, body: dict[str, Any], adapter: LoraAdapter | None = None
) -> Response:
    """A body with ``messages`` on the native API: the chat completion schema, streamed as JSON lines."""
    chat = parse_model(ChatCompletionRequest, body)
    ignored = unknown_fields(pool, chat)
    call = chat_call(pool, chat).with_adapter(adapter)
    return with_ignored(await run_call(request, call, "/invocations", JSON_LINES), ignored)


def _model_card(pool: ServedModel, adapter: LoraAdapter | None = None) -> dict[str, Any]:
    # vLLM's card: root is what the name serves (the adapter's path), parent the base of an adapter.
    return {
        "id": adapter.name if adapter is not None else pool.name,
        "object": "model",
        "created": int(pool.loaded_at),
        "owned_by": "lmi-core",
        "root": adapter.path if adapter is not None else pool.config.model_id,
        "parent": pool.name if adapter is not None else None,
        "max_model_len": pool.max_model_len,
    }


def _cards(pool: ServedModel) -> list[dict[str, Any]]:
    """The model's card, then one per registered adapter."""
    adapters = pool.adapters.entries() if pool.adapters is not None else []
    return [_model_card(pool), *(_model_card(pool, entry.lora) for entry in adapters)]


@openai_errors
async def list_models(request: Request) -> Response:
    state: AppState = request.app.state.lmi
    return JSONResponse({"object": "list", "data": [c for p in state.server.served() for c in _cards(p)]})


@openai_errors
async def retrieve_model(request: Request) -> Response:
    name = request.path_params["model"]
    pool, adapter = model_or_adapter(request, name)
    return JSONResponse(_model_card(pool, adapter if adapter is not None and adapter.name == name else None))


routes = [
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
]
