"""The OpenAI API's responses: a parsed request (``Call``) rendered as one result or as chunks.

Invariant: one set of renderers serves both endpoints, streamed or not; a streamed chunk is the same
choice object as a whole result's, holding one token (or, with tools or a reasoning parser, the
parsers' deltas). Every token of a stream passes through one path in ``render_chunks``, which counts
it (the running usage of ``stream_options.continuous_usage_stats``) before it becomes text or feeds
the parsers. A chat choice with tools or thinking is read by one ``ChoiceStream`` in both renderers,
so the streamed deltas joined equal the whole message. The framings (server-sent events, JSON lines)
turn the chunk objects into bytes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from lmi_core.engine import (
    Finished,
    GenerationEvent,
    GenerationRequest,
    LoraAdapter,
    PromptLogprob,
    StructuredOutput,
    Token,
)
from lmi_core.errors import ServiceError
from lmi_core.http import errors
from lmi_core.http.state import ServedModel
from lmi_core.http.tool_calls import ToolPlan, ToolStream
from lmi_core.reasoning import ReasoningParser

# Engine finish reasons -> OpenAI's.
FINISH_REASONS = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


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
    # chat whose output begins with thinking: a fresh reasoning parser per choice (option.reasoning_parser)
    reasoning: Callable[[], ReasoningParser | None] | None = None
    include_reasoning: bool = True  # the thinking is shown (reasoning_content and reasoning) or dropped
    adapter: LoraAdapter | None = None  # the LoRA adapter every generation runs with
    # The API the request came in on, where it is not chat's own (Responses, Messages): the dialect
    # of an error once streaming began, and the field an engine's prompt error names.
    dialect: errors.Dialect = "openai"
    prompt_field: str | None = None
    # Each generation's end as the engine reported it, recorded as it is rendered (the Messages API
    # reads the engine's own reason: a stop sequence, not only OpenAI's "stop").
    finished: dict[int, Finished] = field(default_factory=dict)
    id: str = field(init=False)
    created: int = field(init=False, default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    @property
    def prompt_param(self) -> str:
        return self.prompt_field or ("messages" if self.chat else "prompt")

    def envelope(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        model = self.adapter.name if self.adapter is not None else self.pool.name  # vLLM names the adapter
        return {"id": self.id, "object": kind, "created": self.created, "model": model}

    @property
    def parsed(self) -> bool:
        """Whether each choice's text is read by a ``ChoiceStream`` (tools, thinking) rather than shown."""
        return self.tools is not None or self.reasoning is not None

    def with_adapter(self, adapter: LoraAdapter | None) -> Call:
        """This call with every generation on ``adapter`` (None: the base model)."""
        self.adapter = adapter
        for generation in self.generations:
            generation.adapter = adapter
        return self


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


class ChoiceStream:
    """One chat choice's text read by its parsers: the thinking apart (the reasoning parser), the answer
    as ``content`` or read for tool calls (the tool-call parser only ever sees the answer). ``feed``
    and ``finish`` give delta objects; ``message`` is the whole response's message from all fed."""

    def __init__(self, call: Call) -> None:
        self.reasoning = call.reasoning() if call.reasoning is not None else None
        self.show_reasoning = call.include_reasoning
        self.tools = ToolStream(call.tools) if call.tools is not None else None
        self._thinking: list[str] = []
        self._content: list[str] = []

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self.reasoning is None:
            return self._answer(text)
        split = self.reasoning.feed(text)
        return self._think(split.reasoning) + self._answer(split.content)

    def finish(self) -> list[dict[str, Any]]:
        deltas = []
        if self.reasoning is not None:
            split = self.reasoning.finish()
            deltas = self._think(split.reasoning) + self._answer(split.content)
        return deltas + (self.tools.finish() if self.tools is not None else [])

    def _think(self, text: str) -> list[dict[str, Any]]:
        if not text or not self.show_reasoning:
            return []
        self._thinking.append(text)
        # Both names: vLLM renamed reasoning_content to reasoning, and clients read one or the other.
        return [{"reasoning_content": text, "reasoning": text}]

    def _answer(self, text: str) -> list[dict[str, Any]]:
        if self.tools is not None:
            return self.tools.feed(text)
        if not text:
            return []
        self._content.append(text)
        return [{"content": text}]

    @property
    def has_calls(self) -> bool:
        return self.tools is not None and self.tools.has_calls

    def finish_reason(self, engine_reason: str) -> str:
        return self.tools.plan.finish_reason(engine_reason, self.has_calls) if self.tools else engine_reason

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self._content)}
        if self.tools is not None:
            message = self.tools.message()
        if self.reasoning is not None and self.show_reasoning:
            message["reasoning_content"] = message["reasoning"] = "".join(self._thinking) or None
        return message


