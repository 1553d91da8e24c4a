"""Structured outputs over real HTTP on every backend: the random demo model babbles, so every valid
output proves the constraint did the work.

One ``lmi serve`` per backend (``tests.test_backend_parity.Servers``) with a batch of 16, so that 16
concurrent requests with 16 different schemas decode in one batch alongside free ones.
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
        {"option.max_rolling_batch_size": "16", "option.max_model_len": "512"},
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
