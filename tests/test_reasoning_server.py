"""Reasoning models over real HTTP on every backend: the thinking demo model (``<think>``/``</think>``
tokens, a Qwen3-like template) with ``option.reasoning_parser=qwen3``.

The random model never closes its thinking by itself, so the tests force it: ``logit_bias`` on the
``</think>`` token makes it the first token (the rest is the model's own). What they show: the
chat_template_kwargs switch changes the rendered prompt, assistant thinking sent back reaches the
template, the thinking and the answer come apart (streamed alike), and a constraint (structured
output, a forced tool call) holds back until the thinking ends, on the HF engine by its own check and
on vLLM by vLLM's reasoning parser.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.conftest import ServerProcess
from tests.test_backend_parity import BACKENDS, Servers, post, sse_chunks

pytestmark = pytest.mark.slow

USER = [{"role": "user", "content": "hello world"}]
END = 511  # the thinking demo model's "</think>" token (the last of its vocabulary)
FORCE_END = {str(END): 100}
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, thinking_demo_model: Path) -> Iterator[Servers]:
    pool = Servers(
        tmp_path_factory.mktemp("reasoning"), thinking_demo_model, {"option.reasoning_parser": "qwen3"}
    )
    yield pool
    pool.close()


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: pytest.FixtureRequest, servers: Servers) -> ServerProcess:
    return servers.get(request.param)


def chat(server: ServerProcess, path: str = "/v1/chat/completions", **body: Any) -> dict[str, Any]:
    return post(server, path, {"messages": USER, "temperature": 0, **body})


def prompt_tokens(server: ServerProcess, **body: Any) -> int:
    return int(chat(server, max_tokens=1, **body)["usage"]["prompt_tokens"])


def joined(chunks: list[dict[str, Any]], key: str) -> str:
    return "".join(c["choices"][0]["delta"].get(key) or "" for c in chunks if c["choices"])


def test_the_thinking_switch_changes_the_rendered_prompt(server: ServerProcess) -> None:
    thinking = prompt_tokens(server)
    assert prompt_tokens(server, chat_template_kwargs={"enable_thinking": True}) == thinking
    # enable_thinking=false closes an empty block in the prompt: "<think>\n\n</think>\n\n".
    closed = prompt_tokens(server, chat_template_kwargs={"enable_thinking": False})
    assert closed > thinking
    native = post(
        server,
        "/invocations",
        {"messages": USER, "max_tokens": 1, "chat_template_kwargs": {"enable_thinking": False}},
    )
    assert native["usage"]["prompt_tokens"] == closed


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_assistant_thinking_sent_back_reaches_the_template(server: ServerProcess, field: str) -> None:
    def history(**thinking: str) -> list[dict[str, Any]]:
        return [*USER, {"role": "assistant", "content": "hi", **thinking}, *USER]

    bare = prompt_tokens(server, messages=history())
    assert prompt_tokens(server, messages=history(**{field: "the user greets me"})) > bare


def test_the_thinking_and_the_answer_come_apart(server: ServerProcess) -> None:
    # Unforced, the model never ends its thinking: everything is thinking.
    free = chat(server, max_tokens=6, logprobs=True)["choices"][0]
    raw = "".join(t["token"] for t in free["logprobs"]["content"])
    assert free["message"]["reasoning_content"] == free["message"]["reasoning"] == raw
    assert free["message"]["content"] == ""
    # Forced to end it at once: no thinking, the rest is the answer.
    body = {"max_tokens": 6, "logit_bias": FORCE_END, "logprobs": True, "ignore_eos": True}
    forced = chat(server, **body)["choices"][0]
    tokens = [t["token"] for t in forced["logprobs"]["content"]]
    assert tokens[0] == "</think>"
    assert forced["message"]["reasoning_content"] is None
    assert forced["message"]["content"] == "".join(tokens[1:])
    chunks = sse_chunks(server, "/v1/chat/completions", {"messages": USER, "temperature": 0, **body})
    assert joined(chunks, "content") == forced["message"]["content"]
    assert joined(chunks, "reasoning_content") == joined(chunks, "reasoning") == ""
    streamed_free = sse_chunks(
        server, "/v1/chat/completions", {"messages": USER, "temperature": 0, "max_tokens": 6}
    )
    assert joined(streamed_free, "reasoning") == raw and joined(streamed_free, "content") == ""


def test_include_reasoning_false_drops_the_thinking(server: ServerProcess) -> None:
    message = chat(server, max_tokens=6, include_reasoning=False)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": ""}


def test_structured_output_is_constrained_after_the_thinking_ends(server: ServerProcess) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}
    # "</think>" is not JSON: the forced token comes first only because the grammar waits for it.
    choice = chat(server, max_tokens=60, response_format=fmt, logit_bias=FORCE_END, logprobs=True)["choices"][
        0
    ]
    assert choice["logprobs"]["content"][0]["token"] == "</think>"
    assert choice["finish_reason"] == "stop" and choice["message"]["reasoning_content"] is None
    jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    # Thinking off: the grammar starts at once, and the bias cannot place the tag.
    off = {"enable_thinking": False}
    choice = chat(
        server,
        max_tokens=60,
        response_format=fmt,
        logit_bias=FORCE_END,
        logprobs=True,
        chat_template_kwargs=off,
    )["choices"][0]
    assert choice["logprobs"]["content"][0]["token"] != "</think>"
    jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    assert "reasoning_content" not in choice["message"]


def test_a_required_tool_call_comes_after_the_thinking(server: ServerProcess) -> None:
    body = {"max_tokens": 80, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
    choice = chat(server, **body, logit_bias=FORCE_END)["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMA)
    chunks = sse_chunks(
        server, "/v1/chat/completions", {"messages": USER, "temperature": 0, **body, "logit_bias": FORCE_END}
    )
    arguments = "".join(
        call["function"]["arguments"]
        for c in chunks
        if c["choices"]
        for call in c["choices"][0]["delta"].get("tool_calls") or []
    )
    assert arguments == call["function"]["arguments"]