def _delta_choice(
    index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None = None, finish: str | None = None
) -> dict[str, Any]:
    """A streamed chat choice of the parsers' deltas (content, thinking, ``tool_calls``)."""
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


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
    choices, finished = [], call.finished
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
        if call.parsed:  # the same parsers as the stream: the message equals the streamed deltas joined
            stream = ChoiceStream(call)
            stream.feed(text)
            stream.finish()
            choice["message"] = stream.message()
            choice["finish_reason"] = stream.finish_reason(_finish_reason(done))
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
    finished = call.finished
    streams = [ChoiceStream(call) for _ in call.echo] if call.parsed else None
    # Parsed choices: the tokens whose text a parser holds back, until a delta can carry their logprobs.
    unshown: list[list[Token]] = [[] for _ in call.echo]
    logprobs = call.logprobs is not None
    for index, text in enumerate(call.echo):
        if call.chat:  # OpenAI opens each chat choice with the assistant's role
            opening = _choice(call, index, "", [], None, 0, True)
            yield chunk({**opening, "delta": {"role": "assistant", "content": ""}})
        elif text:
            yield chunk(_choice(call, index, text, [], None, 0, True))
    try:
        async for index, event in events:
            if isinstance(event, Token):  # one path per token: counted, then shown or parsed for calls
                if event.prompt_tokens is not None:
                    prompt_tokens[index] = event.prompt_tokens
                generated[index] += 1
                if streams is None:
                    yield chunk(_choice(call, index, event.text, [event], None, offsets[index], True))
                    offsets[index] += len(event.text)
                    continue
                if logprobs:
                    unshown[index].append(event)
                for delta in streams[index].feed(event.text):
                    yield chunk(_delta_choice(index, delta, _unshown_logprobs(unshown[index])))
            else:
                finished[index] = event
                prompt_tokens[index] = event.prompt_tokens
                if streams is None:
                    yield chunk(_choice(call, index, "", [], _finish_reason(event), offsets[index], True))
                    continue
                for delta in streams[index].finish():  # what the parsers held back
                    yield chunk(_delta_choice(index, delta, _unshown_logprobs(unshown[index])))
                reason = streams[index].finish_reason(_finish_reason(event))
                yield chunk(_delta_choice(index, {}, _unshown_logprobs(unshown[index]), reason))
    except ServiceError as exc:
        yield errors.body(exc, call.dialect)  # headers are sent: the error becomes the last chunk
        return
    if call.include_usage:
        yield {**call.envelope(chunk=True), "choices": [], "usage": _usage(call, finished)}


def _unshown_logprobs(tokens: list[Token]) -> dict[str, Any] | None:
    """The logprobs of ``tokens`` (emptied: each token's logprob is streamed once, with the first delta
    after it), or None when there are none."""
    if not tokens:
        return None
    shown = _chat_logprobs(tokens)
    tokens.clear()
    return shown


def _json(obj: dict[str, Any]) -> bytes:
    # orjson: one chunk per token or batch is the server's hottest path; json.dumps + encode costs
    # ~15x as much per chunk (measured 16 vs 1.1 µs for a chat chunk on the shared 2-core machine).
    return orjson.dumps(obj)


async def sse(chunks: AsyncGenerator[dict[str, Any], None]) -> AsyncGenerator[bytes, None]:
    async for obj in chunks:
        yield b"data: " + _json(obj) + b"\n\n"
    yield b"data: [DONE]\n\n"


async def named_sse(events: AsyncGenerator[dict[str, Any], None]) -> AsyncGenerator[bytes, None]:
    """Server-sent events named by their ``type`` (the Responses and Messages APIs' framing, as vLLM
    writes it: ``event: <type>`` then ``data: <json>``); no ``[DONE]``, the last event says the end."""
    async for event in events:
        yield b"event: " + event["type"].encode() + b"\ndata: " + _json(event) + b"\n\n"


async def jsonlines(chunks: AsyncGenerator[dict[str, Any], None]) -> AsyncGenerator[bytes, None]:
    async for obj in chunks:
        yield _json(obj) + b"\n"


Framing = tuple[Callable[[AsyncGenerator[dict[str, Any], None]], AsyncGenerator[bytes, None]], str]
SSE: Framing = (sse, "text/event-stream")
JSON_LINES: Framing = (jsonlines, "application/jsonlines")
