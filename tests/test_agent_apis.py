"""The Responses and Messages APIs against a real server on each backend, with the official ``openai``
and ``anthropic`` SDKs used unchanged: streamed and not, a function tool round trip, the store.

The main suite runs the ``hf`` half; the vLLM venv (``make test-vllm``) the ``vllm`` half.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import ServerProcess
from tests.test_backend_parity import BACKENDS, Servers

pytestmark = pytest.mark.slow

MODEL = "demo"
# Strict schemas keep the random demo model's constrained arguments short.
PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
    "required": ["city"],
    "additionalProperties": False,
}
FUNCTION = {"type": "function", "name": "get_weather", "description": "The weather", "parameters": PARAMETERS}
TOOL = {"name": "get_weather", "description": "The weather", "input_schema": PARAMETERS}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Servers]:
    pool = Servers(tmp_path_factory.mktemp("agent-apis"), demo_model, {"option.responses_store": "memory"})
    yield pool
    pool.close()


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: pytest.FixtureRequest, servers: Servers) -> ServerProcess:
    return servers.get(request.param)


@pytest.fixture
def oai(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def claude(server: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def test_responses_create_streamed_and_not(oai: openai.OpenAI) -> None:
    common: dict[str, Any] = {
        "model": MODEL,
        "input": "hello world",
        "max_output_tokens": 8,
        "temperature": 0,
    }
    whole = oai.responses.create(**common)
    print(whole.model_dump_json())
    assert whole.status == "incomplete" and whole.incomplete_details is not None  # 8 tokens of a long answer
    assert whole.output_text and whole.usage is not None and whole.usage.output_tokens == 8
    events = list(oai.responses.create(**common, stream=True))
    kinds = [e.type for e in events]
    print(kinds)
    deltas = kinds.count("response.output_text.delta")
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(set(numbers))  # strictly increasing
    with oai.responses.stream(**common) as stream:
        final = stream.get_final_response()
    assert final.output_text == whole.output_text  # greedy: the same text either way


def test_responses_function_tool_round_trip(oai: openai.OpenAI) -> None:
    first = oai.responses.create(
        model=MODEL,
        input="weather in Paris?",
        tools=[FUNCTION],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=100,
    )
    print(first.model_dump_json())
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert (
        call.name == "get_weather"
        and call.call_id
        and call.arguments in ('{"city":"Paris"}', '{"city":"Rome"}')
    )
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    follow = oai.responses.create(
        model=MODEL,
        input=[{"role": "user", "content": "weather in Paris?"}, call.model_dump(exclude_none=True), output],
        tools=[FUNCTION],
        tool_choice="none",
        max_output_tokens=4,
    )
    print(follow.model_dump_json())
    assert follow.status == "incomplete" and follow.output_text


def test_previous_response_id_continues_a_stored_response(oai: openai.OpenAI) -> None:
    first = oai.responses.create(model=MODEL, input="hello", max_output_tokens=4)
    second = oai.responses.create(
        model=MODEL, input="again", previous_response_id=first.id, max_output_tokens=4
    )
    assert second.previous_response_id == first.id and second.usage is not None and first.usage is not None
    # The second prompt holds the first exchange: more tokens than the first prompt and its answer.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert oai.responses.retrieve(second.id).output_text == second.output_text
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model=MODEL, input="x", previous_response_id="resp_unknown", max_output_tokens=4)


def test_messages_create_and_stream(claude: anthropic.Anthropic) -> None:
    messages: list[Any] = [{"role": "user", "content": "hello world"}]
    # extra_body: this SDK release has no temperature argument; greedy makes both answers equal.
    greedy: dict[str, Any] = {"extra_body": {"temperature": 0}}
    whole = claude.messages.create(model=MODEL, max_tokens=8, messages=messages, system="Be brief.", **greedy)
    print(whole.model_dump_json())
    assert whole.stop_reason == "max_tokens" and whole.usage.output_tokens == 8
    with claude.messages.stream(
        model=MODEL, max_tokens=8, messages=messages, system="Be brief.", **greedy
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    print(kinds)
    raw = [k for k in kinds if k not in ("text",)]  # the SDK adds "text" events beside the deltas
    assert raw[:2] == ["message_start", "content_block_start"]
    assert raw[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert [b.to_dict() for b in final.content] == [b.to_dict() for b in whole.content]
    assert final.usage.input_tokens == whole.usage.input_tokens


def test_messages_tool_use_round_trip(claude: anthropic.Anthropic) -> None:
    ask: list[Any] = [{"role": "user", "content": "weather?"}]
    first = claude.messages.create(
        model=MODEL,
        max_tokens=100,
        messages=ask,
        tools=[TOOL],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},  # type: ignore[list-item]
    )
    print(first.model_dump_json())
    (use,) = [block for block in first.content if block.type == "tool_use"]
    assert (
        first.stop_reason == "tool_use"
        and use.name == "get_weather"
        and use.input in ({"city": "Paris"}, {"city": "Rome"})
    )
    with claude.messages.stream(
        model=MODEL,
        max_tokens=100,
        messages=ask,
        tools=[TOOL],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},  # type: ignore[list-item]
    ) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        streamed = stream.get_final_message()
    assert "input_json_delta" in deltas and streamed.content[-1].type == "tool_use"
    result = {"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}
    follow = claude.messages.create(
        model=MODEL,
        max_tokens=4,
        messages=[
            *ask,
            {"role": "assistant", "content": first.content},
            {"role": "user", "content": [result]},
        ],
        tools=[TOOL],  # type: ignore[list-item]
        tool_choice={"type": "none"},
    )
    print(follow.model_dump_json())
    assert follow.stop_reason == "max_tokens" and follow.content[0].type == "text"


def test_count_tokens_equals_the_prompt_tokens_of_the_same_request(claude: anthropic.Anthropic) -> None:
    prompt: dict[str, Any] = {
        "model": MODEL,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "weather?"}],
        "tools": [TOOL],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    }
    counted = claude.messages.count_tokens(**prompt)
    ran = claude.messages.create(max_tokens=100, **prompt)
    print(counted.model_dump_json(), ran.usage.model_dump_json())
    assert counted.input_tokens == ran.usage.input_tokens > 0
