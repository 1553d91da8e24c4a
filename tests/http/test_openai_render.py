"""Streamed OpenAI responses over a fake ``ModelService``: the running usage, with and without tools."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.http.fakes import FakeModel, FakeModels, client, model, pool, worker

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
AUTO = {"enable_auto_tool_choice": "true", "tool_call_parser": "hermes"}


def stream_chunks(models: FakeModels, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = client(models).post("/v1/chat/completions", json={**body, "stream": True})
    assert response.status_code == 200, response.text
    events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("tools", [False, True])
def test_continuous_usage_counts_every_token_with_or_without_tools(tools: bool) -> None:
    models = FakeModels(model("a", pool("a", worker(0))))
    models.served_models["a"] = FakeModel("a", tokens=("Hel", "lo", "!"), options=AUTO)
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": "hi"}],
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    if tools:
        body["tools"] = [TOOL]
    chunks = stream_chunks(models, body)
    content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == "Hello!"
    # The fake's first token carries the prompt's 3 tokens, as engines do; each token counts once.
    assert [(c["usage"]["prompt_tokens"], c["usage"]["completion_tokens"]) for c in content] == [
        (3, 1),
        (3, 2),
        (3, 3),
    ]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 6
