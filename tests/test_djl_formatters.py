"""DJL's custom formatters on every backend: the same ``model.py`` on ``hf`` (main suite) and ``vllm``
(``make test-vllm``), each served by a real ``lmi serve`` (``test_backend_parity.Servers``).

The formatters run in the worker beside each engine, with its tokenizer, so what differs between the
backends is only where the engine's tokenizer comes from; what a client sees must be the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_backend_parity import BACKENDS, TIMEOUT, Servers
from tests.test_djl_compat import FORMATTERS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Servers]:
    model = tmp_path_factory.mktemp("formatters") / "model"
    model.mkdir()
    for item in demo_model.iterdir():
        if item.name != "serving.properties":
            (model / item.name).symlink_to(item)
    (model / "model.py").write_text(FORMATTERS)
    (model / "neighbour.py").write_text('NAME = "base"\n')
    pool = Servers(tmp_path_factory.mktemp("formatter-servers"), model)
    yield pool
    pool.close()


@pytest.fixture(scope="module", params=BACKENDS)
def url(request: pytest.FixtureRequest, servers: Servers) -> str:
    return servers.get(request.param).url


def post(url: str, body: dict[str, Any], status: int = 200) -> httpx.Response:
    response = httpx.post(f"{url}/invocations", json=body, timeout=TIMEOUT)
    assert response.status_code == status, response.text
    return response


def test_formatters_map_the_payload_and_mark_every_result(url: str) -> None:
    body = {"inputPrompt": "hello world", "parameters": {"maxOutputToken": 4, "details": True}}
    result = post(url, body).json()
    assert result["custom_formatter_applied"] and result["details"]["generated_tokens"] == 4
    lines = [json.loads(line) for line in post(url, {**body, "stream": True}).text.splitlines() if line]
    assert len(lines) == 4 and all(line["processed_by"] == "base" for line in lines)
    assert "".join(line["token"]["text"] for line in lines) == lines[-1]["generated_text"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert post(url, chat).json()["object"] == "chat.completion"
    assert post(url, chat).json()["custom_formatter_applied"]


def test_the_engines_tokenizer_reaches_the_input_formatter(url: str, demo_model: Path) -> None:
    from transformers import AutoTokenizer

    count = len(AutoTokenizer.from_pretrained(demo_model).encode("hello world"))
    result = post(url, {"inputs": "x", "count_tokens": True, "parameters": {"details": True}}).json()
    assert result["details"]["inputs"] == f"tokens {count}"


def test_a_failing_formatter_is_a_424_and_the_worker_serves_on(url: str) -> None:
    assert "custom_input_formatter" in post(url, {"inputs": "hi", "fail_input": True}, 424).json()["message"]
    assert (
        "custom_output_formatter" in post(url, {"inputs": "hi", "fail_output": True}, 424).json()["message"]
    )
    assert post(url, {"inputs": "hi", "parameters": {"max_new_tokens": 2}}).json()["processed_by"] == "base"
