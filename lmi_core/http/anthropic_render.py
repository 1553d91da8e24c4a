"""The Messages API's answers: a chat result or chat chunks rendered as an Anthropic message or events.

Invariant: one builder (``ContentBlocks``) makes the content blocks of both forms: a whole chat message
is fed to it as one delta, a stream's chat deltas one by one, so the streamed blocks equal the whole
message's. A stream is Anthropic's sequence: ``message_start`` (with the prompt's ``input_tokens``),
per block ``content_block_start``, its ``content_block_delta``s (``text_delta``, ``thinking_delta``
then one ``signature_delta``, ``input_json_delta``) and ``content_block_stop``, then ``message_delta``
(``stop_reason``, usage) and ``message_stop``; an error once streaming began is an ``error`` event.
Thinking comes from chat's ``reasoning_content`` (or ``reasoning``), tool calls from chat's
``tool_calls``: the chat path's parsers, not new ones.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from lmi_core.http.anthropic_protocol import MessagesRequest
from lmi_core.http.openai_render import Call
from lmi_core.http.responses_render import reasoning_of

Event = dict[str, Any]
# This server's thinking is not signed; a fixed value keeps clients that require the field working.
SIGNATURE = "lmi-core-unsigned"


class ContentBlocks:
    """The content blocks of one message, built from chat deltas; each step returns its events."""

    def __init__(self) -> None:
        self.blocks: list[dict[str, Any]] = []
        self.open = False  # the last block is still receiving deltas
        self.arguments = ""  # the open tool_use block's JSON text so far

    def _start(self, block: dict[str, Any]) -> list[Event]:
        events = self.close()
        self.blocks.append(block)
        self.open = True
        self.arguments = ""
        start = {**block, "input": {}} if block["type"] == "tool_use" else dict(block)
        events.append({"type": "content_block_start", "index": len(self.blocks) - 1, "content_block": start})
        return events

    def _delta(self, delta: dict[str, Any]) -> Event:
        return {"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta}

    def _current(self, kind: str) -> dict[str, Any] | None:
        return self.blocks[-1] if self.open and self.blocks[-1]["type"] == kind else None

    def add(self, delta: dict[str, Any]) -> list[Event]:
        """Feed a chat delta (or a whole chat message): its reasoning, content and tool calls."""
        events: list[Event] = []
        thinking = reasoning_of(delta)
        if thinking:
            block = self._current("thinking")
            if block is None:
                events += self._start({"type": "thinking", "thinking": "", "signature": ""})
                block = self.blocks[-1]
            block["thinking"] += thinking
            events.append(self._delta({"type": "thinking_delta", "thinking": thinking}))
        content = delta.get("content")
        if content:
            block = self._current("text")
            if block is None:
                events += self._start({"type": "text", "text": ""})
                block = self.blocks[-1]
            block["text"] += content
            events.append(self._delta({"type": "text_delta", "text": content}))
        for call in delta.get("tool_calls") or []:
            function = call.get("function") or {}
            if call.get("id") is not None:  # a call's first delta: its id and name
                events += self._start(
                    {"type": "tool_use", "id": call["id"], "name": function.get("name") or ""}
                )
            arguments = function.get("arguments") or ""
            if arguments and self._current("tool_use") is not None:  # one call ends before the next
                self.arguments += arguments
                events.append(self._delta({"type": "input_json_delta", "partial_json": arguments}))
        return events

    def close(self) -> list[Event]:
        """End the open block (if any)."""
        if not self.open:
            return []
        self.open = False
        block, events = self.blocks[-1], []
        if block["type"] == "thinking":
            block["signature"] = SIGNATURE
            events.append(self._delta({"type": "signature_delta", "signature": SIGNATURE}))
        elif block["type"] == "tool_use":
            block["input"] = _input(self.arguments)
        events.append({"type": "content_block_stop", "index": len(self.blocks) - 1})
        return events


def _input(arguments: str) -> dict[str, Any]:
    """A call's arguments as ``tool_use.input`` (an object; a model's broken JSON gives ``{}``)."""
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def usage(chat: dict[str, Any] | None) -> dict[str, int]:
    prompt = chat["prompt_tokens"] if chat else 0
    completion = chat["completion_tokens"] if chat else 0
    return {
        "input_tokens": prompt,
        "output_tokens": completion,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


class MessageRender:
    """One message: its object, from the request, its call and the chat output."""

    def __init__(self, body: MessagesRequest, call: Call) -> None:
        self.body = body
        self.call = call
        self.id = f"msg_{uuid.uuid4().hex}"

    def stop(self, finish: str | None, blocks: list[dict[str, Any]]) -> tuple[str, str | None]:
        """Anthropic's ``stop_reason`` and ``stop_sequence``: a cut-off output is ``max_tokens``, one
        with a call ``tool_use``, a stop sequence ``stop_sequence`` (which one, when the request gave
        one: the engines do not say which of several matched), else ``end_turn``."""
        if finish == "length":
            return "max_tokens", None
        if any(b["type"] == "tool_use" for b in blocks):
            return "tool_use", None
        ended = self.call.finished.get(0)
        if ended is not None and ended.finish_reason == "stop_sequence":
            sequences = self.body.stop_sequences or []
            return "stop_sequence", sequences[0] if len(sequences) == 1 else None
        return "end_turn", None

    def message(
        self, content: list[dict[str, Any]], stop: tuple[str | None, str | None], chat_usage: Any
    ) -> Event:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.call.envelope(chunk=False)["model"],
            "content": content,
            "stop_reason": stop[0],
            "stop_sequence": stop[1],
            "usage": usage(chat_usage),
        }

    def result(self, chat: dict[str, Any]) -> dict[str, Any]:
        """The whole message from the chat result (an empty output is one empty text block, as
        Anthropic answers it: clients read ``content[0]``)."""
        choice = chat["choices"][0]
        blocks = ContentBlocks()
        blocks.add(choice["message"])
        blocks.close()
        content = blocks.blocks or [{"type": "text", "text": ""}]
        return self.message(content, self.stop(choice["finish_reason"], blocks.blocks), chat["usage"])

    async def events(self, chunks: AsyncGenerator[dict[str, Any], None]) -> AsyncGenerator[Event, None]:
        """The event stream from the chat chunks (each carries the running usage: ``message_start``
        waits for the first one after the prompt is counted)."""
        blocks = ContentBlocks()
        started, finish, chat_usage = False, None, None
        async for chunk in chunks:
            if chunk.get("type") == "error":  # the chat path's error chunk, in Anthropic's dialect
                yield chunk
                return
            chat_usage = chunk.get("usage") or chat_usage
            for choice in chunk["choices"]:
                delta = choice["delta"]
                if "role" in delta:  # chat's opening chunk: the prompt is not counted yet
                    continue
                if not started:
                    started = True
                    yield {"type": "message_start", "message": self.message([], (None, None), chat_usage)}
                for event in blocks.add(delta):
                    yield event
                finish = choice["finish_reason"] or finish
        if not started:
            yield {"type": "message_start", "message": self.message([], (None, None), chat_usage)}
        for event in blocks.close():
            yield event
        stop_reason, sequence = self.stop(finish, blocks.blocks)
        yield {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": sequence},
            "usage": usage(chat_usage),
        }
        yield {"type": "message_stop"}
