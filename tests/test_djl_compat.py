"""A DJL Serving model directory served unchanged: custom formatters, handle() models, DJL's output
formatters, TGI mode (huggingface_hub's client) and SageMaker's stateful sessions, on the HF backend.

One real server for the module. Its startup model ``fmt`` is the demo model with a ``model.py`` of
DJL formatters (and a neighbour module it imports), a LoRA adapter whose directory has its own
``model.py``, and sessions kept in a private directory that expire after a few seconds; the tests
register more models on DJL's management route: ``echo`` (a ``handle(inputs)`` model, no weights),
``tgi`` (``option.tgi_compat``) and one model per ``option.output_formatter``. Requests are DJL's
shapes; what each test checks is what DJL's integration client checks (tests/integration/llm/client.py),
written anew.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess, link_model, wait_for
from tests.lora_adapters import build_adapter

pytestmark = pytest.mark.slow

TIMEOUT = 120.0
CONTEXT = 64
EXPIRATION = 3  # seconds a session lives on the fmt model

FORMATTERS = """
from djl_python.input_parser import input_formatter
from djl_python.output_formatter import output_formatter

import neighbour  # the model directory is on sys.path, as DJL puts it on PYTHONPATH

STATE = {"fail_output": False}


@input_formatter
def custom_input_formatter(decoded_payload, tokenizer=None, **kwargs):
    if decoded_payload.pop("fail_input", False):
        raise RuntimeError("Input formatter intentionally failed")
    STATE["fail_output"] = decoded_payload.pop("fail_output", False)
    if "inputPrompt" in decoded_payload:
        decoded_payload["inputs"] = decoded_payload.pop("inputPrompt")
        parameters = decoded_payload.setdefault("parameters", {})
        if "maxOutputToken" in parameters:
            parameters["max_new_tokens"] = parameters.pop("maxOutputToken")
    if decoded_payload.pop("count_tokens", False):  # the engine's tokenizer is given
        decoded_payload["inputs"] = "tokens " + str(len(tokenizer.encode("hello world")))
    return decoded_payload


@output_formatter
def custom_output_formatter(response_data):
    if STATE["fail_output"]:
        raise RuntimeError("Output formatter intentionally failed")
    response_data["custom_formatter_applied"] = True
    response_data["processed_by"] = neighbour.NAME
    return response_data
"""

ADAPTER_FORMATTER = """
from djl_python.output_formatter import output_formatter


@output_formatter
def custom_output_formatter(response_data):
    response_data["processed_by"] = "A"
    return response_data
"""

HANDLER = """
from djl_python import Input, Output

INIT = {}


def handle(inputs: Input):
    if inputs.is_empty():  # DJL's initialization call
        INIT.update(inputs.get_properties())
        return None
    data = inputs.get_as_json()
    if data.get("fail"):
        raise ValueError("model error")
    if data.get("oom"):
        raise MemoryError("out of memory")
    if data.get("requestType"):  # a handler serves its own sessions, as in DJL
        data["session"] = inputs.get_property("X-Amzn-SageMaker-Session-Id")
    out = Output()
    out.add_property("content-type", "application/json")
    out.add_property("x-echo", "1")
    out.add_as_json(
        {
            "echo": data,
            "model_dir": INIT.get("model_dir"),
            "custom_option": INIT.get("custom_option"),
            "content_type": inputs.get_property("Content-Type"),
            "query": inputs.get_as_string("q") if inputs.contains_key("q") else None,
            "tenant": inputs.get_property("tenant"),
        }
    )
    return out
