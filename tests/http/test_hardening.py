"""Hostile bodies get a 400 naming the field, and an unexpected failure still a JSON error that
closes the connection, on every route shape (in-process, over the real routes and middleware)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lmi_core.serving.pool import ModelStatus
from lmi_core.serving.registry import ModelState
from tests.http.fakes import FakeModels, client, model, pool, worker

DEEP = b"[" * 10_000 + b"]" * 10_000
LONE = "\udc00"


def _models() -> FakeModels:
    return FakeModels(model("demo", pool("demo", worker(0))))


def _openai(response: Any) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    return error


@pytest.mark.parametrize("path", ["/invocations", "/v1/completions", "/v1/chat/completions", "/models"])
def test_json_nested_10000_deep_is_a_400_in_the_routes_shape(path: str) -> None:
    http = client(_models())
    response = http.post(path, content=DEEP, headers={"content-type": "application/json"})
    assert response.status_code == 400
    body = _openai(response) if path.startswith("/v1/") else response.json()
    assert "nested deeper" in body["message"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/invocations", {"inputs": LONE}, "inputs"),
        ("/invocations", {"inputs": "hi", "parameters": {"stop": ["a", LONE]}}, "parameters.stop[1]"),
        ("/invocations", {"messages": [{"role": "user", "content": LONE}]}, "messages[0].content"),
        ("/v1/completions", {"prompt": ["ok", "x" + LONE]}, "prompt[1]"),
        ("/v1/completions", {"prompt": "hi", "stop": LONE}, "stop"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]},
            "messages[0].content[0].text",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], LONE: 1}, "body"),
    ],
)
def test_a_lone_surrogate_anywhere_is_a_400_naming_the_field(
    path: str, body: dict[str, Any], field: str
) -> None:
    models = _models()
    http = client(models)
    # ensure_ascii (the default) writes the surrogate as the escape \udc00: valid JSON, invalid text.
    response = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = _openai(response) if path.startswith("/v1/") else response.json()
    assert error["param"] == field and "surrogate" in error["message"]
    assert models.served_models["demo"].requests == []  # nothing reached the engine


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/invocations", b'{"inputs": "a\xed\xa0\x80b"}', "inputs"),
        ("/v1/completions", b'{"prompt": ["ok", "a\xed\xa0\x80b"]}', "prompt[1]"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "\xff"}]}',
            "messages[0].content",
        ),
        ("/invocations", b'{"inputs": "hi", "parameters": {"stop": ["\xc0\xaf"]}}', "parameters.stop[0]"),
        ("/v1/completions", b'{"prompt": "hi", "\x80": 1}', "body"),
    ],
)
def test_raw_bytes_that_are_not_utf8_are_a_400_naming_the_field(path: str, body: bytes, field: str) -> None:
    """ED A0 80 is a surrogate encoded as UTF-8: ``json.loads`` of bytes let it through as a lone
    surrogate, which failed only when the request was packed for the worker (a 500)."""
    models = _models()
    response = client(models).post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = _openai(response) if path.startswith("/v1/") else response.json()
    assert error["param"] == field and "not valid UTF-8" in error["message"]
    assert models.served_models["demo"].requests == []


def test_a_utf8_bom_is_skipped() -> None:
    response = client(_models()).post("/invocations", content=b'\xef\xbb\xbf{"inputs": "hi"}')
    assert response.status_code == 200


def test_a_surrogate_pair_is_text_and_passes() -> None:
    http = client(_models())
    response = http.post("/invocations", content=b'{"inputs": "\\ud83d\\ude00"}')
    assert response.status_code == 200


def test_an_unknown_field_with_control_characters_is_listed_escaped() -> None:
    # Found by the schemathesis fuzz: a raw "\r" in x-lmi-ignored-fields broke the response.
    http = client(_models())
    body = {"\r": None, "b\u00e9": 1, "messages": [{"role": "user", "content": "hi"}]}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["x-lmi-ignored-fields"] == "\\r,b\\xe9"


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("path", ["/invocations", "/v1/completions"])
def test_an_unexpected_exception_is_a_json_error_in_the_routes_shape_that_closes_the_connection(
    path: str,
) -> None:
    models = _models()

    async def broken(request: Any, hint: Any = None) -> Any:
        raise Boom("a bug")
        yield  # an async generator, like a real pool's

    models.served_models["demo"].generate = broken  # type: ignore[method-assign]
    http = client(models)
    body = {"inputs": "hi"} if path == "/invocations" else {"prompt": "hi"}
    response = http.post(path, json=body)
    assert response.status_code == 500
    assert response.headers["connection"] == "close"
    assert "x-request-id" in response.headers
    if path.startswith("/v1/"):
        assert _openai(response)["type"] == "server_error"
    else:
        assert response.json()["code"] == 500 and "Boom" in response.json()["message"]


def test_live_is_200_while_a_model_loads_or_failed_and_needs_no_key() -> None:
    loading = model("a", state=ModelState.LOADING)
    failed = model("b", pool("b", status=ModelStatus.FAILED), state=ModelState.FAILED, error="boom")
    http = client(FakeModels(loading, failed), api_key="k")
    assert http.get("/ping").status_code == 500
    live = http.get("/live")
    assert live.status_code == 200 and live.json() == {"status": "alive"}
