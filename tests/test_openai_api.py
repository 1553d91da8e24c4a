"""The OpenAI-compatible API against a real server, with the official openai client used unchanged
(sync, async, streaming), plus chat on the native /invocations API (DJL behaviour)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from lmi_core.http.openai_protocol import CompletionRequest
from tests.conftest import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "demo"
CONTEXT = 64  # option.max_model_len: keeps "too long" prompts and unbounded chats cheap
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[ServerProcess]:
    env = {**os.environ, "SERVING_HEALTH_CHECK_INTERVAL": "0.5", "OPTION_MAX_MODEL_LEN": str(CONTEXT)}
    log = tmp_path_factory.mktemp("openai") / "server.log"
    server = ServerProcess(["--model-dir", str(demo_model), "--model-name", MODEL], env, log)
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def lmi(server: ServerProcess, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{server.url}/invocations", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


# -- completions ---------------------------------------------------------------------------------


def test_completion_matches_the_native_api_and_counts_usage(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    result = client.completions.create(model=MODEL, prompt="hello world", max_tokens=6, temperature=0)
    native = lmi(server, {"inputs": "hello world", "parameters": {"max_new_tokens": 6, "details": True}})
    assert result.object == "text_completion" and result.model == MODEL and result.id.startswith("cmpl-")
    choice = result.choices[0]
    assert choice.text == native["generated_text"]
    assert choice.finish_reason == "length"
    assert result.usage is not None
    assert result.usage.completion_tokens == 6 == native["details"]["generated_tokens"]
    assert result.usage.prompt_tokens > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + 6


def test_completion_default_max_tokens_is_16(client: openai.OpenAI) -> None:
    result = client.completions.create(
        model=MODEL, prompt="one two", temperature=0, extra_body={"ignore_eos": True}
    )
    assert result.usage is not None and result.usage.completion_tokens == 16


def test_stop_sequence_ends_the_text_before_it(client: openai.OpenAI) -> None:
    full = (
        client.completions.create(model=MODEL, prompt="the quick", max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    start = next(i for i in range(2, len(full) - 2) if full[i : i + 2].strip())
    stop = full[start : start + 2]
    result = client.completions.create(
        model=MODEL, prompt="the quick", max_tokens=12, temperature=0, stop=[stop]
    )
    assert result.choices[0].text == full[: full.index(stop)]
    assert result.choices[0].finish_reason == "stop"


def test_several_prompts_and_n_choices_with_echo(client: openai.OpenAI) -> None:
    prompts = ["one two", "hello world"]
    result = client.completions.create(
        model=MODEL, prompt=prompts, n=2, max_tokens=3, temperature=0, echo=True
    )
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    for choice in result.choices:
        assert choice.text.startswith(prompts[choice.index // 2])
    # Greedy: both choices of one prompt agree.
    assert result.choices[0].text == result.choices[1].text
    assert result.usage is not None and result.usage.completion_tokens == 12
    single = client.completions.create(model=MODEL, prompt="one two", max_tokens=3, temperature=0)
    doubled = client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, temperature=0)
    # The n choices of a prompt share its tokens: counted once.
    assert result.usage.prompt_tokens == doubled.usage.prompt_tokens > single.usage.prompt_tokens  # type: ignore[union-attr]


def test_seed_makes_sampling_reproducible_and_choices_differ(client: openai.OpenAI) -> None:
    def sample(seed: int) -> list[str]:
        result = client.completions.create(
            model=MODEL, prompt="the", max_tokens=8, n=3, temperature=1.0, seed=seed
        )
        return [c.text for c in result.choices]

    first = sample(7)
    assert sample(7) == first
    assert len(set(first)) > 1  # each choice has its own seed


def test_completion_logprobs(client: openai.OpenAI) -> None:
    result = client.completions.create(model=MODEL, prompt="hello", max_tokens=4, temperature=0, logprobs=2)
    logprobs = result.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.top_logprobs is not None
    assert len(logprobs.tokens) == 4 and "".join(logprobs.tokens) == result.choices[0].text
    assert all(lp <= 0 for lp in logprobs.token_logprobs or [])
    # vLLM's shape: the chosen token, then up to `logprobs` alternatives (keyed by text: may coincide).
    for token, own, top in zip(
        logprobs.tokens, logprobs.token_logprobs or [], logprobs.top_logprobs, strict=True
    ):
        assert 1 <= len(top) <= 3 and top[token] == own
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(4)]


def test_streamed_completion_joins_to_the_complete_one(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt="hello world", max_tokens=8, temperature=0)
    stream = client.completions.create(
        model=MODEL,
        prompt="hello world",
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


# -- chat ----------------------------------------------------------------------------------------


def test_chat_uses_the_chat_template_and_matches_native_chat(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    result = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0)  # type: ignore[arg-type]
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")
    message = result.choices[0].message
    assert message.role == "assistant" and message.content
    native = lmi(server, {"messages": MESSAGES, "max_tokens": 5, "temperature": 0})
    assert native["object"] == "chat.completion"
    assert native["choices"][0]["message"]["content"] == message.content
    # The template wraps each message: more prompt tokens than the raw texts alone.
    plain = client.completions.create(model=MODEL, prompt="Be brief.hello world", max_tokens=1)
    assert result.usage is not None and plain.usage is not None
    assert result.usage.prompt_tokens > plain.usage.prompt_tokens


def test_chat_max_completion_tokens_and_content_parts(client: openai.OpenAI) -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]}
    ]
    result = client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_completion_tokens=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert result.usage is not None and result.usage.completion_tokens == 3
    assert result.choices[0].finish_reason == "length"
    flat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello world"}], max_tokens=3, temperature=0
    )
    assert flat.choices[0].message.content == result.choices[0].message.content


def test_chat_without_max_tokens_runs_to_the_end_of_the_context(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        temperature=0,
        extra_body={"ignore_eos": True},  # type: ignore[arg-type]
    )
    assert result.usage is not None
    assert result.usage.prompt_tokens + result.usage.completion_tokens == CONTEXT
    assert result.choices[0].finish_reason == "length"


def test_chat_logprobs(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,  # type: ignore[arg-type]
    )
    content = result.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 3
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy picks the best


def test_streamed_chat_with_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == whole.choices[0].message.content
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage == whole.usage


def test_streamed_chat_with_n_choices_interleaves_by_index(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=4,
        n=2,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    texts, finished = ["", ""], [None, None]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finished[choice.index] = choice.finish_reason or finished[choice.index]
    assert texts[0] == texts[1] and finished == ["length", "length"]


async def test_async_client_runs_requests_concurrently(server: ServerProcess) -> None:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    prompts = ["one", "two three", "hello world", "the quick brown fox"]
    results = await asyncio.gather(
        *(client.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0) for p in prompts)
    )
    for prompt, result in zip(prompts, results, strict=True):
        alone = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
        assert result.choices[0].text == alone.choices[0].text
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=3,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    whole = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0)  # type: ignore[arg-type]
    assert text == whole.choices[0].message.content
    await client.close()


def test_models(client: openai.OpenAI, server: ServerProcess) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "lmi-core"
    # The context the HF engine loaded with (option.max_model_len), as its worker reported it.
    assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["max_model_len"] == CONTEXT
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"logprobs": 6}, "logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        # Was a 400 for an unknown field; unknown fields are now ignored (vLLM), a known one checked.
        ({"extra_body": {"min_p": 2}}, "min_p"),
        ({"extra_body": {"logit_bias": {"x": 1}}}, "logit_bias"),
    ],
)
def test_bad_parameter_is_a_400_naming_it(client: openai.OpenAI, kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", **kwargs)
    assert info.value.status_code == 400
    assert info.value.param == param
    assert info.value.type == "invalid_request_error"


@pytest.mark.parametrize(
    ("prompt", "refusal"),
    [
        ("hi " * 50_000, "the prompt has at least"),  # refused by the server from its size alone
        ([5] * 1000, "the prompt has 1000 tokens"),  # counted by the server
    ],
)
def test_a_prompt_that_cannot_fit_is_a_400_naming_the_prompt(
    client: openai.OpenAI, prompt: str | list[int], refusal: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    assert info.value.param == "prompt" and refusal in info.value.message
    with pytest.raises(openai.BadRequestError) as info:  # the template decides: the engine refuses
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi " * 50_000}])
    assert info.value.param == "messages" and "the prompt has at least" in info.value.message


def test_bad_chat_parameters(client: openai.OpenAI) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content",
        ),
        ({"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
        # tools default to tool_choice auto, which needs option.enable_auto_tool_choice on the model
        ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, **kwargs)
        assert info.value.param == param, kwargs


def test_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt="hi")
    assert info.value.param == "model" and "gpt-4" in info.value.message


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_longer_than_the_context_is_a_400_at_once(client: openai.OpenAI, stream: bool) -> None:
    prompt = "hello world " * CONTEXT
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, stream=stream)
    assert info.value.param == "prompt" and "context" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], stream=stream
        )
    assert info.value.param == "messages"


def test_errors_have_the_openai_shape(server: ServerProcess) -> None:
    response = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", timeout=10)
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


# -- chat on the native API ----------------------------------------------------------------------


def test_native_chat_streams_json_lines_of_chunks(server: ServerProcess) -> None:
    body = {"messages": MESSAGES, "max_tokens": 5, "temperature": 0}
    whole = lmi(server, body)["choices"][0]["message"]["content"]
    with httpx.stream(
        "POST", f"{server.url}/invocations", json={**body, "stream": True}, timeout=60
    ) as response:
        assert response.headers["content-type"].startswith("application/jsonlines")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert all(line["object"] == "chat.completion.chunk" for line in lines)
    assert "".join(line["choices"][0]["delta"].get("content") or "" for line in lines) == whole
    assert lines[-1]["choices"][0]["finish_reason"] == "length"


def test_native_chat_errors_keep_the_djl_shape(server: ServerProcess) -> None:
    response = httpx.post(f"{server.url}/invocations", json={"messages": "hi"}, timeout=10)
    assert response.status_code == 400
    assert response.json()["param"] == "messages" and response.json()["code"] == 400


@pytest.mark.parametrize(("logprobs", "wanted"), [(None, False), (0, True), (3, True)])
def test_engines_are_told_whether_the_client_reads_logprobs(logprobs: int | None, wanted: bool) -> None:
    body = CompletionRequest.model_validate({"model": "m", "prompt": "x"})
    params = body.sampling(16, logprobs, 0)
    assert params.logprobs is wanted and params.top_logprobs == (logprobs or 0)


# -- vLLM parity of the request contract ---------------------------------------------------------


def test_a_transcript_replayed_from_the_sdk_is_accepted(client: openai.OpenAI) -> None:
    # What the SDK's message objects dump to: refusal, annotations, audio... (was a 400).
    first = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0)  # type: ignore[arg-type]
    replay = [*MESSAGES, first.choices[0].message.model_dump(), {"role": "user", "content": "again"}]
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=replay,  # type: ignore[arg-type]
        max_tokens=3,
        temperature=0,
    )
    assert raw.parse().choices[0].message.content is not None
    assert "messages.2.refusal" in raw.headers["x-lmi-ignored-fields"].split(",")


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        # curl -d's default: JSON sent with it is served, as DJL serves it; a real form is not JSON.
        ("application/x-www-form-urlencoded", {"prompt": "hi", "max_tokens": 1}, 200),
        ("application/x-www-form-urlencoded", "prompt=hi&max_tokens=1", 415),
        ("text/plain", {"prompt": "hi", "max_tokens": 1}, 415),
        ("application/json; charset=utf-8", {"prompt": "hi", "max_tokens": 1}, 200),
    ],
)
def test_a_body_that_is_not_json_is_a_415(
    server: ServerProcess, content_type: str, body: dict[str, Any] | str, status: int
) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(
        f"{server.url}/v1/completions", content=content, headers={"content-type": content_type}, timeout=30
    )
    assert response.status_code == status, response.text
    if status == 415:
        assert response.json()["error"]["code"] == 415
    form = {"content-type": "application/x-www-form-urlencoded"}
    native = httpx.post(f"{server.url}/invocations", content="inputs=hi", headers=form, timeout=10)
    assert native.status_code == 415 and native.json()["code"] == 415


def test_strict_request_fields_refuse_unknown_fields(start_server: Any, demo_model: Path) -> None:
    strict = start_server(
        "--model-dir", str(demo_model), "--model-name", MODEL, env={"OPTION_STRICT_REQUEST_FIELDS": "true"}
    )
    body = {"messages": [{"role": "user", "content": "hi", "refusal": None}], "max_tokens": 1}
    response = httpx.post(f"{strict.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages.0.refusal"
    fine = httpx.post(f"{strict.url}/v1/chat/completions", json={**body, "messages": MESSAGES}, timeout=30)
    assert fine.status_code == 200 and "x-lmi-ignored-fields" not in fine.headers


def test_health_is_503_until_the_model_can_serve(start_server: Any, demo_model: Path) -> None:
    starting = start_server("--model-dir", str(demo_model), "--model-name", MODEL, wait=False)
    codes = []
    begin = time.monotonic()
    while time.monotonic() - begin < 90.0:
        try:
            codes.append(httpx.get(f"{starting.url}/health", timeout=2).status_code)
        except httpx.HTTPError:
            pass
        if codes and codes[-1] == 200:
            break
        time.sleep(0.1)
    assert codes and codes[-1] == 200 and set(codes) <= {200, 503}
    assert httpx.get(f"{starting.url}/ping", timeout=5).status_code == 200


# -- tokenize --------------------------------------------------------------------------------------


def post(server: ServerProcess, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def test_tokenize_counts_the_prompt_tokens_a_generation_of_the_same_request_counts(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)  # type: ignore[arg-type]
    tokens = post(server, "/tokenize", {"model": MODEL, "messages": MESSAGES}).json()
    assert chat.usage is not None and tokens["count"] == chat.usage.prompt_tokens == len(tokens["tokens"])
    assert tokens["max_model_len"] == CONTEXT and tokens["token_strs"] is None
    text = client.completions.create(model=MODEL, prompt="hello world", max_tokens=1)
    tokens = post(server, "/tokenize", {"prompt": "hello world", "return_token_strs": True}).json()
    assert text.usage is not None and tokens["count"] == text.usage.prompt_tokens == len(tokens["token_strs"])
    plain = post(server, "/tokenize", {"prompt": "hello world", "add_special_tokens": False}).json()
    assert post(server, "/detokenize", {"tokens": plain["tokens"]}).json() == {"prompt": "hello world"}
    # No length check: a prompt longer than the context is counted, not refused.
    assert post(server, "/tokenize", {"prompt": "word " * 100}).json()["count"] > CONTEXT


def test_tokenize_refuses_bad_input_in_vllms_shape(server: ServerProcess) -> None:
    response = post(server, "/detokenize", {"tokens": [10**8]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "tokens" and "out of the vocabulary" in response.text
    response = post(server, "/tokenize", {"model": "nope", "prompt": "x"})
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"
