"""Streaming tool-call parsers: model text in, content and OpenAI-shaped tool-call deltas out.

Invariant: a parser's output depends only on the concatenation of what it was fed, not on how the
text was cut (one character, one token or all at once): each delta says what is new, so the deltas of
a call joined (name once, argument fragments concatenated) equal what parsing the whole text gives.
Argument fragments are the model's own JSON text (never re-serialized), so the non-streamed
``arguments`` is exactly the concatenation of the streamed ones; ``pythonic`` converts each call to
JSON when its closing bracket arrives.

Parsers by name (``option.tool_call_parser``): ``hermes`` (``<tool_call>{...}</tool_call>``),
``llama3_json`` (a JSON object, or several separated by ``;``, optionally after ``<|python_tag|>``),
``mistral`` (``[TOOL_CALLS]`` then a JSON array), ``pythonic`` (``[f(a=1), g(b="x")]``). A plugin adds
more with the ``register_tool_parsers`` hook. ``json_array`` reads the output of ``tool_choice=
"required"`` (a constrained ``[{"name", "parameters"}]``); ``NamedCallParser`` that of a named choice.
"""

from __future__ import annotations

import ast
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from lmi_core.reasoning import merge_parsers, partial_suffix

ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass
class CallDelta:
    """What is new about call ``index``: its id and name (the first delta only), argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class Parsed:
    """What one feed produced: content text for the client, and tool-call deltas."""

    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def extend(self, other: Parsed) -> Parsed:
        self.content += other.content
        self.calls += other.calls
        return self


class ToolParser(Protocol):
    def feed(self, text: str) -> Parsed: ...

    def finish(self) -> Parsed: ...  # the end of the output: whatever was held back


ParserFactory = Callable[[], ToolParser]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    """A whole call, from its deltas."""

    id: str
    name: str
    arguments: str


def join_calls(deltas: list[CallDelta]) -> list[ToolCall]:
    """The calls that ``deltas`` describe, by index (their name once, their arguments joined)."""
    calls: dict[int, ToolCall] = {}
    for delta in deltas:
        if delta.index not in calls:
            calls[delta.index] = ToolCall(delta.id or new_call_id(), delta.name or "", "")
        calls[delta.index].arguments += delta.arguments
    return [calls[i] for i in sorted(calls)]


class _Counter:
    """Call indexes shared by the scanners of one output."""

    def __init__(self) -> None:
        self.next = 0

    def take(self) -> int:
        self.next += 1
        return self.next - 1


class JsonCallScanner:
    """Reads a run of JSON call objects (``{"name": ..., "arguments" | "parameters": ...}``, possibly
    in an array or separated by ``,``/``;``) one character at a time. Emits a call's header when its
    name is complete and argument characters as they come (held until the name is known)."""

    def __init__(self, counter: _Counter | None = None) -> None:
        self._counter = counter or _Counter()
        self.depth = 0  # bracket depth; 0 = between objects
        self._in_string = False
        self._escape = False
        self._key = ""  # the current top-level key's raw text, while reading it
        self._reading_key = False
        self._value_key: str | None = None  # the key whose value is being read (depth >= 1)
        self._value_raw = ""
        self._value_depth = 0
        self._scalar = False
        self._name: str | None = None
        self._index: int | None = None
        self._held_args = ""
        self._args_done = False

    @property
    def between_objects(self) -> bool:
        return self.depth == 0 and not self._in_string

    def feed(self, text: str) -> list[CallDelta]:
        out: list[CallDelta] = []
        for ch in text:
            self._char(ch, out)
        return out

    def _emit_args(self, text: str, out: list[CallDelta]) -> None:
        if self._index is None:
            self._held_args += text
        elif text:
            out.append(CallDelta(self._index, arguments=text))

    def _end_value(self, out: list[CallDelta]) -> None:
        if self._value_key == "name":
            try:
                name = json.loads(self._value_raw)
            except json.JSONDecodeError:
                name = None
            if isinstance(name, str) and self._index is None:
                self._name = name
                self._index = self._counter.take()
                out.append(CallDelta(self._index, new_call_id(), name, ""))
                if self._held_args:
                    out.append(CallDelta(self._index, arguments=self._held_args))
                    self._held_args = ""
        elif self._value_key in ARGUMENT_KEYS:
            self._args_done = True
        self._value_key = None
        self._value_raw = ""
        self._scalar = False

    def _end_object(self, out: list[CallDelta]) -> None:
        if self._index is not None and not self._args_done:
            out.append(CallDelta(self._index, arguments="{}"))  # a call without arguments
        self._name = self._index = None
        self._held_args = ""
        self._args_done = False

    def _char(self, ch: str, out: list[CallDelta]) -> None:
        reading_args = self._value_key in ARGUMENT_KEYS and self._value_key is not None
        if self._value_key is not None and self._scalar:
            # A number / true / false / null value: ends at the next delimiter (not part of it).
            if ch in ",}" or ch.isspace():
                self._end_value(out)
            else:
                self._value_raw += ch
                if reading_args:
                    self._emit_args(ch, out)
                return
        if self._in_string:
            if self._value_key is not None:
                self._value_raw += ch
                if reading_args:
                    self._emit_args(ch, out)
            elif self._reading_key:
                self._key += ch
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
                if self._reading_key:
                    self._reading_key = False
                elif self._value_key is not None and self.depth == self._value_depth:
                    self._end_value(out)
            return
        if self._value_key is not None:  # inside an object / array value, or its first character
            if ch.isspace() and not self._value_raw:
                return
            self._value_raw += ch
            if reading_args:
                self._emit_args(ch, out)
            if ch == '"':
                self._in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == self._value_depth:
                    self._end_value(out)
            elif self.depth == self._value_depth and len(self._value_raw) == 1:
                self._scalar = True
            return
        # Structure of a call object itself (depth 1), or between objects (depth 0).
        if self.depth == 0:
            if ch == "{":
                self.depth = 1
            return  # array brackets, separators, whitespace, stray text: nothing to emit
        if ch == '"':
            self._in_string = True
            self._reading_key = True
            self._key = '"'
        elif ch == ":":
            try:
                key = json.loads(self._key)
            except json.JSONDecodeError:
                key = ""
            self._value_key = key if isinstance(key, str) else ""
            self._value_raw = ""
            self._value_depth = self.depth
        elif ch == "}":
            self.depth = 0
            self._end_object(out)


class JsonArrayParser:
    """``json_array``: the whole output is calls (the constrained output of ``tool_choice=required``)."""

    def __init__(self) -> None:
        self._scanner = JsonCallScanner()

    def feed(self, text: str) -> Parsed:
        return Parsed(calls=self._scanner.feed(text))

    def finish(self) -> Parsed:
        return Parsed()


class NamedCallParser:
    """A named ``tool_choice``: the whole output is the arguments of one call to ``name``."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._started = False

    def feed(self, text: str) -> Parsed:
        calls = []
        if not self._started:
            self._started = True
            calls.append(CallDelta(0, new_call_id(), self._name, ""))
        if text:
            calls.append(CallDelta(0, arguments=text))
        return Parsed(calls=calls)

    def finish(self) -> Parsed:
        return self.feed("")


