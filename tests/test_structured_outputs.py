"""Structured outputs over real HTTP on every backend: the random demo model babbles, so every valid
output proves the constraint did the work.

One ``lmi serve`` per backend (``tests.test_backend_parity.Servers``) with a batch of 16, so that 16
concurrent requests with 16 different schemas decode in one batch alongside free ones; tool calling
(``tool_choice`` required and named are constraints too) runs on the same servers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from tests.conftest import ServerProcess
from tests.test_backend_parity import BACKENDS, TIMEOUT, Servers, post, sse_chunks

pytestmark = pytest.mark.slow

USER = [{"role": "user", "content": "Give me the record."}]
MAX_TOKENS = 400  # far above what the bounded schemas below need in compact JSON (measured: <= 120)

# Bounded schemas (every string, array and integer has a limit): their compact outputs always end
# (an unbounded integer lets the demo model emit digits until max_tokens: measured, greedy).
SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "maximum": 150},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
        "required": ["color", "ok"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "matrix": {
                "type": "array",
                "maxItems": 3,
                "items": {
                    "type": "array",
                    "maxItems": 3,
                    "items": {"type": "integer", "minimum": 0, "maximum": 99},
                },
            }
        },
        "required": ["matrix"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "code": {"type": "string", "minLength": 2, "maxLength": 5},
            "count": {"type": "integer", "minimum": -5, "maximum": 5},
        },
        "required": ["code", "count"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 999},
                    "roles": {"type": "array", "maxItems": 2, "items": {"enum": ["admin", "dev"]}},
                },
                "required": ["id", "roles"],
                "additionalProperties": False,
            },
            "note": {"type": ["string", "null"], "maxLength": 8},
        },
        "required": ["user", "note"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "minItems": 1,
        "maxItems": 4,
        "items": {"type": "integer", "minimum": -9, "maximum": 9},
    },
]
REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(yes|no), because [a-z]{1,10}", r"[A-Z][a-z]{2,8} [0-9]{1,2}"]
CHOICES = ["positive", "negative", "neutral ish", "ünïcode"]
# Lark, as vLLM's guidance backend takes it (GBNF is translated by the same compiler).
LARK = 'start: "(" num (" + " num)* ")"\nnum: /[1-9][0-9]?/'
LARK_MATCH = re.compile(r"\([1-9][0-9]?( \+ [1-9][0-9]?)*\)")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Servers]:
    pool = Servers(
        tmp_path_factory.mktemp("structured"),
        demo_model,
        {
            "option.max_rolling_batch_size": "16",
            "option.max_model_len": "512",
            "option.enable_auto_tool_choice": "true",
            "option.tool_call_parser": "hermes",
        },
    )
    yield pool
    pool.close()


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: pytest.FixtureRequest, servers: Servers) -> ServerProcess:
    return servers.get(request.param)


def chat(server: ServerProcess, status: int = 200, **body: Any) -> dict[str, Any]:
    return post(server, "/v1/chat/completions", {"messages": USER, "max_tokens": MAX_TOKENS, **body}, status)


def content(result: dict[str, Any]) -> str:
    choice = result["choices"][0]
    assert choice["finish_reason"] == "stop", choice  # ended by the grammar, not by max_tokens
    return str(choice["message"]["content"])


def sampling(i: int) -> dict[str, Any]:
    """Request ``i``'s sampling: every fourth greedy, the rest sampled with their own seed."""
    return {"temperature": 0} if i % 4 == 0 else {"temperature": 1.0, "seed": i}


def json_schema_format(schema: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "record", "schema": schema, "strict": strict}}


def test_hundred_json_schema_generations_all_validate(server: ServerProcess) -> None:
    def one(i: int) -> tuple[dict[str, Any], str]:
        schema = SCHEMAS[i % len(SCHEMAS)]
        return schema, content(chat(server, response_format=json_schema_format(schema), **sampling(i)))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(100)))
    for schema, text in results:
        jsonschema.validate(json.loads(text), schema)  # json.loads is RFC 8259 strict on control chars
        assert text == text.strip() and "\n" not in text  # the compact whitespace default


def test_every_spelling_of_a_json_constraint(server: ServerProcess) -> None:
    schema = SCHEMAS[1]
    spellings: list[dict[str, Any]] = [
        {"response_format": json_schema_format(schema, strict=False)},
        {"structured_outputs": {"json": schema}},
        {"structured_outputs": {"json": json.dumps(schema)}},
        {"guided_json": schema},
    ]
    for body in spellings:
        jsonschema.validate(json.loads(content(chat(server, **body))), schema)
    for body in ({"response_format": {"type": "json_object"}}, {"structured_outputs": {"json_object": True}}):
        # Any object: the demo model may babble one key until max_tokens; what it ends is an object.
        choice = chat(server, max_tokens=60, **body)["choices"][0]
        text = choice["message"]["content"]
        assert text.startswith("{")
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(text), dict)
    native = post(
        server,
        "/invocations",
        {
            "inputs": "record:",
            "parameters": {"max_new_tokens": MAX_TOKENS, "response_format": json_schema_format(schema)},
        },
    )
    jsonschema.validate(json.loads(native["generated_text"]), schema)


