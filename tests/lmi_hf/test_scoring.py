"""The HF engine's prompt log-probs, token-id prompts and the request fields checked once tokenized."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmi_core.engine import GenerationRequest, SamplingParams
from lmi_core.errors import BadRequestError
from lmi_hf.engine import HFEngine
from tests.lmi_hf.engines import run_request as run
from tests.lmi_hf.engines import running_engine

PROMPTS = ["Hello world, this is", "one two three four five six", "gpu"]


@pytest.fixture(scope="module")
def engine(demo_model: Path) -> Iterator[HFEngine]:
    with running_engine(demo_model, {"max_model_len": "64"}) as engine:
        yield engine


def direct_logprobs(engine: HFEngine, ids: list[int]) -> list[float]:
    """log p(ids[j] | ids[:j]) for j >= 1 from one plain transformers forward pass."""
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([ids])).logits[0].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    return [float(log_probs[j - 1, ids[j]]) for j in range(1, len(ids))]


async def test_prompt_logprobs_equal_a_direct_forward_pass_in_a_mixed_batch(engine: HFEngine) -> None:
    # Scored and plain requests of different lengths admitted together (left padding, two prefills).
    requests = [
        GenerationRequest(f"s{i}", prompt=p, params=SamplingParams(max_new_tokens=3, prompt_logprobs=2))
        for i, p in enumerate(PROMPTS)
    ] + [GenerationRequest("plain", prompt="Hello", params=SamplingParams(max_new_tokens=3))]
    results = await asyncio.gather(*(run(engine, r) for r in requests))
    for prompt, (tokens, finished) in zip(PROMPTS, results, strict=False):
        ids = engine.tokenizer.encode(prompt)
        scored = finished.prompt_logprobs
        assert scored is not None and [e[0] for e in scored] == ids
        assert scored[0][2] is None
        assert [e[2] for e in scored[1:]] == pytest.approx(direct_logprobs(engine, ids), abs=1e-4)
        for _, _, log_prob, rank, top in scored[1:]:
            assert len(top) == 2 and top[0][2] >= top[1][2] >= -1e9
            assert (rank == 1) == (log_prob == pytest.approx(top[0][2]))
        assert len(tokens) == 3
    assert results[-1][1].prompt_logprobs is None  # computed only when asked


async def test_max_new_tokens_zero_scores_the_prompt_only(engine: HFEngine) -> None:
    params = SamplingParams(max_new_tokens=0, prompt_logprobs=0, strict_max_tokens=True)
    tokens, finished = await run(engine, GenerationRequest("zero", prompt=PROMPTS[0], params=params))
    assert tokens == [] and finished.generated_tokens == 0 and finished.finish_reason == "length"
    assert finished.prompt_logprobs is not None and len(finished.prompt_logprobs) == finished.prompt_tokens


async def test_token_id_prompt_equals_its_text_prompt(engine: HFEngine) -> None:
    ids = engine.tokenizer.encode(PROMPTS[1])
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    by_text, _ = await run(engine, GenerationRequest("t", prompt=PROMPTS[1], params=params))
    by_ids, finished = await run(engine, GenerationRequest("i", prompt_ids=ids, params=params))
    assert [t.id for t in by_ids] == [t.id for t in by_text]
    assert finished.prompt_tokens == len(ids) and finished.prompt == engine.tokenizer.decode(ids)
    assert by_ids[0].prompt_tokens == len(ids) and all(t.prompt_tokens is None for t in by_ids[1:])


async def test_token_id_out_of_the_vocabulary_is_a_400_naming_its_index(engine: HFEngine) -> None:
    with pytest.raises(BadRequestError, match=r"prompt\[1\]"):
        await run(engine, GenerationRequest("bad", prompt_ids=[1, engine.vocab_size]))


async def test_logit_bias_id_out_of_the_vocabulary_is_a_400(engine: HFEngine) -> None:
    params = SamplingParams(logit_bias=[(engine.vocab_size + 5, 1.0)])
    with pytest.raises(BadRequestError, match=str(engine.vocab_size)) as info:
        await run(engine, GenerationRequest("bias", prompt="hi", params=params))
    assert info.value.param == "logit_bias"


async def test_max_tokens_past_the_context_is_a_400_when_strict_and_clamped_otherwise(
    engine: HFEngine,
) -> None:
    prompt = GenerationRequest("long", prompt=PROMPTS[0], params=SamplingParams(max_new_tokens=100))
    _, finished = await run(engine, prompt)  # DJL's max_new_tokens: clamped to the room left
    assert finished.prompt_tokens + finished.generated_tokens <= 64
    strict = SamplingParams(max_new_tokens=100, strict_max_tokens=True)
    with pytest.raises(BadRequestError, match="64") as info:
        await run(engine, GenerationRequest("strict", prompt=PROMPTS[0], params=strict))
    assert info.value.param == "max_tokens"


async def test_stop_token_ids_end_the_generation_without_their_text(engine: HFEngine) -> None:
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    tokens, _ = await run(engine, GenerationRequest("free", prompt=PROMPTS[0], params=params))
    stop = tokens[3].id
    params = SamplingParams(max_new_tokens=8, ignore_eos=True, stop_token_ids=[stop])
    stopped, finished = await run(engine, GenerationRequest("stop", prompt=PROMPTS[0], params=params))
    first = next(i for i, t in enumerate(tokens) if t.id == stop)
    assert [t.id for t in stopped] == [t.id for t in tokens[: first + 1]]
    assert stopped[-1].text == "" and finished.finish_reason == "stop_sequence"


async def test_min_tokens_holds_back_a_stop_token(engine: HFEngine) -> None:
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    tokens, _ = await run(engine, GenerationRequest("free2", prompt=PROMPTS[0], params=params))
    held = SamplingParams(max_new_tokens=8, ignore_eos=True, stop_token_ids=[tokens[0].id], min_tokens=3)
    out, _ = await run(engine, GenerationRequest("min", prompt=PROMPTS[0], params=held))
    assert out[0].id != tokens[0].id and len(out) >= 3


async def test_truncate_keeps_the_last_prompt_tokens(engine: HFEngine) -> None:
    ids = engine.tokenizer.encode(PROMPTS[1])
    params = SamplingParams(max_new_tokens=4, ignore_eos=True, truncate=3)
    cut, finished = await run(engine, GenerationRequest("cut", prompt=PROMPTS[1], params=params))
    tail, _ = await run(
        engine,
        GenerationRequest(
            "tail", prompt_ids=ids[-3:], params=SamplingParams(max_new_tokens=4, ignore_eos=True)
        ),
    )
    assert finished.prompt_tokens == 3 and [t.id for t in cut] == [t.id for t in tail]


async def test_repetition_penalty_changes_a_repetitive_greedy_output(engine: HFEngine) -> None:
    base = SamplingParams(max_new_tokens=16, ignore_eos=True)
    plain, _ = await run(engine, GenerationRequest("rep0", prompt="the the the", params=base))
    penalised = SamplingParams(
        max_new_tokens=16, ignore_eos=True, repetition_penalty=5.0, frequency_penalty=2.0
    )
    out, _ = await run(engine, GenerationRequest("rep1", prompt="the the the", params=penalised))
    assert [t.id for t in out] != [t.id for t in plain]
    assert len({t.id for t in out}) >= len({t.id for t in plain})
