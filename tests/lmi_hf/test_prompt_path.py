"""The HF engine's prompt path: off the event loop, and bounded by option.max_input_length (before
tokenizing, by the prompt's size, where that alone shows it cannot fit)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmi_core.engine import GenerationRequest, SamplingParams
from lmi_core.errors import BadRequestError
from lmi_hf.engine import HFEngine
from tests.lmi_hf.engines import running_engine


@pytest.fixture(scope="module")
def engine(demo_model: Path) -> Iterator[HFEngine]:
    with running_engine(demo_model, {"max_input_length": "8"}) as engine:
        yield engine


async def _drain(engine: HFEngine, request: GenerationRequest) -> None:
    async for _ in engine.generate(request):
        pass


@pytest.mark.parametrize(
    ("prompt", "messages", "param"),
    [("one two " * 20, None, "inputs"), (None, [{"role": "user", "content": "one two " * 20}], "messages")],
)
async def test_a_prompt_over_max_input_length_is_a_400_naming_it(
    engine: HFEngine, prompt: str | None, messages: list[dict[str, Any]] | None, param: str
) -> None:
    request = GenerationRequest("long", prompt=prompt, messages=messages)
    with pytest.raises(BadRequestError, match=r"at most 8 fit \(option\.max_input_length") as caught:
        await _drain(engine, request)
    assert caught.value.param == param


async def test_tokenizing_runs_off_the_event_loop(engine: HFEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    encode = engine.tokenizer.encode

    def spy(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return encode(*args, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "encode", spy)
    await _drain(engine, GenerationRequest("short", prompt="Hello", params=SamplingParams(max_new_tokens=2)))
    chat = [{"role": "user", "content": "Hello"}]
    await _drain(engine, GenerationRequest("chat", messages=chat, params=SamplingParams(max_new_tokens=2)))
    assert len(threads) == 2 and all(name.startswith("lmi-hf-prompt") for name in threads)
    assert threading.current_thread() is threading.main_thread()  # the loop's thread did not encode
    assert asyncio.get_running_loop() is not None


@pytest.mark.parametrize(
    ("prompt", "messages", "param"),
    [("x" * 10**6, None, "inputs"), (None, [{"role": "user", "content": "x" * 10**6}], "messages")],
)
async def test_a_prompt_too_long_whatever_its_tokens_is_refused_before_it_is_tokenized(
    engine: HFEngine,
    monkeypatch: pytest.MonkeyPatch,
    prompt: str | None,
    messages: list[dict[str, Any]] | None,
    param: str,
) -> None:
    """Chat messages and prompts that reach the engine (the server bounds only text and ids): 1 MB
    was tokenized whole first (4.5 s here), 30 MB for over 120 s."""
    encoded: list[int] = []
    encode = engine.tokenizer.encode
    monkeypatch.setattr(
        engine.tokenizer, "encode", lambda text, **kw: encoded.append(len(text)) or encode(text, **kw)
    )
    with pytest.raises(BadRequestError, match=r"the prompt has at least \d+ tokens; at most 8 fit") as caught:
        await _drain(engine, GenerationRequest("huge", prompt=prompt, messages=messages))
    assert caught.value.param == param and encoded == []


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_the_demo_tokenizer_never_has_fewer_tokens_than_the_byte_bound(engine: HFEngine, text: str) -> None:
    """The bound's premise on a real byte-level BPE tokenizer: N bytes are at least N / max_token_bytes
    tokens (special tokens' text included)."""
    bound = engine.max_token_bytes
    assert bound is not None
    for sample in (text, f"<|user|>{text}<|assistant|>"):
        size = len(sample.encode("utf-8", "surrogatepass"))
        assert len(engine.tokenizer.encode(sample, add_special_tokens=False)) >= -(-size // bound)
