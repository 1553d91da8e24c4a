"""The error-dialect table: which shape a path's clients get, each shape's exact body, and its headers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmi_core.errors import BadRequestError, QueueFullError, ServiceError
from lmi_core.http.errors import Dialect, body, dialect_for, render
from tests.http.fakes import FakeModels, client, model, pool, worker


@pytest.mark.parametrize(
    ("path", "dialect"),
    [
        ("/invocations", "djl"),
        ("/predictions/a", "djl"),
        ("/models/a/adapters", "djl"),
        ("/v1", "djl"),
        ("/v1/completions", "openai"),
        ("/v1/chat/completions", "openai"),
        ("/v1/models/a", "openai"),
        ("/v1/no/such/route", "openai"),
        ("/v1/load_lora_adapter", "vllm"),
        ("/v1/unload_lora_adapter", "vllm"),
    ],
)
def test_the_path_picks_the_dialect(path: str, dialect: Dialect) -> None:
    assert dialect_for(path) == dialect


BAD = BadRequestError("max_tokens must be positive", param="max_tokens")


@pytest.mark.parametrize(
    ("exc", "dialect", "expected"),
    [
        (
            BAD,
            "djl",
            {"code": 400, "type": "BadRequestException", "message": str(BAD), "param": "max_tokens"},
        ),
        (ServiceError("boom"), "djl", {"code": 500, "type": "InternalServerError", "message": "boom"}),
        (
            BAD,
            "openai",
            {
                "error": {
                    "message": str(BAD),
                    "type": "invalid_request_error",
                    "param": "max_tokens",
                    "code": 400,
                }
            },
        ),
        (
            ServiceError("boom"),
            "openai",
            {"error": {"message": "boom", "type": "server_error", "param": None, "code": 500}},
        ),
        (
            ServiceError("taken", status=409, type="ConflictException"),
            "openai",
            {"error": {"message": "taken", "type": "invalid_request_error", "param": None, "code": 409}},
        ),
        (
            BAD,
            "vllm",
            {"error": {"message": str(BAD), "type": "BadRequestError", "param": "max_tokens", "code": 400}},
        ),
        (
            ServiceError("no adapter", status=404, type="NotFoundError"),
            "vllm",
            {"error": {"message": "no adapter", "type": "NotFoundError", "param": None, "code": 404}},
        ),
    ],
)
def test_each_dialect_s_body(exc: ServiceError, dialect: Dialect, expected: dict[str, object]) -> None:
    assert body(exc, dialect) == expected
    response = render(exc, dialect)
    assert response.status_code == exc.status and json.loads(response.body) == expected
    assert "retry-after" not in response.headers


@pytest.mark.parametrize("dialect", ["djl", "openai", "vllm"])
def test_a_full_queue_says_when_to_come_back_in_every_dialect(dialect: Dialect) -> None:
    response = render(QueueFullError("the queue is full"), dialect)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"


def test_the_app_answers_every_route_in_its_dialect(tmp_path: Path) -> None:
    http = client(FakeModels(model("a", pool("a", worker(0)))))
    # The exception handler, not a per-route wrapper, picks the dialect.
    assert http.post("/v1/completions", json={"prompt": "x", "n": 0}).json()["error"]["param"] == "n"
    assert http.post("/invocations", json=[]).json()["param"] == "body"
    lora = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nope"})
    assert lora.status_code == 400 and lora.json()["error"]["type"] == "BadRequestError"
    (tmp_path / "serving.properties").write_text("foo=bar\n")
    config = http.post("/models", params={"url": str(tmp_path)})  # a ConfigError: a 400 naming the key
    assert config.status_code == 400 and config.json()["param"] == "foo"
    assert set(config.json()) == {"code", "type", "message", "param"}
    assert config.json()["message"].startswith("invalid configuration foo='bar'")


def test_a_request_naming_no_model_on_a_server_of_several_is_one_400_naming_its_field() -> None:
    http = client(FakeModels(model("a", pool("a", worker(0))), model("b", pool("b", worker(0)))))
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    answers = {
        "model_name": [http.post("/invocations", json={"inputs": "hi"}).json(), http.get("/adapters").json()],
        "model": [
            http.post("/v1/chat/completions", json=chat).json()["error"],
            http.post("/v1/unload_lora_adapter", json={"lora_name": "x"}).json()["error"],
        ],
    }
    for param, errors in answers.items():
        for error in errors:
            assert error["param"] == param
            assert error["message"] == f"{param} is required: the server serves 2 models, not one"
