"""Anthropic's Messages API over a fake ``ModelService``: translation onto chat, the message, the event
sequence, tools, thinking, the error envelope, ``x-api-key`` and what Claude Code sends."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from lmi_core.http.anthropic_protocol import MessagesRequest
from lmi_core.http.anthropic_render import SIGNATURE, ContentBlocks, MessageRender
from lmi_core.http.openai_render import Call
from lmi_core.operations import Tokenize
from tests.http.fakes import FakeModel, FakeModels, client, model, named_events, pool, worker

HERMES = {"enable_auto_tool_choice": "true", "tool_call_parser": "hermes"}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"name": "get_weather", "description": "The weather", "input_schema": SCHEMA}]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
USER = [{"role": "user", "content": "hi"}]


def said(block: dict[str, Any]) -> list[dict[str, Any]]:
    """A conversation of one user message holding ``block``."""
    return [{"role": "user", "content": [block]}]


def models(tokens: tuple[str, ...] = ("Hel", "lo"), finish: str = "eos_token", **options: str) -> FakeModels:
    fakes = FakeModels(model("a", pool("a", worker(0))))
    fakes.served_models["a"] = FakeModel("a", tokens=tokens, options=options, finish=finish)
    return fakes


def events(http: Any, body: dict[str, Any]) -> list[dict[str, Any]]:
    return named_events(http, "/v1/messages", {"model": "a", **body})


def test_a_message_answers_anthropic_s_shape_with_the_chat_output() -> None:
    fakes = models()
    body = {
        "model": "a",
        "max_tokens": 5,
        "system": "Be brief.",
        "messages": USER,
        "metadata": {"user_id": "u"},
    }
    response = client(fakes).post(
        "/v1/messages?beta=true", json=body, headers={"anthropic-version": "2023-06-01"}
    )
    assert response.status_code == 200, response.text
    assert "x-lmi-ignored-fields" not in response.headers
    result = response.json()
    assert result["type"] == "message" and result["role"] == "assistant" and result["id"].startswith("msg_")
    assert result["content"] == [{"type": "text", "text": "Hello"}]
    assert (result["stop_reason"], result["stop_sequence"], result["model"]) == ("end_turn", None, "a")
    assert result["usage"] == {
        "input_tokens": 3,
        "output_tokens": 2,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    request = fakes.served_models["a"].requests[-1]
    assert request.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert request.params.max_new_tokens == 5


@pytest.mark.parametrize(
    ("finish", "stops", "reason", "sequence"),
    [
        ("length", None, "max_tokens", None),
        ("stop_sequence", ["lo"], "stop_sequence", "lo"),
        ("stop_sequence", ["x", "lo"], "stop_sequence", None),  # the engines do not say which one matched
        ("eos_token", None, "end_turn", None),
    ],
)
def test_stop_reasons(finish: str, stops: list[str] | None, reason: str, sequence: str | None) -> None:
    body = {"max_tokens": 5, "messages": USER, "stop_sequences": stops}
    result = client(models(finish=finish)).post("/v1/messages", json=body).json()
    assert (result["stop_reason"], result["stop_sequence"]) == (reason, sequence)


def test_the_stream_is_anthropic_s_event_sequence() -> None:
    http = client(models())
    found = events(http, {"max_tokens": 5, "messages": USER})
    assert [e["type"] for e in found] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = found[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] == 3
    assert found[1]["content_block"] == {"type": "text", "text": ""} and found[1]["index"] == 0
    assert [e["delta"] for e in found[2:4]] == [
        {"type": "text_delta", "text": "Hel"},
        {"type": "text_delta", "text": "lo"},
    ]
    assert found[5]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    whole = http.post("/v1/messages", json={"max_tokens": 5, "messages": USER}).json()
    assert found[5]["usage"] == whole["usage"]


def test_a_tool_call_is_a_tool_use_block_streamed_as_input_json_deltas() -> None:
    fakes = models(tokens=("Sure. ", CALL[:25], CALL[25:]), **HERMES)
    http = client(fakes)
    body = {"max_tokens": 50, "messages": USER, "tools": TOOLS}
    result = http.post("/v1/messages", json=body).json()
    text, use = result["content"]
    assert text == {"type": "text", "text": "Sure. "}
    assert use["type"] == "tool_use" and use["name"] == "get_weather" and use["input"] == {"city": "Paris"}
    assert use["id"] and result["stop_reason"] == "tool_use"
    chat_tools = fakes.served_models["a"].requests[-1].tools
    assert chat_tools == [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "The weather", "parameters": SCHEMA},
        }
    ]
    found = events(http, body)
    starts = [e for e in found if e["type"] == "content_block_start"]
    assert [s["content_block"]["type"] for s in starts] == ["text", "tool_use"]
    assert starts[1]["content_block"]["input"] == {} and starts[1]["index"] == 1
    partial = [e["delta"] for e in found if e["type"] == "content_block_delta" and e["index"] == 1]
    assert all(d["type"] == "input_json_delta" for d in partial)
    assert json.loads("".join(d["partial_json"] for d in partial)) == {"city": "Paris"}
    assert found[-2]["delta"]["stop_reason"] == "tool_use"


def test_tool_results_and_earlier_calls_become_chat_messages() -> None:
    fakes = models()
    body = {
        "max_tokens": 5,
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=1; cch=abc;"},
            {"type": "text", "text": "You are an agent.", "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "need a tool", "signature": "s"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "content": [{"type": "text", "text": "sunny"}],
                    },
                    {"type": "text", "text": "thanks"},
                ],
            },
            {"role": "system", "content": "reminder"},
        ],
        "tools": [*TOOLS, {"type": "web_search_20250305", "name": "web_search"}],
        "tool_choice": {"type": "none"},
    }
    response = client(fakes).post("/v1/messages", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["x-lmi-ignored-fields"] == "tools.1"
    messages = fakes.served_models["a"].requests[-1].messages
    assert messages is not None
    call = {
        "id": "t1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
    }
    assert [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages] == [
        {"role": "system", "content": "You are an agent."},  # the per-request billing header dropped
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
        {"role": "user", "content": "thanks"},
        {"role": "system", "content": "reminder"},
    ]
    translation = MessagesRequest.model_validate(body).translate()
    assert translation.messages[2]["reasoning_content"] == "need a tool"


def test_claude_code_s_extra_fields_are_ignored_and_listed() -> None:
    body = {
        "max_tokens": 5,
        "messages": USER,
        "thinking": {"type": "adaptive", "display": "omitted"},
        "context_management": {"edits": []},
        "output_config": {"effort": "high"},
        "tools": [{**TOOLS[0], "defer_loading": True}],
        "stream": False,
    }
    response = client(models(**HERMES)).post(
        "/v1/messages?beta=true", json=body, headers={"anthropic-beta": "x"}
    )
    assert response.status_code == 200, response.text
    ignored = "context_management,output_config,thinking.display,tools.0.defer_loading"
    assert response.headers["x-lmi-ignored-fields"] == ignored


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": USER}, "max_tokens"),
        ({"max_tokens": 5, "messages": said({"type": "image", "source": {}})},
         "messages.0.content.0.source.type"),
        ({"max_tokens": 5, "messages": said({"type": "image", "source": {"type": "base64"}})},
         "messages.0.content.0.source"),
        ({"max_tokens": 5, "messages": said({"type": "document", "source": {}})}, "messages.0.content.0"),
        ({"max_tokens": 5, "messages": said({"type": "tool_result", "tool_use_id": "t", "content": [
            {"type": "image", "source": {"type": "url", "url": "http://127.0.0.1/x.png"}}]})},
         "messages.0.content.0.content.0"),
        ({"max_tokens": 5, "messages": said({"type": "tool_use", "id": "x", "name": "f", "input": {}})},
         "messages.0.content.0.type"),
        ({"max_tokens": 5, "messages": said({"type": "tool_result"})}, "messages.0.content.0.tool_use_id"),
        ({"max_tokens": 5, "messages": USER, "tools": [{"name": "bad name", "input_schema": {}}]},
         "tools.0.name"),
        ({"max_tokens": 5, "messages": USER, "tool_choice": {"type": "tool"}}, "tool_choice.name"),
        ({"max_tokens": 5, "messages": USER, "stop_sequences": ["a", "b", "c", "d", "e"]}, "stop_sequences"),
    ],
)  # fmt: skip
def test_bad_input_is_a_400_in_anthropic_s_envelope_naming_the_field(
    body: dict[str, Any], field: str
) -> None:
    response = client(models()).post("/v1/messages", json={"model": "a", **body})
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert field in error["error"]["message"]


def test_errors_use_anthropic_s_envelope_and_x_api_key_is_the_api_key() -> None:
    http = client(models(), api_key="s3cret")
    refused = http.post("/v1/messages", json={"max_tokens": 5, "messages": USER})
    assert refused.status_code == 401
    assert refused.json() == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "missing or invalid API key"},
    }
    assert (
        http.post(
            "/v1/messages", json={"max_tokens": 5, "messages": USER}, headers={"x-api-key": "wrong"}
        ).status_code
        == 401
    )
    ok = http.post("/v1/messages", json={"max_tokens": 5, "messages": USER}, headers={"x-api-key": "s3cret"})
    assert ok.status_code == 200
    assert http.get("/v1/models", headers={"x-api-key": "s3cret"}).status_code == 200  # any route
    unknown = http.post(
        "/v1/messages",
        json={"model": "zz", "max_tokens": 5, "messages": USER},
        headers={"x-api-key": "s3cret"},
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"


# -- thinking ----------------------------------------------------------------------------------------


async def chunks(*deltas: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    yield {
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
        "usage": {**usage, "prompt_tokens": 0},
    }
    for delta in deltas:
        yield {"choices": [{"index": 0, "delta": delta, "finish_reason": None}], "usage": usage}
    yield {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage}
    yield {"choices": [], "usage": usage}


async def test_chat_reasoning_becomes_a_thinking_block() -> None:
    call = Call(FakeModel("a"), True, True, 1, [], [""], None, True)
    render = MessageRender(MessagesRequest(max_tokens=5, messages=USER), call)  # type: ignore[arg-type]
    deltas = (
        {"reasoning_content": "Let me "},
        {"reasoning": "think."},
        {"reasoning_content": "!", "content": "Hi"},
    )
    found = [e async for e in render.events(chunks(*deltas))]
    assert [(e["type"], e.get("delta", {}).get("type")) for e in found] == [
        ("message_start", None),
        ("content_block_start", None),
        ("content_block_delta", "thinking_delta"),
        ("content_block_delta", "thinking_delta"),
        ("content_block_delta", "thinking_delta"),
        ("content_block_delta", "signature_delta"),
        ("content_block_stop", None),
        ("content_block_start", None),
        ("content_block_delta", "text_delta"),
        ("content_block_stop", None),
        ("message_delta", None),
        ("message_stop", None),
    ]
    assert (
        found[0]["message"]["usage"]["input_tokens"] == 3
    )  # from the first chunk after the prompt was counted
    assert found[1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    whole = ContentBlocks()
    whole.add({"role": "assistant", "content": "Hi", "reasoning_content": "Let me think.!"})
    whole.close()
    assert whole.blocks == [
        {"type": "thinking", "thinking": "Let me think.!", "signature": SIGNATURE},
        {"type": "text", "text": "Hi"},
    ]


def test_count_tokens_tokenizes_the_prompt_a_message_request_would_run() -> None:
    fakes = models(**HERMES)
    http = client(fakes)
    prompt = {"system": "Be brief.", "messages": USER, "tools": TOOLS, "tool_choice": {"type": "auto"}}
    counted = http.post("/v1/messages/count_tokens?beta=true", json={"model": "a", **prompt})
    assert counted.status_code == 200, counted.text
    assert counted.json() == {"input_tokens": len("Be brief.hi")}  # the fake: one token per character
    assert http.post("/v1/messages", json={"max_tokens": 5, **prompt}).status_code == 200
    fake = fakes.served_models["a"]
    (operation,) = fake.operations
    assert isinstance(operation, Tokenize)
    generated = fake.requests[-1]
    assert (operation.request.messages, operation.request.tools) == (generated.messages, generated.tools)
    assert generated.tools  # the tools the template shows count too
    refused = http.post("/v1/messages/count_tokens", json={"messages": said({"type": "image", "source": {}})})
    assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_request_error"


def test_image_blocks_become_chat_image_parts_in_their_order() -> None:
    png = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
    content = [
        {"type": "text", "text": "Compare "},
        {"type": "image", "source": png},
        {"type": "text", "text": " with "},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
    ]
    request = MessagesRequest.model_validate(
        {"model": "a", "max_tokens": 5, "messages": [{"role": "user", "content": content}]}
    )
    assert request.translate().messages == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "text", "text": " with "},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            ],
        }
    ]
