"""The OpenAI-compatible API: /v1/completions, /v1/chat/completions, /v1/models; chat on /invocations.

One request becomes a ``Call``: one generation per choice (``n`` per prompt), run concurrently
through the same pool and metrics path as the native API, and rendered by ``openai_render``. The
OpenAI endpoints stream server-sent events ending ``data: [DONE]`` and answer errors in OpenAI's
shape; chat on ``/invocations`` (DJL behaviour) streams JSON lines and keeps DJL's error shape.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lmi_core.engine import GenerationEvent, GenerationRequest, LoraAdapter, StructuredOutput
from lmi_core.errors import BadRequestError, ServiceError
from lmi_core.http import errors
from lmi_core.http.adapters import model_or_adapter
from lmi_core.http.common import (
    collect_each,
    merge,
    new_request_id,
    read_json,
    stream_response,
    until_disconnected,
    until_set,
)
from lmi_core.http.context import keep_alive, request_context
from lmi_core.http.formatters import OutputFormatter
from lmi_core.http.lmi_protocol import KeepAliveField, parse_model
from lmi_core.http.media import ImageRef, check_url, load_images
from lmi_core.http.openai_protocol import ChatCompletionRequest, CompletionRequest, ignored_fields
from lmi_core.http.openai_render import JSON_LINES, SSE, Call, Framing, render_chunks, render_result
from lmi_core.http.state import AppState, ServedModel
from lmi_core.http.structured import check
from lmi_core.http.tool_parsers import ParserFactory, parser_registry
from lmi_core.option_values import allowed_media_domains
from lmi_core.plugins import get_plugin_manager
from lmi_core.reasoning import ReasoningParserFactory, model_parser
from lmi_core.reasoning import parser_registry as reasoning_registry

logger = logging.getLogger(__name__)

IGNORED_FIELDS_HEADER = "x-lmi-ignored-fields"
_logged_fields: set[str] = set()  # ignored field names already logged (once each per process)
# Bounds against bodies made of unique keys: the log set and the header stay small.
MAX_LOGGED_FIELDS = 1000
MAX_HEADER_CHARS = 2000

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Chat without max_tokens runs until the model stops or its context is full (engines clamp to it).
UNLIMITED = 2**31 - 1

Body = TypeVar("Body", bound=BaseModel)


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
            priority=body.priority,
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


def chat_call(
    pool: ServedModel,
    body: ChatCompletionRequest,
    constraint: tuple[StructuredOutput, str] | None = None,
    image_params: Sequence[str] = (),
) -> Call:
    """The chat request's call; ``constraint``: its output constraint where the request's own API
    names it (the Responses API's ``text.format``), else the chat body's; ``image_params``: the
    names of the last images in the request's own API (the Responses API's ``input.0.content.1...``)."""
    body.check_supported()
    messages = [m.for_template() for m in body.messages]
    limit = body.token_limit
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    template_kwargs = body.template_kwargs(pool.config.options)
    generations = [
        GenerationRequest(
            new_request_id(),
            messages=messages,
            params=body.sampling(limit or UNLIMITED, logprobs, i, strict_max_tokens=limit is not None),
            priority=body.priority,
            chat_template_kwargs=template_kwargs or None,
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
    call.images = image_parts(pool, body.images, image_params)
    constraint = constraint or body.constraint()
    call.tools = body.tool_plan(tool_parsers(), pool.config.options)
    if call.tools is not None:
        for generation in generations:
            generation.tools = call.tools.template_tools
        if call.tools.constraint is not None:
            if constraint is not None:
                message = f"tool_choice {call.tools.mode} constrains the output: it excludes {constraint[1]}"
                raise BadRequestError(message, param=constraint[1])
            constraint = (call.tools.constraint, "tools")
    factory = model_parser(pool.config.options, reasoning_parsers())
    thinking = factory(template_kwargs) if factory is not None else None
    if factory is not None and thinking is not None:  # this request's output begins with thinking
        call.reasoning = functools.partial(factory, template_kwargs)
        call.include_reasoning = body.include_reasoning
        if constraint is not None:  # the answer is constrained, the thinking before it is free
            constraint = (dataclasses.replace(constraint[0], starts_after=thinking.end), constraint[1])
    return constrain(call, constraint)


def image_parts(pool: ServedModel, images: list[ImageRef], params: Sequence[str] = ()) -> list[ImageRef]:
    """A request's image parts (the last ones named ``params``), within what the model reads
    (``ImageEngine.max_images``); else a 400 naming the first part too many, before any is read. A
    model not loaded yet (on demand) has not said: its engine checks them."""
    first = len(images) - len(params)
    images[first:] = [
        dataclasses.replace(ref, param=p) for ref, p in zip(images[first:], params, strict=True)
    ]
    for ref in images:
        check_url(ref)
    limit = pool.max_images
    if limit is not None and len(images) > limit:
        extra = images[limit]
        if limit == 0:
            raise BadRequestError(
                f"model {pool.name!r} reads no images (a text-only model)", param=extra.param
            )
        most = f"at most {limit} images per prompt (option.limit_mm_per_prompt)"
        raise BadRequestError(f"model {pool.name!r} reads {most}", param=extra.param)
    return images


async def read_images(call: Call) -> None:
    """The call's image parts, read (fetched, decoded) onto its generations before anything is queued:
    a bad image is a 400 naming its part."""
    if call.images:
        images = await load_images(call.images, allowed_media_domains(call.pool.config.options))
        for generation in call.generations:
            generation.images = images


@functools.cache
def tool_parsers() -> dict[str, ParserFactory]:
    """The built-in tool-call parsers and the plugins' (``register_tool_parsers``)."""
    return parser_registry(get_plugin_manager().hook.register_tool_parsers())