"""


@pytest.fixture(scope="module")
def models(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("djl")
    fmt = link_model(
        demo_model,
        root / "fmt",
        f"option.max_model_len={CONTEXT}\noption.enable_lora=true\n"
        f"option.sessions_path={root / 'sessions'}\noption.sessions_expiration={EXPIRATION}\n",
    )
    (fmt / "model.py").write_text(FORMATTERS)
    (fmt / "neighbour.py").write_text('NAME = "base"\n')
    adapter = build_adapter(demo_model, fmt / "adapters" / "A", seed=1)
    (adapter / "model.py").write_text(ADAPTER_FORMATTER)
    echo = root / "echo"
    echo.mkdir()
    (echo / "model.py").write_text(HANDLER)
    (echo / "serving.properties").write_text("option.custom_option=abc\n")
    link_model(demo_model, root / "tgi", f"option.tgi_compat=true\noption.max_model_len={CONTEXT}\n")
    return root


@pytest.fixture(scope="module")
def server(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {**os.environ, "SERVING_HEALTH_CHECK_INTERVAL": "0.5"}
    log = tmp_path_factory.mktemp("djl-server") / "server.log"
    server = ServerProcess(["--model-dir", str(models / "fmt"), "--model-name", "fmt"], env, log)
    server.wait_ready()
    for name in ("echo", "tgi"):
        register(server, models / name, name)
    yield server
    server.stop()


def register(server: ServerProcess, directory: Path, name: str) -> None:
    response = httpx.post(
        f"{server.url}/models", params={"url": str(directory), "model_name": name}, timeout=TIMEOUT
    )
    assert response.status_code == 200, response.text


def invoke(server: ServerProcess, model: str, body: Any, status: int = 200, **kwargs: Any) -> httpx.Response:
    response = httpx.post(
        f"{server.url}/invocations", params={"model_name": model}, json=body, timeout=TIMEOUT, **kwargs
    )
    assert response.status_code == status, response.text
    return response


def json_lines(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    return [json.loads(e) for e in events if e != "[DONE]"]


# -- custom formatters ---------------------------------------------------------------------------


def test_formatters_take_a_custom_payload_and_mark_the_result(server: ServerProcess) -> None:
    body = {"inputPrompt": "hello world", "parameters": {"maxOutputToken": 5, "details": True}}
    result = invoke(server, "fmt", body).json()
    assert result["custom_formatter_applied"] is True and result["processed_by"] == "base"
    assert result["details"]["generated_tokens"] == 5 and isinstance(result["generated_text"], str)


def test_formatters_run_on_every_streamed_line(server: ServerProcess) -> None:
    body = {"inputPrompt": "hello world", "parameters": {"maxOutputToken": 4}, "stream": True}
    response = invoke(server, "fmt", body)
    assert response.headers["content-type"].startswith("application/jsonlines")
    lines = json_lines(response)
    assert len(lines) == 4 and all(line["custom_formatter_applied"] for line in lines)
    assert "generated_text" in lines[-1]


def test_the_input_formatter_gets_the_engines_tokenizer(server: ServerProcess, demo_model: Path) -> None:
    from transformers import AutoTokenizer

    count = len(AutoTokenizer.from_pretrained(demo_model).encode("hello world"))
    result = invoke(server, "fmt", {"inputs": "x", "count_tokens": True, "parameters": {"details": True}})
    assert result.json()["details"]["inputs"] == f"tokens {count}"


def test_formatters_apply_to_chat_on_the_native_api(server: ServerProcess) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    assert invoke(server, "fmt", chat).json()["processed_by"] == "base"
    chunks = json_lines(invoke(server, "fmt", {**chat, "stream": True}))
    assert chunks and all(
        c["object"] == "chat.completion.chunk" and c["custom_formatter_applied"] for c in chunks
    )


def test_an_adapters_model_py_overrides_the_output_formatter_for_that_adapter(server: ServerProcess) -> None:
    by_body = invoke(
        server, "fmt", {"inputPrompt": "hello", "adapters": "A", "parameters": {"maxOutputToken": 2}}
    )
    assert by_body.json()["processed_by"] == "A"
    headers = {"X-Amzn-SageMaker-Adapter-Identifier": "A"}
    by_header = invoke(
        server, "fmt", {"inputs": "hello", "parameters": {"max_new_tokens": 2}}, headers=headers
    )
    assert by_header.json()["processed_by"] == "A"
    # The adapter's model.py has no input formatter: the base model's still maps the payload.
    assert "custom_formatter_applied" not in by_body.json()
    assert (
        invoke(server, "fmt", {"inputs": "hello", "parameters": {"max_new_tokens": 2}}).json()["processed_by"]
        == "base"
    )


def test_a_failing_formatter_fails_only_its_request_with_a_424_naming_it(server: ServerProcess) -> None:
    error = invoke(server, "fmt", {"inputs": "hi", "fail_input": True}, status=424).json()
    assert error["code"] == 424 and "custom_input_formatter" in error["message"]
    assert "Input formatter intentionally failed" in error["message"]
    error = invoke(server, "fmt", {"inputs": "hi", "fail_output": True}, status=424).json()
    assert "custom_output_formatter" in error["message"]
    lines = json_lines(invoke(server, "fmt", {"inputs": "hi", "fail_output": True, "stream": True}))
    assert lines[-1]["details"]["finish_reason"] == "error" and lines[-1]["error"]["code"] == 424
    assert (
        invoke(server, "fmt", {"inputs": "hi", "parameters": {"max_new_tokens": 2}}).json()["processed_by"]
        == "base"
    )


# -- DJL's request tolerance and status codes -------------------------------------------------------


def test_top_k_minus_one_means_no_top_k(server: ServerProcess) -> None:
    body = {"inputs": "hello", "parameters": {"do_sample": True, "top_k": -1, "seed": 1, "max_new_tokens": 3}}
    assert invoke(server, "fmt", body).json()["generated_text"]


def test_top_level_generation_parameters_are_ignored_as_djl_ignores_them(server: ServerProcess) -> None:
    response = invoke(
        server, "fmt", {"inputs": "hello", "max_new_tokens": 3, "parameters": {"details": True}}
    )
    # DJL reads generation parameters from "parameters" only: its default of 30 tokens applies.
    assert response.json()["details"]["generated_tokens"] > 3
    assert response.headers["x-lmi-ignored-fields"] == "max_new_tokens"


def test_a_streamed_list_of_inputs_is_answered_as_a_batch(server: ServerProcess) -> None:
    body = {"inputs": ["hello", "world"], "parameters": {"max_new_tokens": 2}, "stream": True}
    response = invoke(server, "fmt", body)
    assert response.headers["content-type"] == "application/json"
    assert [r["processed_by"] for r in response.json()] == ["base", "base"]


def test_a_prompt_longer_than_the_context_is_a_424_and_the_server_serves_on(server: ServerProcess) -> None:
    error = invoke(server, "fmt", {"inputs": "fox " * CONTEXT * 2}, status=424).json()
    assert error["code"] == 424 and error["type"] == "PromptTooLongException" and error["param"] == "inputs"
    completion = {"model": "fmt", "prompt": "fox " * CONTEXT * 2, "max_tokens": 2}
    assert httpx.post(f"{server.url}/v1/completions", json=completion, timeout=TIMEOUT).status_code == 400
    assert (
        invoke(server, "fmt", {"inputs": "hi", "parameters": {"max_new_tokens": 1}}).json()["generated_text"]
        is not None
    )


# -- handle() models (DJL's Python engine) ---------------------------------------------------------


def test_a_handle_model_serves_any_request_with_its_output(server: ServerProcess) -> None:
    headers = {"X-Amzn-SageMaker-Custom-Attributes": "tenant=t1;x=y"}
    response = httpx.post(
        f"{server.url}/predictions/echo",
        params={"q": "query"},
        json={"a": 1},
        headers=headers,
        timeout=TIMEOUT,
    )
    assert response.status_code == 200 and response.headers["x-echo"] == "1"
    body = response.json()
    assert body["echo"] == {"a": 1} and body["query"] == "query" and body["tenant"] == "t1"
    assert body["custom_option"] == "abc" and body["model_dir"].endswith("echo")
    assert body["content_type"] == "application/json"
    assert invoke(server, "echo", {"b": 2}).json()["echo"] == {"b": 2}


def test_a_handler_that_raises_answers_djls_424_and_keeps_serving(server: ServerProcess) -> None:
    error = invoke(server, "echo", {"fail": True}, status=424).json()
    assert error == {"code": 424, "message": "invoke handler failure", "error": "model error"}
    assert invoke(server, "echo", {"oom": True}, status=507).status_code == 507
    assert invoke(server, "echo", {"c": 3}).json()["echo"] == {"c": 3}


def test_a_handle_model_has_no_llm_routes(server: ServerProcess) -> None:
    body = {"model": "echo", "prompt": "hi", "max_tokens": 2}
    assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=TIMEOUT).status_code == 400


# -- option.output_formatter ---------------------------------------------------------------------------


@pytest.fixture
def formatted(
    server: ServerProcess, models: Path, demo_model: Path, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A model served with ``option.output_formatter`` set to the test's parameter."""
    name = request.param
    directory = link_model(demo_model, models / f"of_{name}", f"option.output_formatter={name}\n")
    register(server, directory, name)
    yield name
    assert httpx.delete(f"{server.url}/models/{name}", timeout=TIMEOUT).status_code == 200


