"""Tool calling on the chat API: ``tools``/``tool_choice`` to a plan, model text to ``tool_calls``.

``tool_choice`` ``required`` and a named function are enforced by a JSON-schema constraint built
from the tools' parameter schemas (so any model calls a listed tool with valid arguments);
``auto`` lets the model choose and reads its text with the model's ``option.tool_call_parser``
(needs ``option.enable_auto_tool_choice=true``); ``none`` (the default without tools) is plain chat.
Streamed and whole responses come from the same parser (``lmi_core.http.tool_parsers``), so the streamed
``tool_calls`` deltas joined equal the whole response's calls.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmi_core.engine import StructuredOutput
from lmi_core.errors import BadRequestError
from lmi_core.http.tool_parsers import (
    NamedCallParser,
    Parsed,
    ParserFactory,
    ToolCall,
    ToolParser,
    join_calls,
)

ToolMode = Literal["required", "named", "auto"]
ANY_OBJECT: dict[str, Any] = {"type": "object"}
TOOL_CHOICES = ("none", "auto", "required")
TOOL_NAME = r"^[A-Za-z0-9_.-]{1,64}$"  # OpenAI's function names (Anthropic's are a subset)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FunctionDef(_Strict):
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ToolFields(BaseModel):
    """The tool fields of a chat request (mixed into its pydantic model)."""

    tools: list[ToolDef] | None = Field(None, max_length=128)
    # A string is checked in tool_plan: a Literal in the union would name its member in the error.
    tool_choice: str | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def tool_plan(self, parsers: Mapping[str, ParserFactory], options: Mapping[str, str]) -> ToolPlan | None:
        """The request's tool plan, or None for plain chat; ``options``: the model's ``option.*``."""
        choice = self.tool_choice
        if isinstance(choice, str) and choice not in TOOL_CHOICES:
            message = f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or a named function"
            raise BadRequestError(message, param="tool_choice")
        if not self.tools:
            if choice not in (None, "none"):
                raise BadRequestError("tool_choice needs tools", param="tool_choice")
            return None
        tools = {t.function.name: t.function for t in self.tools}
        if choice == "none":
            return None
        template_tools = [t.model_dump(exclude_none=True) for t in self.tools]
        single = self.parallel_tool_calls is False
        if isinstance(choice, NamedToolChoice):
            name = choice.function.name
            if name not in tools:
                raise BadRequestError(f"tool_choice names {name!r}, not one of tools", param="tool_choice")
            schema = json.dumps(tools[name].parameters or ANY_OBJECT)
            return ToolPlan("named", template_tools, StructuredOutput("json", schema), name=name)
        if choice == "required":
            return ToolPlan("required", template_tools, required_constraint(list(tools.values()), single))
        parser = options.get("tool_call_parser")
        if str(options.get("enable_auto_tool_choice", "false")).lower() != "true" or not parser:
            raise BadRequestError(
                'tool_choice "auto" needs option.enable_auto_tool_choice=true and option.tool_call_parser '
                "on the model; use tool_choice required or a named function",
                param="tool_choice",
            )
        if parser not in parsers:
            known = ", ".join(sorted(parsers))
            raise BadRequestError(
                f"option.tool_call_parser={parser} is not one of {known}", param="tool_choice"
            )
        return ToolPlan("auto", template_tools, None, factory=parsers[parser], single=single)


def required_constraint(tools: list[FunctionDef], single: bool) -> StructuredOutput:
    """Output constraint of ``tool_choice=required``: a JSON array of ``{"name", "parameters"}``
    (vLLM's shape), each a listed tool with arguments valid for it; one call when ``single``."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [tool.name]},
                "parameters": tool.parameters or ANY_OBJECT,
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if single:
        schema["maxItems"] = 1
    return StructuredOutput("json", json.dumps(schema))


@dataclass
class ToolPlan:
    """How one request's output becomes tool calls."""

    mode: ToolMode
    template_tools: list[dict[str, Any]]  # for the chat template
    constraint: StructuredOutput | None  # required / named: what the output must be
    name: str = ""  # named: the function
    factory: Callable[[], ToolParser] | None = None  # auto: the model's parser
    single: bool = False  # parallel_tool_calls false: only the first call counts (auto)

    def parser(self) -> ToolParser:
        if self.mode == "named":
            return NamedCallParser(self.name)
        if self.mode == "required":
            from lmi_core.http.tool_parsers import JsonArrayParser

            return JsonArrayParser()
        assert self.factory is not None
        return self.factory()

    def finish_reason(self, engine_reason: str, has_calls: bool) -> str:
        # A named function answers "stop", as OpenAI does; a cut-off output stays "length".
        if engine_reason == "stop" and has_calls and self.mode != "named":
            return "tool_calls"
        return engine_reason


class ToolStream:
    """One choice's tool-call rendering: feed its text, get delta objects (``content`` and/or
    ``tool_calls``); ``message`` is the whole response's message from everything fed."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self._parser = plan.parser()
        self._parsed = Parsed()

    def _keep(self, parsed: Parsed) -> Parsed:
        if self.plan.single:
            parsed.calls = [c for c in parsed.calls if c.index == 0]
        self._parsed.extend(parsed)
        return parsed

    def feed(self, text: str) -> list[dict[str, Any]]:
        return _deltas(self._keep(self._parser.feed(text)))

    def finish(self) -> list[dict[str, Any]]:
        return _deltas(self._keep(self._parser.finish()))

    @property
    def has_calls(self) -> bool:
        return bool(self._parsed.calls)

    def message(self) -> dict[str, Any]:
        calls = join_calls(self._parsed.calls)
        return {
            "role": "assistant",
            "content": self._parsed.content or None,
            "tool_calls": [call_json(c) for c in calls],
        }


def call_json(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _deltas(parsed: Parsed) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if parsed.content:
        out.append({"content": parsed.content})
    for delta in parsed.calls:
        entry: dict[str, Any] = {"index": delta.index}
        function: dict[str, Any] = {"arguments": delta.arguments}
        if delta.id is not None:
            entry.update(id=delta.id, type="function")
            function["name"] = delta.name
        entry["function"] = function
        out.append({"tool_calls": [entry]})
    return out


def template_message(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message's ``tool_calls`` as chat templates read them: ``arguments`` a mapping
    (templates render it with ``tojson``), not OpenAI's JSON string."""
    calls = []
    for call in message.get("tool_calls") or []:
        function = dict(call.get("function") or {})
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                function["arguments"] = json.loads(arguments)
            except json.JSONDecodeError:
                pass  # the template gets the string as it came
        calls.append({**call, "function": function})
    return {**message, "tool_calls": calls} if calls else message