@functools.cache
def reasoning_parsers() -> dict[str, ReasoningParserFactory]:
    """The built-in reasoning parsers and the plugins' (``register_reasoning_parsers``)."""
    return reasoning_registry(get_plugin_manager().hook.register_reasoning_parsers())


def constrain(call: Call, constraint: tuple[StructuredOutput, str] | None) -> Call:
    """``call`` with ``constraint`` on each of its generations."""
    call.constraint = constraint
    for generation in call.generations:
        generation.params.structured = constraint[0] if constraint else None
    return call


# -- running -------------------------------------------------------------------------------------


Shape = Callable[[dict[str, Any]], dict[str, Any]]


def _same(result: dict[str, Any]) -> dict[str, Any]:
    return result


async def run_call(
    request: Request,
    call: Call,
    framing: Framing,
    shape: Shape = _same,
    stop: asyncio.Event | None = None,
    output: OutputFormatter | None = None,
) -> Response:
    """Run ``call``'s generations; stream them in ``framing`` or answer once, the chat result in the
    request's API's ``shape``. ``stop`` set ends the generations at their next event (``Stopped``).
    Each response object goes through the model's custom ``output`` formatter when it has one (the
    native API)."""
    state: AppState = request.app.state.lmi
    if call.constraint is not None:
        await check(*call.constraint)
    await read_images(call)
    context = request_context(request)
    streams = [state.instrument(call.pool, g, context) for g in call.generations]
    events = merge(streams) if stop is None else until_set(merge(streams), stop)
    try:
        if call.stream:
            frame, media_type = framing

            def render(
                merged: AsyncGenerator[tuple[int, GenerationEvent], None],
            ) -> AsyncGenerator[bytes, None]:
                chunks = render_chunks(call, merged)
                if output is not None:
                    chunks = output.each(chunks, lambda exc: errors.body(exc, call.dialect))
                return frame(chunks)

            return await stream_response(request, events, render, media_type)
        results = await until_disconnected(request, collect_each(events, len(streams)))
        result = shape(render_result(call, results))
        return JSONResponse(await output(result) if output is not None else result)
    except ServiceError as exc:
        if exc.param == "inputs":  # the LMI API's name for the prompt, which engines and the pool use
            exc.param = call.prompt_param
        raise


# -- handlers ------------------------------------------------------------------------------------