class TaggedParser:
    """Content, then calls after ``start`` (``hermes``: each call in ``<tool_call>...</tool_call>``;
    ``mistral``: ``[TOOL_CALLS]`` before a JSON array). Text that may begin the marker is held back."""

    def __init__(self, start: str, end: str | None) -> None:
        self._start = start
        self._end = end
        self._pending = ""
        self._in_call = False
        self._counter = _Counter()
        self._scanner = JsonCallScanner(self._counter)
        self._tail = ""  # text after the last object inside a call block (to find the end tag)

    def feed(self, text: str) -> Parsed:
        parsed = Parsed()
        for ch in text:
            if self._in_call:
                if self._scanner.between_objects and self._end is not None:
                    self._tail += ch
                    if self._tail.endswith(self._end):
                        self._in_call, self._tail = False, ""
                        self._scanner = JsonCallScanner(self._counter)
                        continue
                    if ch != "{":
                        continue
                    self._tail = ""
                parsed.calls += self._scanner.feed(ch)
                continue
            self._pending += ch
            if self._pending.endswith(self._start):
                parsed.content += self._pending[: -len(self._start)]
                self._pending, self._in_call = "", True
        if not self._in_call:
            keep = partial_suffix(self._pending, self._start)
            cut = len(self._pending) - keep
            parsed.content += self._pending[:cut]
            self._pending = self._pending[cut:]
        return parsed

    def finish(self) -> Parsed:
        out, self._pending = self._pending, ""
        return Parsed(content=out)