@pytest.mark.parametrize("formatted", ["sse"], indirect=True)
def test_sse_output_formatter_streams_events(server: ServerProcess, formatted: str) -> None:
    response = invoke(server, formatted, {"inputs": "hello", "parameters": {"max_new_tokens": 3}})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert len(events) == 3 and "token" in events[0] and "generated_text" in events[-1]
    assert "[DONE]" not in response.text  # DJL's sse formatter ends without it


@pytest.mark.parametrize("formatted", ["jsonlines"], indirect=True)
def test_jsonlines_output_formatter_writes_lines_even_unstreamed(
    server: ServerProcess, formatted: str
) -> None:
    response = invoke(server, formatted, {"inputs": "hello", "parameters": {"max_new_tokens": 3}})
    assert response.headers["content-type"].startswith("application/jsonlines")
    assert len(json_lines(response)) == 3


@pytest.mark.parametrize("formatted", ["json"], indirect=True)
def test_json_output_formatter_answers_once_even_streamed(server: ServerProcess, formatted: str) -> None:
    response = invoke(
        server, formatted, {"inputs": "hello", "parameters": {"max_new_tokens": 3}, "stream": True}
    )
    assert response.headers["content-type"] == "application/json" and "generated_text" in response.json()


@pytest.mark.parametrize("formatted", ["json_chat"], indirect=True)
def test_json_chat_output_formatter_answers_lmi_requests_as_chat(
    server: ServerProcess, formatted: str
) -> None:
    result = invoke(server, formatted, {"inputs": "hello", "parameters": {"max_new_tokens": 3}}).json()
    assert result["object"] == "chat.completion" and result["choices"][0]["message"]["role"] == "assistant"
    assert result["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("formatted", ["jsonlines_chat"], indirect=True)
def test_jsonlines_chat_output_formatter_streams_chunks(server: ServerProcess, formatted: str) -> None:
    chunks = json_lines(invoke(server, formatted, {"inputs": "hello", "parameters": {"max_new_tokens": 3}}))
    assert (
        all(c["object"] == "chat.completion.chunk" for c in chunks)
        and chunks[-1]["choices"][0]["finish_reason"]
    )


@pytest.mark.parametrize("formatted", ["sse_chat"], indirect=True)
def test_sse_chat_output_formatter_streams_openai_events(server: ServerProcess, formatted: str) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    response = invoke(server, formatted, chat)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("data: [DONE]\n\n")
    assert all(c["object"] == "chat.completion.chunk" for c in sse_events(response))


# -- TGI mode ------------------------------------------------------------------------------------------


@pytest.fixture
def hub_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub refuses every HTTP request in offline mode (HF_HUB_OFFLINE, set for the suite),
    a local TGI server's included: its client needs it off; it reaches no hub for a URL model."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_tgi_mode_answers_tgis_shapes_on_invocations(server: ServerProcess) -> None:
    result = invoke(server, "tgi", {"inputs": "hello", "parameters": {"max_new_tokens": 3}}).json()
    assert isinstance(result, list) and result[0]["details"]["generated_tokens"] == 3  # details by default
    assert set(result[0]["details"]["tokens"][0]) == {"id", "text", "logprob", "special"}
    response = invoke(server, "tgi", {"inputs": "hello", "parameters": {"max_new_tokens": 3}, "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert [e["index"] for e in events] == [1, 2, 3] and events[0]["generated_text"] is None
    assert events[-1]["generated_text"] and events[-1]["details"]["finish_reason"] == "length"


@pytest.mark.parametrize("path", ["/invocations", "/"])
@pytest.mark.usefixtures("hub_online")
def test_huggingface_hub_text_generation(server: ServerProcess, path: str) -> None:
    """TGI mode's /invocations and TGI's compatibility route, streamed and not, with details."""
    from huggingface_hub import InferenceClient

    client = InferenceClient(model=f"{server.url}{path}?model_name=tgi")
    text = client.text_generation("hello", max_new_tokens=4)
    assert isinstance(text, str) and text
    output = client.text_generation("hello", max_new_tokens=4, details=True, decoder_input_details=True)
    assert output.generated_text == text and output.details.generated_tokens == 4
    assert output.details.finish_reason == "length" and len(output.details.tokens) == 4
    assert output.details.prefill and output.details.tokens[0].logprob is not None
    pieces = list(client.text_generation("hello", max_new_tokens=4, stream=True))
    assert "".join(pieces) == text
    streamed = list(client.text_generation("hello", max_new_tokens=4, stream=True, details=True))
    assert len(streamed) == 4 and streamed[-1].generated_text == text
    assert streamed[-1].details.finish_reason == "length"


@pytest.mark.usefixtures("hub_online")
def test_tgis_generate_routes_and_errors(server: ServerProcess) -> None:
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import ValidationError

    generate = InferenceClient(model=f"{server.url}/generate?model_name=tgi")
    output = generate.text_generation("hello", max_new_tokens=3, details=True)
    assert output.details.generated_tokens == 3 and output.generated_text
    stream = InferenceClient(model=f"{server.url}/generate_stream?model_name=tgi")
    streamed = list(stream.text_generation("hello", max_new_tokens=3, stream=True, details=True))
    assert "".join(s.token.text for s in streamed) == output.generated_text
    with pytest.raises(ValidationError):
        generate.text_generation("hi", max_new_tokens=0)
    text = generate.text_generation(
        "number:", max_new_tokens=3, grammar={"type": "regex", "value": "[0-9]{3}"}
    )
    assert text.isdigit() and len(text) == 3


# -- stateful sessions ---------------------------------------------------------------------------------


SESSION = "X-Amzn-SageMaker-Session-Id"


def new_session(server: ServerProcess) -> str:
    response = invoke(server, "fmt", {"requestType": "NEW_SESSION"})
    value = response.headers["X-Amzn-SageMaker-New-Session-Id"]
    assert response.headers[SESSION] == value  # DJL's own header, which its client reads
    session_id, expires = value.split("; ")
    assert expires.startswith("Expires=") and expires.endswith("Z")
    return session_id


def test_a_session_opens_serves_and_closes(server: ServerProcess, models: Path) -> None:
    session_id = new_session(server)
    assert (models / "sessions" / session_id).is_dir()
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 2}}
    for stream in (False, True):
        assert (
            invoke(server, "fmt", {**body, "stream": stream}, headers={SESSION: session_id}).status_code
            == 200
        )
    closed = invoke(server, "fmt", {"requestType": "CLOSE"}, headers={SESSION: session_id})
    assert closed.headers["X-Amzn-SageMaker-Closed-Session-Id"] == session_id
    assert not (models / "sessions" / session_id).exists()
    error = invoke(server, "fmt", body, status=424, headers={SESSION: session_id}).json()
    assert "unknown" in error["message"] and error["param"] == SESSION


def test_an_expired_session_is_a_424_and_its_files_are_cleaned(server: ServerProcess, models: Path) -> None:
    first, second = new_session(server), new_session(server)
    time.sleep(EXPIRATION + 0.5)
    error = invoke(server, "fmt", {"inputs": "hi"}, status=424, headers={SESSION: first}).json()
    assert "expired" in error["message"] and not (models / "sessions" / first).exists()
    new_session(server)  # a new session sweeps the other expired ones
    wait_for(lambda: not (models / "sessions" / second).exists(), what="the expired session swept")


def test_session_requests_that_cannot_be_served_are_424s(server: ServerProcess) -> None:
    assert invoke(server, "fmt", {"requestType": "CLOSE"}, status=424).json()["param"] == SESSION
    assert invoke(server, "fmt", {"requestType": "RESUME"}, status=424).json()["param"] == "requestType"
    headers = {SESSION: "../../etc"}
    assert "unknown" in invoke(server, "fmt", {"inputs": "hi"}, status=424, headers=headers).json()["message"]
    # A handle() model serves its own session requests, as DJL's Python engine passes them through.
    echoed = invoke(server, "echo", {"requestType": "NEW_SESSION"}, headers={SESSION: "s1"}).json()
    assert echoed["echo"]["session"] == "s1"
