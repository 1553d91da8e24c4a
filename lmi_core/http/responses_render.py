"""The Responses API's answers: a chat result or chat chunks rendered as a response object or events.

Invariant: one builder (``OutputItems``) makes the output items of both forms: a whole chat message is
fed to it as one delta, a stream's chat deltas one by one, so the streamed items equal the whole
response's. A streamed response is OpenAI's event sequence: ``response.created``, ``in_progress``,
then per item ``output_item.added`` (a message also ``content_part.added``), its deltas
(``output_text.delta``, ``reasoning_text.delta``, ``function_call_arguments.delta``), its ``..done``
events and ``output_item.done``, and last ``response.completed``, whose response says
``incomplete`` when the output hit ``max_output_tokens`` and ``cancelled`` when it was cancelled (as
vLLM ends every stream: the openai SDK's stream helper requires that event), or ``response.failed``
after an ``error`` event; ``sequence_number`` counts every event from 0. Reasoning comes from
chat's ``reasoning_content`` (or ``reasoning``), tool calls from chat's ``tool_calls``: the chat
path's parsers, not new ones.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from lmi_core.http.common import Stopped
from lmi_core.http.openai_render import Call
from lmi_core.http.responses_protocol import ResponsesRequest

Event = dict[str, Any]


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def reasoning_of(delta: dict[str, Any]) -> str:
    """A chat message's or delta's reasoning text, under either of its names."""
    return str(delta.get("reasoning_content") or delta.get("reasoning") or "")


@dataclass(frozen=True)
class TextItem:
    """An output item that holds text: its id prefix, its own fields, its content part (``type``
    names its events, ``response.<type>.delta`` and ``.done``), and what its text events add."""

    prefix: str
    fields: dict[str, Any]
    part: dict[str, Any]
    extra: dict[str, Any]


TEXT_ITEMS = {
    "message": TextItem(
        "msg", {"role": "assistant"}, {"type": "output_text", "annotations": []}, {"logprobs": []}
    ),
    "reasoning": TextItem("rs", {"summary": []}, {"type": "reasoning_text"}, {}),
}


class OutputItems:
    """The output items of one response, built from chat deltas; each step returns its events
    (without ``sequence_number``), and ``output`` is the items so far."""

    def __init__(self, namespaces: dict[str, tuple[str, str]]) -> None:
        self.namespaces = namespaces  # flat tool name -> (namespace, name)
        self.output: list[dict[str, Any]] = []
        self.text = ""  # the open item's text (a message's or a reasoning item's) or arguments
        self.calls: dict[int, dict[str, Any]] = {}  # chat tool-call index -> its function_call item

    @property
    def open(self) -> dict[str, Any] | None:
        last = self.output[-1] if self.output else None
        return last if last is not None and last["status"] == "in_progress" else None

    def _where(self) -> dict[str, Any]:
        item = self.open
        assert item is not None
        return {"item_id": item["id"], "output_index": len(self.output) - 1}

    def _start(self, item: dict[str, Any], part: dict[str, Any] | None) -> list[Event]:
        events = self.close()
        self.output.append(item)
        self.text = ""
        # A copy: the item fills in later, and this event may be written after it did.
        added = {**item, "content": []} if "content" in item else dict(item)
        events.append(
            {"type": "response.output_item.added", "output_index": len(self.output) - 1, "item": added}
        )
        if part is not None:
            events.append(
                {"type": "response.content_part.added", **self._where(), "content_index": 0, "part": part}
            )
        return events

    def _text(self, kind: str, text: str) -> list[Event]:
        """``text`` for the open item of ``kind`` (``message`` or ``reasoning``), opened if need be."""
        shape = TEXT_ITEMS[kind]
        events: list[Event] = []
        item = self.open
        if item is None or item["type"] != kind:
            fresh = {
                "id": _id(shape.prefix),
                "type": kind,
                **shape.fields,
                "content": [],
                "status": "in_progress",
            }
            events += self._start(fresh, {**shape.part, "text": ""})
        self.text += text
        events.append(
            {
                "type": f"response.{shape.part['type']}.delta",
                **self._where(),
                "content_index": 0,
                "delta": text,
                **shape.extra,
            }
        )
        return events

    def add(self, delta: dict[str, Any]) -> list[Event]:
        """Feed a chat delta (or a whole chat message): its reasoning, content and tool calls."""
        events: list[Event] = []
        reasoning = reasoning_of(delta)
        if reasoning:
            events += self._text("reasoning", reasoning)
        if delta.get("content"):
            events += self._text("message", delta["content"])
        for index, call in enumerate(delta.get("tool_calls") or []):
            events += self._call(call.get("index", index), call)
        return events

    def _call(self, index: int, call: dict[str, Any]) -> list[Event]:
        function = call.get("function") or {}
        events = []
        if call.get("id") is not None:  # a call's first delta: its id and name
            flat = function.get("name") or ""
            namespace, name = self.namespaces.get(flat, (None, flat))
            item = {
                "id": _id("fc"),
                "type": "function_call",
                "call_id": call["id"],
                "name": name,
                "arguments": "",
                "status": "in_progress",
            }
            if namespace is not None:
                item["namespace"] = namespace
            events += self._start(item, None)
            self.calls[index] = item
        arguments = function.get("arguments") or ""
        if arguments and self.calls.get(index) is self.open:  # the parsers finish one call before the next
            self.text += arguments
            events.append(
                {"type": "response.function_call_arguments.delta", **self._where(), "delta": arguments}
            )
        return events

    def close(self) -> list[Event]:
        """End the open item (if any): its ``..done`` events."""
        item = self.open
        if item is None:
            return []
        where, text = self._where(), self.text
        events: list[Event] = []
        if item["type"] == "function_call":
            item["arguments"] = text
            done = {
                "type": "response.function_call_arguments.done",
                **where,
                "arguments": text,
                "name": item["name"],
            }
            events.append(done)
        else:
            shape = TEXT_ITEMS[item["type"]]
            part = {**shape.part, "text": text}
            kind = part["type"]
            events.append(
                {"type": f"response.{kind}.done", **where, "content_index": 0, "text": text, **shape.extra}
            )
            events.append({"type": "response.content_part.done", **where, "content_index": 0, "part": part})
            item["content"] = [part]
        item["status"] = "completed"
        events.append(
            {"type": "response.output_item.done", "output_index": where["output_index"], "item": item}
        )
        return events


def usage(chat: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chat's usage in the Responses API's names (cached and reasoning tokens: not counted here)."""
    if chat is None:
        return None
    return {
        "input_tokens": chat["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": chat["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": chat["total_tokens"],
    }


class ResponseRender:
    """One response: its object at each stage, from the request, its call and the chat output."""

    def __init__(
        self,
        body: ResponsesRequest,
        call: Call,
        namespaces: dict[str, tuple[str, str]],
        stored: bool,
        on_end: Callable[[dict[str, Any]], None] = lambda response: None,
    ) -> None:
        self.body = body
        self.call = call
        self.namespaces = namespaces
        self.stored = stored
        self.on_end = on_end  # sees the final response object (the store keeps it)
        self.id = _id("resp")
        self.created_at = int(time.time())

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body = self.body
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": self.call.envelope(chunk=False)["model"],
            "output": output,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": body.reasoning or {"effort": None, "summary": None},
            "store": self.stored,
            "temperature": body.temperature if body.temperature is not None else 1.0,
            "text": body.text.model_dump(by_alias=True, exclude_none=True)
            if body.text
            else {"format": {"type": "text"}},
            "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
            "tools": body.tools or [],
            "top_p": body.top_p if body.top_p is not None else 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": body.user,
            "metadata": body.metadata or {},
        }

    def _end(
        self, status: str, output: list[dict[str, Any]], chat_usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        final = self.response(status, output, usage(chat_usage))
        self.on_end(final)
        return final

    def result(self, chat: dict[str, Any]) -> dict[str, Any]:
        """The whole response from the chat result."""
        choice = chat["choices"][0]
        items = OutputItems(self.namespaces)
        items.add(choice["message"])
        items.close()
        status = "incomplete" if choice["finish_reason"] == "length" else "completed"
        return self._end(status, items.output, chat["usage"])

    async def events(self, chunks: AsyncGenerator[dict[str, Any], None]) -> AsyncGenerator[Event, None]:
        """The event stream from the chat chunks (``Stopped``: a cancelled response's events). A stream
        closed before its end (the client went away, which cancels the generation) ends ``cancelled``."""
        sequence = itertools.count()

        def numbered(event: Event) -> Event:
            return {**event, "sequence_number": next(sequence)}

        items = OutputItems(self.namespaces)
        ended = False
        try:
            start = self.response("in_progress", [])
            yield numbered({"type": "response.created", "response": start})
            yield numbered({"type": "response.in_progress", "response": start})
            finish, chat_usage, status = None, None, "completed"
            try:
                async for chunk in chunks:
                    if "error" in chunk:  # the chat path's error chunk: the stream ends with the error
                        error = {
                            "code": str(chunk["error"].get("code")),
                            "message": chunk["error"]["message"],
                        }
                        yield numbered({"type": "error", **error, "param": chunk["error"].get("param")})
                        ended = True
                        failed = self.response("failed", items.output, error=error)
                        self.on_end(failed)
                        yield numbered({"type": "response.failed", "response": failed})
                        return
                    chat_usage = chunk.get("usage") or chat_usage
                    for choice in chunk["choices"]:
                        for event in items.add(choice["delta"]):
                            yield numbered(event)
                        finish = choice["finish_reason"] or finish
            except Stopped:
                status = "cancelled"
            for event in items.close():
                yield numbered(event)
            if status != "cancelled" and finish == "length":
                status = "incomplete"
            ended = True
            yield numbered(
                {"type": "response.completed", "response": self._end(status, items.output, chat_usage)}
            )
        finally:
            if not ended:
                self.on_end(self.response("cancelled", items.output))
