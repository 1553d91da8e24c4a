"""The HF engine in-process: batched output equals unbatched transformers output, and request semantics."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmi_core.engine import Finished, GenerationRequest, SamplingParams, Token, WorkerContext
from lmi_core.errors import BadRequestError, EngineError
from lmi_hf.engine import HFEngine
from lmi_hf.loading import load_model
from tests.lmi_hf.engines import run_request

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog and",
    "one two three",
    "Large language model serving is",
    "gpu cpu memory queue latency throughput deep learning language large inference",
]


@pytest.fixture(scope="module")
def engine(demo_model: Path) -> Iterator[HFEngine]:
    context = WorkerContext(
        model_id=str(demo_model), model_dir=str(demo_model), backend="hf", options={}, max_batch_size=4
    )
    model, tokenizer = load_model(context)
    engine = HFEngine(context, model, tokenizer)
    yield engine
    engine.shutdown()


async def run(
    engine: HFEngine, prompt: str | None = None, messages: list | None = None, **params: object
) -> tuple[list[Token], Finished]:
    request = GenerationRequest(
        request_id=f"r{id(params)}{prompt}", prompt=prompt, messages=messages, params=SamplingParams(**params)
    )
    return await run_request(engine, request)


def reference(engine: HFEngine, prompt: str, max_new_tokens: int) -> list[int]:
    ids = engine.tokenizer(prompt, return_tensors="pt")
    out = engine.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.input_ids.shape[1] :].tolist()


async def test_concurrent_batched_greedy_matches_transformers_generate(engine: HFEngine) -> None:
    # 10 requests, batch size 4, different prompt lengths and lengths: joins, merges and evictions.
    cases = [(p, 5 + 3 * i) for i, p in enumerate(PROMPTS * 2)]
    results = await asyncio.gather(*(run(engine, p, max_new_tokens=n, ignore_eos=True) for p, n in cases))
    for (prompt, n), (tokens, finished) in zip(cases, results, strict=True):
        assert [t.id for t in tokens] == reference(engine, prompt, n)[:n]
        assert finished.finish_reason == "length" and finished.generated_tokens == n


async def test_seeded_sampling_is_reproducible_and_differs_by_seed(engine: HFEngine) -> None:
    params = {
        "max_new_tokens": 12,
        "do_sample": True,
        "temperature": 1.5,
        "top_k": 50,
        "top_p": 0.95,
        "ignore_eos": True,
    }
    a, b, c = await asyncio.gather(
        run(engine, "Hello", seed=1, **params),
        run(engine, "Hello", seed=1, **params),
        run(engine, "Hello", seed=2, **params),
    )
    assert [t.id for t in a[0]] == [t.id for t in b[0]]
    assert [t.id for t in a[0]] != [t.id for t in c[0]]


async def test_stop_sequence_ends_generation_and_is_not_emitted(engine: HFEngine) -> None:
    tokens, _ = await run(engine, PROMPTS[1], max_new_tokens=20, ignore_eos=True)
    full = "".join(t.text for t in tokens)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip()
    tokens, finished = await run(
        engine, PROMPTS[1], max_new_tokens=20, ignore_eos=True, stop_sequences=[stop]
    )
    assert finished.finish_reason == "stop_sequence"
    assert "".join(t.text for t in tokens) == full[: full.find(stop)]


async def test_prompt_longer_than_context_is_a_bad_request(engine: HFEngine) -> None:
    with pytest.raises(BadRequestError) as info:
        await run(engine, "hello " * 600)
    assert info.value.param == "inputs" and info.value.status == 400


async def test_chat_messages_use_the_chat_template(engine: HFEngine) -> None:
    _, finished = await run(engine, messages=[{"role": "user", "content": "hi"}], max_new_tokens=2)
    assert finished.prompt == "<|user|>\nhi</s>\n<|assistant|>\n"


async def test_top_logprobs_are_sorted_and_include_greedy_choice(engine: HFEngine) -> None:
    tokens, _ = await run(engine, "Hello", max_new_tokens=3, top_logprobs=3)
    for token in tokens:
        assert token.top_logprobs is not None and len(token.top_logprobs) == 3
        assert token.top_logprobs[0][0] == token.id
        values = [lp for _, _, lp in token.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert token.log_prob == pytest.approx(values[0])


async def test_closing_the_stream_cancels_the_request_in_the_engine(engine: HFEngine) -> None:
    before = engine.stats().cancelled_total
    request = GenerationRequest(
        request_id="cancel-me", prompt="Hello", params=SamplingParams(max_new_tokens=400, ignore_eos=True)
    )
    stream = engine.generate(request)
    await anext(stream)
    await stream.aclose()
    for _ in range(100):
        stats = engine.stats()
        if stats.cancelled_total == before + 1 and stats.running == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.stats().cancelled_total == before + 1
    assert engine.stats().running == 0


async def test_a_failing_request_does_not_take_down_its_batch(
    engine: HFEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lmi_hf.engine

    real = lmi_hf.engine.select_token

    def broken_for_top_k_7(logits, params, generator, *rest):
        if params.top_k == 7:
            raise RuntimeError("sampler exploded")
        return real(logits, params, generator, *rest)

    monkeypatch.setattr(lmi_hf.engine, "select_token", broken_for_top_k_7)
    good = asyncio.ensure_future(run(engine, "Hello", max_new_tokens=30, ignore_eos=True))
    with pytest.raises(EngineError, match="sampler exploded"):
        await run(engine, "Hello", max_new_tokens=30, do_sample=True, top_k=7)
    tokens, finished = await good
    assert finished.finish_reason == "length" and len(tokens) == 30
    assert engine.error is None