def unknown_fields(pool: ServedModel, body: BaseModel, dropped: Sequence[str] = ()) -> list[str]:
    """The fields of ``body`` this server does not know: a 400 naming the first for a model with
    ``option.strict_request_fields``, else ignored (each name logged once) and returned for the header.

    ``dropped``: known fields the request's API translates away (the Responses API's hosted tools)
    and that count as ignored too. Names are escaped to printable ASCII (a header is latin-1 without
    control characters; a JSON key may be anything, "\\r" included)."""
    found = [*ignored_fields(body), *dropped]
    names = [name.encode("unicode_escape").decode("ascii") for name in found]
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


async def parse_body(request: Request, kind: type[Body]) -> tuple[ServedModel, LoraAdapter | None, Body]:
    """The parsed body, the model it names (404 if unknown; the only model if it names none) and the
    LoRA adapter (``model`` naming an adapter, or SageMaker's header). A body's ``keep_alive`` goes
    into the request's context."""
    state: AppState = request.app.state.lmi
    body: Body = parse_model(kind, await read_json(request, state.config.max_request_size, allow_text=False))
    pool, adapter = model_or_adapter(request, getattr(body, "model", None))  # every API names it there
    if isinstance(body, KeepAliveField):
        keep_alive(request, body.keep_alive_seconds)
    return pool, adapter, body


async def completions(request: Request) -> Response:
    pool, adapter, body = await parse_body(request, CompletionRequest)
    ignored = unknown_fields(pool, body)
    call = completion_call(pool, body).with_adapter(adapter)
    return with_ignored(await run_call(request, call, SSE), ignored)


async def chat_completions(request: Request) -> Response:
    pool, adapter, body = await parse_body(request, ChatCompletionRequest)
    ignored = unknown_fields(pool, body)
    call = chat_call(pool, body).with_adapter(adapter)
    return with_ignored(await run_call(request, call, SSE), ignored)


async def native_chat(
    request: Request,
    pool: ServedModel,
    body: dict[str, Any],
    adapter: LoraAdapter | None = None,
    framing: Framing = JSON_LINES,
    stream: bool | None = None,
    output: OutputFormatter | None = None,
) -> Response:
    """A body with ``messages`` on the native API: the chat completion schema, streamed as JSON lines
    (or in ``framing``; ``stream`` overrides the request's: DJL's chat output formatters)."""
    chat = parse_model(ChatCompletionRequest, body)
    ignored = unknown_fields(pool, chat)
    keep_alive(request, chat.keep_alive_seconds)
    call = chat_call(pool, chat).with_adapter(adapter)
    if stream is not None:
        call.stream = stream
    return with_ignored(await run_call(request, call, framing, output=output), ignored)


def _model_card(pool: ServedModel, status: str, adapter: LoraAdapter | None = None) -> dict[str, Any]:
    # vLLM's card: root is what the name serves (the adapter's path), parent the base of an adapter.
    # status (lmi-core's): the model's residency; an adapter's is its base model's.
    return {
        "id": adapter.name if adapter is not None else pool.name,
        "object": "model",
        "created": int(pool.loaded_at),
        "owned_by": "lmi-core",
        "root": adapter.path if adapter is not None else pool.config.model_id,
        "parent": pool.name if adapter is not None else None,
        "max_model_len": pool.max_model_len,
        "task": pool.config.pooling.task,  # what the model serves: text-generation, text-embedding, rerank
        "status": status,
    }


def _status(request: Request, pool: ServedModel) -> str:
    state: AppState = request.app.state.lmi
    return state.server.describe(pool.name).residency.state.value


def _cards(request: Request, pool: ServedModel) -> list[dict[str, Any]]:
    """The model's card, then one per registered adapter."""
    adapters = pool.adapters.entries() if pool.adapters is not None else []
    status = _status(request, pool)
    return [_model_card(pool, status), *(_model_card(pool, status, entry.lora) for entry in adapters)]


async def list_models(request: Request) -> Response:
    state: AppState = request.app.state.lmi
    cards = [c for p in state.server.served() for c in _cards(request, p)]
    return JSONResponse({"object": "list", "data": cards})


async def retrieve_model(request: Request) -> Response:
    name = request.path_params["model"]
    pool, adapter = model_or_adapter(request, name)
    named = adapter if adapter is not None and adapter.name == name else None
    return JSONResponse(_model_card(pool, _status(request, pool), named))


routes = [
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
]