class Llama3JsonParser:
    """``llama3_json``: calls when the output starts with ``{`` (after an optional ``<|python_tag|>``),
    content otherwise; calls are JSON objects separated by ``;``."""

    TAG = "<|python_tag|>"

    def __init__(self) -> None:
        self._head = ""
        self._mode: str | None = None  # None until the first significant character
        self._scanner = JsonCallScanner()

    def feed(self, text: str) -> Parsed:
        if self._mode == "content":
            return Parsed(content=text)
        if self._mode == "calls":
            return Parsed(calls=self._scanner.feed(text))
        self._head += text
        stripped = self._head.lstrip()
        body = stripped[len(self.TAG) :] if stripped.startswith(self.TAG) else stripped
        if self.TAG.startswith(stripped) or not body.strip():
            return Parsed()  # still undecided: whitespace, or a prefix of the tag
        if body.lstrip().startswith("{"):
            self._mode = "calls"
            return Parsed(calls=self._scanner.feed(body))
        self._mode = "content"
        out, self._head = self._head, ""
        return Parsed(content=out)

    def finish(self) -> Parsed:
        if self._mode is None:
            out, self._head = self._head, ""
            return Parsed(content=out)
        return Parsed()


class PythonicParser:
    """``pythonic``: ``[f(a=1), g(b="x")]``. Held while it may be such a list; each call is emitted
    whole, its keyword arguments as JSON, once the list closes; anything else is content."""

    def __init__(self) -> None:
        self._text = ""
        self._mode: str | None = None

    def feed(self, text: str) -> Parsed:
        if self._mode == "content":
            return Parsed(content=text)
        if self._mode == "done":
            return Parsed()
        start = len(self._text)
        self._text += text
        stripped = self._text.lstrip()
        if not stripped:
            return Parsed()
        if not stripped.startswith("["):
            self._mode = "content"
            out, self._text = self._text, ""
            return Parsed(content=out)
        # The first "]" that closes a whole list of calls, wherever the feeds cut the text.
        for end in range(start, len(self._text)):
            if self._text[end] == "]" and (calls := _pythonic_calls(self._text[: end + 1])) is not None:
                self._mode = "done"
                return Parsed(calls=calls)
        return Parsed()

    def finish(self) -> Parsed:
        if self._mode is None and self._text:
            out, self._text = self._text, ""
            return Parsed(content=out)
        return Parsed()


def _pythonic_calls(text: str) -> list[CallDelta] | None:
    """The calls of ``text`` if it is a complete ``[call, ...]`` list of literal arguments, else None."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        return None
    if not isinstance(tree.body, ast.List):
        return None
    calls: list[CallDelta] = []
    for index, node in enumerate(tree.body.elts):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        try:
            arguments: dict[str, Any] = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
        except ValueError:
            return None
        calls.append(CallDelta(index, new_call_id(), node.func.id, json.dumps(arguments, ensure_ascii=False)))
    return calls


BUILTIN_PARSERS: dict[str, ParserFactory] = {
    "hermes": lambda: TaggedParser("<tool_call>", "</tool_call>"),
    "llama3_json": Llama3JsonParser,
    "mistral": lambda: TaggedParser("[TOOL_CALLS]", None),
    "pythonic": PythonicParser,
    "json_array": JsonArrayParser,
}


def parser_registry(plugin_parsers: list[dict[str, ParserFactory]]) -> dict[str, ParserFactory]:
    """The built-in parsers and those plugins register (``register_tool_parsers``); a plugin may not
    replace a built-in one."""
    return merge_parsers("tool call parser", BUILTIN_PARSERS, plugin_parsers)