def test_regex_outputs_full_match(server: ServerProcess) -> None:
    for i, regex in enumerate(REGEXES * 3):
        body = {"structured_outputs": {"regex": regex}} if i % 2 else {"guided_regex": regex}
        assert re.fullmatch(regex, content(chat(server, **body, **sampling(i)))), regex
    native = post(
        server,
        "/invocations",
        {"inputs": "call", "parameters": {"max_new_tokens": 50, "structured_outputs": {"regex": REGEXES[0]}}},
    )
    assert re.fullmatch(REGEXES[0], native["generated_text"])
    completion = post(
        server, "/v1/completions", {"prompt": "n:", "max_tokens": 50, "guided_regex": REGEXES[0], "seed": 1}
    )
    assert re.fullmatch(REGEXES[0], completion["choices"][0]["text"])


def test_choice_outputs_are_one_of_the_choices(server: ServerProcess) -> None:
    for i in range(12):
        body = {"guided_choice": CHOICES} if i % 2 else {"structured_outputs": {"choice": CHOICES}}
        assert content(chat(server, **body, **sampling(i))) in CHOICES


def test_lark_grammar_outputs_match(server: ServerProcess) -> None:
    for i in range(6):
        body = {"guided_grammar": LARK} if i % 2 else {"structured_outputs": {"grammar": LARK}}
        assert LARK_MATCH.fullmatch(content(chat(server, **body, **sampling(i))))


def test_streamed_equals_non_streamed_for_the_same_seed(server: ServerProcess) -> None:
    for i, schema in enumerate(SCHEMAS):
        body = {
            "messages": USER,
            "max_tokens": MAX_TOKENS,
            "response_format": json_schema_format(schema),
            **sampling(i + 1),
        }
        whole = post(server, "/v1/chat/completions", body)["choices"][0]["message"]["content"]
        chunks = sse_chunks(server, "/v1/chat/completions", body)
        streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert streamed == whole
        jsonschema.validate(json.loads(streamed), schema)


def test_sixteen_concurrent_requests_with_different_schemas(server: ServerProcess) -> None:
    # 16 distinct schemas (a bounded integer each) plus free requests, all in flight at once.
    schemas = [
        {
            "type": "object",
            "properties": {f"k{i}": {"type": "integer", "minimum": i, "maximum": i + 3}},
            "required": [f"k{i}"],
            "additionalProperties": False,
        }
        for i in range(16)
    ]

    def one(i: int) -> str:
        if i >= 16:  # unconstrained rows sharing the batch
            body = {"messages": USER, "max_tokens": 20, "ignore_eos": True}
            return str(post(server, "/v1/chat/completions", body)["choices"][0]["message"]["content"])
        return content(chat(server, response_format=json_schema_format(schemas[i]), **sampling(i + 1)))

    with ThreadPoolExecutor(20) as pool:
        texts = list(pool.map(one, range(20)))
    for schema, text in zip(schemas, texts, strict=False):
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (
            {"response_format": json_schema_format({"type": "foo"})},
            "response_format.json_schema.schema",
            "foo",
        ),
        ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs.regex", "unclosed group"),
        ({"guided_regex": "(("}, "guided_regex", "unclosed group"),
        ({"structured_outputs": {"grammar": "start: nope"}}, "structured_outputs.grammar", "nope"),
        ({"guided_grammar": "start: nope"}, "guided_grammar", "nope"),
        # Neither Lark nor GBNF: once a 500 (GbnfToLarkError), found by tests/test_fuzz_http.py.
        ({"guided_grammar": "x"}, "guided_grammar", "not a GBNF grammar"),
        ({"structured_outputs": {"grammar": "root ::= ["}}, "structured_outputs.grammar", "GBNF"),
        ({"guided_json": "{not json"}, "guided_json", ""),
        ({"guided_choice": []}, "guided_choice", ""),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "only one"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type", ""),
        ({"structured_outputs": {"jsonn": {}}}, "structured_outputs.jsonn", "unknown"),
    ],
)
def test_invalid_constraints_are_a_400_naming_the_field(
    server: ServerProcess, body: dict[str, Any], param: str, message: str
) -> None:
    error = chat(server, status=400, **body)["error"]
    assert error["param"] == param and message in error["message"], error


def test_invalid_constraint_on_the_native_api_names_the_parameter(server: ServerProcess) -> None:
    body = {"inputs": "x", "parameters": {"structured_outputs": {"regex": "a(b"}}}
    response = httpx.post(f"{server.url}/invocations", json=body, timeout=TIMEOUT)
    assert response.status_code == 400, response.text
    assert "parameters.structured_outputs.regex" in response.text and "unclosed group" in response.text


# -- tool calling --------------------------------------------------------------------------------

SMALL_INT = {"type": "integer", "minimum": 0, "maximum": 99}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 10},
                    "unit": {"enum": ["C", "F"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "maximum": 99},
                    "b": {"type": "integer", "maximum": 99},
                },
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
WEATHER_CHOICE = {"type": "function", "function": {"name": "get_weather"}}


