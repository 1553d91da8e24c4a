"""Tool fields of a chat request to a tool plan (pure): constraints, parsers, and 400s naming the field."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from lmi_core.errors import BadRequestError
from lmi_core.http.lmi_protocol import parse_model
from lmi_core.http.openai_protocol import ChatCompletionRequest
from lmi_core.http.tool_calls import ToolStream
from lmi_core.http.tool_parsers import BUILTIN_PARSERS

TOOL = {
    "type": "function",
    "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {}}}},
}
AUTO = {"enable_auto_tool_choice": "true", "tool_call_parser": "hermes"}


def body(**fields: Any) -> ChatCompletionRequest:
    request: ChatCompletionRequest = parse_model(
        ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], "tools": [TOOL], **fields}
    )
    return request


def test_required_is_a_constraint_whose_outputs_are_calls_to_the_tools() -> None:
    plan = body(tool_choice="required", parallel_tool_calls=False).tool_plan(BUILTIN_PARSERS, {})
    assert plan is not None and plan.constraint is not None
    schema = json.loads(plan.constraint.spec)
    jsonschema.validate([{"name": "f", "parameters": {"a": 1}}], schema)
    for wrong in ([], [{"name": "g", "parameters": {}}], [{"name": "f", "parameters": {}}] * 2):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)


def test_auto_needs_the_model_options_and_a_known_parser() -> None:
    with pytest.raises(BadRequestError, match="enable_auto_tool_choice") as info:
        body().tool_plan(BUILTIN_PARSERS, {})  # tools without tool_choice: auto, as OpenAI
    assert info.value.param == "tool_choice"
    with pytest.raises(BadRequestError, match="nope"):
        body().tool_plan(BUILTIN_PARSERS, {**AUTO, "tool_call_parser": "nope"})
    plan = body(tool_choice="auto").tool_plan(BUILTIN_PARSERS, AUTO)
    assert plan is not None and plan.mode == "auto" and plan.constraint is None
    assert body(tool_choice="none").tool_plan(BUILTIN_PARSERS, {}) is None


def test_parallel_tool_calls_false_keeps_the_first_auto_call() -> None:
    plan = body(parallel_tool_calls=False).tool_plan(BUILTIN_PARSERS, AUTO)
    assert plan is not None
    stream = ToolStream(plan)
    stream.feed(
        '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "f", "arguments": {}}'
    )
    stream.finish()
    assert len(stream.message()["tool_calls"]) == 1


def test_earlier_calls_reach_the_template_with_arguments_as_a_mapping() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    request = body(
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c", "content": "1"},
        ]
    )
    assistant, tool = (m.for_template() for m in request.messages[1:])
    assert assistant["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert tool == {"role": "tool", "content": "1", "tool_call_id": "c"}
