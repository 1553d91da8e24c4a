"""Reasoning output and chat_template_kwargs on the chat API, over a fake ``ModelService`` whose engine
streams fixed token texts: the thinking in both ``reasoning_content`` and ``reasoning`` (message and
delta), the answer alone in ``content``, streamed deltas joining to the whole message, on
/v1/chat/completions and chat on /invocations; include_reasoning; tools and constraints after the
thinking; the kwargs reaching the engine; assistant thinking sent back."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lmi_core.engine import GenerationRequest
from tests.http.fakes import FakeModel, FakeModels, client, model, pool, worker

# Qwen3's shape, cut where a tokenizer might cut it: the end tag split across two tokens.
THOUGHT = ("<think>", "\nThe user", " says hi.", "\n</th", "ink>", "\n\nHello", "!")
REASONING = "\nThe user says hi.\n"
ANSWER = "\n\nHello!"
USER = [{"role": "user", "content": "hi"}]
QWEN3 = {"reasoning_parser": "qwen3"}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def served(tokens: tuple[str, ...] = THOUGHT, **options: str) -> tuple[FakeModels, FakeModel]:
    models = FakeModels(model("m", pool("m", worker(0))))
    fake = models.served_models["m"] = FakeModel("m", tokens=tokens, options={**QWEN3, **options})
    return models, fake


def chat(models: FakeModels, **body: Any) -> dict[str, Any]:
    response = client(models).post("/v1/chat/completions", json={"messages": USER, **body})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def stream(models: FakeModels, **body: Any) -> list[dict[str, Any]]:
    response = client(models).post("/v1/chat/completions", json={"messages": USER, **body, "stream": True})
    assert response.status_code == 200, response.text
    events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e)["choices"][0] for e in events[:-1]]


def joined(choices: list[dict[str, Any]], key: str) -> str:
    return "".join(c["delta"].get(key) or "" for c in choices)


def test_the_thinking_comes_apart_from_the_answer_under_both_names() -> None:
    models, _ = served()
    message = chat(models)["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": ANSWER,
        "reasoning_content": REASONING,
        "reasoning": REASONING,
    }


def test_streamed_deltas_join_to_the_whole_message() -> None:
    models, _ = served()
    choices = stream(models)
    assert choices[0]["delta"] == {"role": "assistant", "content": ""}
    assert joined(choices, "reasoning_content") == joined(choices, "reasoning") == REASONING
    assert joined(choices, "content") == ANSWER
    for choice in choices[1:]:  # each delta carries one kind of text; both names say the same
        delta = choice["delta"]
        assert delta.get("reasoning_content") == delta.get("reasoning")
        assert not ("content" in delta and "reasoning" in delta)
    assert choices[-1]["finish_reason"] == "length"
    # No delta holds part of a tag: the split end tag was held back until it was whole.
    assert "</th" not in joined(choices, "reasoning_content")


def test_chat_on_invocations_carries_the_thinking_too() -> None:
    models, _ = served()
    response = client(models).post("/invocations", json={"messages": USER})
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"], message["reasoning"]) == (
        ANSWER,
        REASONING,
        REASONING,
    )
    lines = client(models).post("/invocations", json={"messages": USER, "stream": True}).text.splitlines()
    choices = [json.loads(line)["choices"][0] for line in lines if line]
    assert joined(choices, "reasoning_content") == REASONING and joined(choices, "content") == ANSWER


def test_include_reasoning_false_drops_the_thinking_and_keeps_the_answer_alone() -> None:
    models, _ = served()
    message = chat(models, include_reasoning=False)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": ANSWER}
    choices = stream(models, include_reasoning=False)
    assert joined(choices, "content") == ANSWER
    assert not any("reasoning" in c["delta"] or "reasoning_content" in c["delta"] for c in choices)


def test_a_model_without_a_reasoning_parser_shows_the_text_as_it_is() -> None:
    models = FakeModels(model("m", pool("m", worker(0))))
    models.served_models["m"] = FakeModel("m", tokens=THOUGHT)
    assert chat(models)["choices"][0]["message"] == {"role": "assistant", "content": "".join(THOUGHT)}


def test_chat_template_kwargs_reach_the_engine_over_the_models_defaults() -> None:
    models, fake = served(default_chat_template_kwargs='{"enable_thinking": false, "style": "terse"}')
    message = chat(models)["choices"][0]["message"]
    # The model's default turns the thinking off: no parser, the text as it came.
    assert message == {"role": "assistant", "content": "".join(THOUGHT)}
    assert fake.requests[-1].chat_template_kwargs == {"enable_thinking": False, "style": "terse"}
    message = chat(models, chat_template_kwargs={"enable_thinking": True}, n=2)["choices"][1]["message"]
    assert message["reasoning_content"] == REASONING  # the request wins
    assert [r.chat_template_kwargs for r in fake.requests[-2:]] == [
        {"enable_thinking": True, "style": "terse"}
    ] * 2


def test_no_kwargs_anywhere_send_none() -> None:
    models, fake = served()
    chat(models)
    assert fake.requests[-1].chat_template_kwargs is None


@pytest.mark.parametrize("key", ["tokenize", "messages", "add_generation_prompt", "chat_template"])
def test_chat_template_kwargs_cannot_set_what_the_server_sets(key: str) -> None:
    models, fake = served()
    response = client(models).post(
        "/v1/chat/completions", json={"messages": USER, "chat_template_kwargs": {key: True}}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "chat_template_kwargs"
    assert key in response.json()["error"]["message"] and fake.requests == []


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_assistant_thinking_sent_back_reaches_the_template_as_reasoning_content(field: str) -> None:
    models, fake = served()
    history = [*USER, {"role": "assistant", "content": "Hello!", field: "They greeted me."}, *USER]
    response = client(models).post("/v1/chat/completions", json={"messages": history})
    assert response.status_code == 200, response.text
    assert response.headers.get("x-lmi-ignored-fields") is None
    messages = fake.requests[-1].messages
    assert messages is not None and messages[1] == {
        "role": "assistant",
        "content": "Hello!",
        "reasoning_content": "They greeted me.",
    }
    assert "reasoning_content" not in messages[0]


# A tool call after the thinking; the thinking mentions the tag, which must not become a call.
TOOL_THOUGHT = (
    "I could answer with a <tool_",
    'call>{"x": 1}</tool_call> here.</think>',
    'Checking.<tool_call>{"name": "get_weather", ',
    '"arguments": {"city": "Oslo"}}</tool_call>',
)


def test_the_tool_parser_reads_only_the_answer() -> None:
    models, _ = served(TOOL_THOUGHT, enable_auto_tool_choice="true", tool_call_parser="hermes")
    result = chat(models, tools=[TOOL])
    choice = result["choices"][0]
    message = choice["message"]
    assert message["reasoning_content"] == 'I could answer with a <tool_call>{"x": 1}</tool_call> here.'
    assert message["content"] == "Checking."
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
        ("get_weather", '{"city": "Oslo"}')
    ]
    assert choice["finish_reason"] == "length"  # the fake engine ends by length, which stays
    choices = stream(models, tools=[TOOL])
    assert joined(choices, "reasoning") == message["reasoning"] and joined(choices, "content") == "Checking."
    arguments = "".join(
        call["function"]["arguments"] for c in choices for call in c["delta"].get("tool_calls") or []
    )
    assert arguments == '{"city": "Oslo"}'


def structured(request: GenerationRequest) -> tuple[str, str | None] | None:
    constraint = request.params.structured
    return None if constraint is None else (constraint.kind, constraint.starts_after)


@pytest.mark.parametrize(
    "body",
    [
        {"response_format": {"type": "json_object"}},
        {"guided_regex": "[0-9]+"},
        {"tools": [TOOL], "tool_choice": "required"},
        {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    ],
)
def test_a_constraint_applies_after_the_thinking_of_a_request_that_thinks(body: dict[str, Any]) -> None:
    models, fake = served(("</think>", "{}"))
    chat(models, **body)
    kind = "regex" if "guided_regex" in body else "json"
    assert structured(fake.requests[-1]) == (kind, "</think>")
    chat(models, **body, chat_template_kwargs={"enable_thinking": False})
    assert structured(fake.requests[-1]) == (kind, None)  # no thinking: constrained from the start
    plain, plain_fake = served(("{}",), reasoning_parser="deepseek_v3")  # thinks only when asked
    chat(plain, **body)
    assert structured(plain_fake.requests[-1]) == (kind, None)


def test_logprobs_of_held_back_tokens_come_with_the_next_delta() -> None:
    models, _ = served()
    choices = stream(models, logprobs=True)
    tokens = [e["token"] for c in choices for e in (c.get("logprobs") or {}).get("content") or []]
    assert tokens == list(THOUGHT)  # every token's logprob once, in order
    result = chat(models, logprobs=True)["choices"][0]
    assert [e["token"] for e in result["logprobs"]["content"]] == list(THOUGHT)