def check_calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The message's tool calls, each to a listed tool with arguments valid for it."""
    calls = message["tool_calls"]
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMETERS[call["function"]["name"]])
    return list(calls)


def streamed_calls(chunks: list[dict[str, Any]]) -> tuple[list[tuple[str, str]], str | None]:
    """The (name, arguments) calls that OpenAI-shaped tool_calls deltas add up to, and the finish."""
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in chunks:
        for choice in chunk["choices"]:
            finish = choice["finish_reason"] or finish
            for delta in choice["delta"].get("tool_calls") or []:
                function = delta["function"]
                if "id" in delta:  # the first delta of a call: id, type and name, once
                    assert delta["index"] not in calls and delta["type"] == "function"
                    calls[delta["index"]] = [function["name"], ""]
                else:
                    assert "name" not in function
                calls[delta["index"]][1] += function["arguments"]
    return [(n, a) for n, a in (calls[i] for i in sorted(calls))], finish


def test_tool_choice_required_always_calls_a_listed_tool(server: ServerProcess) -> None:
    def one(i: int) -> dict[str, Any]:
        # 160 tokens: one bounded call takes ~40; parallel calls may go on (cut: finish "length").
        body = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": i % 3 != 0}
        return chat(server, **body, **sampling(i), max_tokens=160)["choices"][0]

    with ThreadPoolExecutor(8) as pool:
        choices = list(pool.map(one, range(16)))
    for i, choice in enumerate(choices):
        if choice["finish_reason"] == "length":  # parallel calls: the model may go on calling
            assert i % 3 != 0
            continue
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        calls = check_calls(choice["message"])
        assert len(calls) >= 1 and (len(calls) == 1 or i % 3 != 0)


def test_named_tool_choice_calls_that_function_and_finishes_with_stop(server: ServerProcess) -> None:
    for i in range(6):
        choice = chat(server, tools=TOOLS, tool_choice=WEATHER_CHOICE, **sampling(i))["choices"][0]
        assert choice["finish_reason"] == "stop"
        [call] = check_calls(choice["message"])
        assert call["function"]["name"] == "get_weather"


@pytest.mark.parametrize("tool_choice", ["required", WEATHER_CHOICE])
def test_streamed_tool_calls_add_up_to_the_non_streamed_ones(server: ServerProcess, tool_choice: Any) -> None:
    for seed in (1, 2, 3):
        body = {
            "messages": USER,
            "max_tokens": MAX_TOKENS,
            "tools": TOOLS,
            "tool_choice": tool_choice,
            "parallel_tool_calls": False,
            "temperature": 1.0,
            "seed": seed,
        }
        response = post(server, "/v1/chat/completions", body)
        whole = response["choices"][0]
        expected = [
            (c["function"]["name"], c["function"]["arguments"]) for c in check_calls(whole["message"])
        ]
        usage = {"include_usage": True, "continuous_usage_stats": True}
        chunks = sse_chunks(server, "/v1/chat/completions", {**body, "stream_options": usage})
        calls, finish = streamed_calls(chunks)
        assert calls == expected and finish == whole["finish_reason"]
        # The running usage counts the tokens of a tool-call stream too (it said 0/0/0 in every chunk).
        # The opening role chunk leaves before the first token, which brings the prompt's count.
        running = [
            (c["usage"]["prompt_tokens"], c["usage"]["completion_tokens"])
            for c in chunks
            if c["choices"] and "role" not in c["choices"][0]["delta"]
        ]
        prompt, completion = response["usage"]["prompt_tokens"], response["usage"]["completion_tokens"]
        assert all(p == prompt for p, _ in running) and running[-1][1] == completion
        assert [n for _, n in running] == sorted(n for _, n in running)
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == response["usage"]


def test_auto_tool_choice_reads_the_model_text_with_its_parser(server: ServerProcess) -> None:
    # The demo model never writes <tool_call>: auto answers its babble as content, streamed alike.
    body = {"messages": USER, "max_tokens": 30, "tools": TOOLS, "temperature": 0, "ignore_eos": True}
    choice = post(server, "/v1/chat/completions", body)["choices"][0]
    assert choice["message"]["tool_calls"] == [] and choice["finish_reason"] == "length"
    chunks = sse_chunks(server, "/v1/chat/completions", body)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == choice["message"]["content"]


def test_tool_messages_and_earlier_calls_are_accepted(server: ServerProcess) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    messages = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]
    body = {"messages": messages, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
    check_calls(
        post(server, "/v1/chat/completions", {**body, "max_tokens": MAX_TOKENS})["choices"][0]["message"]
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}]},
            "tools",
        ),
        ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "guided_regex"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ],
)
def test_invalid_tool_requests_are_a_400_naming_the_field(
    server: ServerProcess, body: dict[str, Any], param: str
) -> None:
    if param == "tools":
        body = {**body, "tool_choice": "required"}
    error = chat(server, status=400, **body)["error"]
    assert error["param"] == param, error
