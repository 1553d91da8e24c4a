"""A resumed request (``GenerationRequest.resume_ids``, stream migration) continues exactly where the
first run was: the tokens after the cut, their text, the finish and the counts equal an uninterrupted
run, for greedy, seeded sampling, stop sequences and penalties."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmi_core.engine import GenerationRequest, SamplingParams, StructuredOutput
from lmi_hf.engine import HFEngine
from tests.lmi_hf.engines import run_request as run
from tests.lmi_hf.engines import running_engine

PROMPT = "The quick brown fox jumps over the lazy dog and"


@pytest.fixture(scope="module")
def engine(demo_model: Path) -> Iterator[HFEngine]:
    with running_engine(demo_model, {}) as engine:
        yield engine


CASES = {
    "greedy": SamplingParams(max_new_tokens=24),
    "seeded": SamplingParams(max_new_tokens=24, do_sample=True, temperature=1.5, seed=11),
    "penalties": SamplingParams(max_new_tokens=24, repetition_penalty=1.3, frequency_penalty=0.5),
    "min_tokens": SamplingParams(max_new_tokens=24, min_tokens=20, do_sample=True, seed=3),
}


@pytest.mark.parametrize("case", CASES)
async def test_resumed_runs_continue_the_uninterrupted_one(engine: HFEngine, case: str) -> None:
    params = CASES[case]
    full, done = await run(engine, GenerationRequest(f"full-{case}", prompt=PROMPT, params=params))
    ids = [t.id for t in full]
    for cut in (1, 7, len(full) - 1):
        request = GenerationRequest(f"cut{cut}-{case}", prompt=PROMPT, params=params, resume_ids=ids[:cut])
        rest, finished = await run(engine, request)
        assert [t.id for t in rest] == ids[cut:]
        assert "".join(t.text for t in full[:cut] + rest) == "".join(t.text for t in full)
        assert rest[0].prompt_tokens is None  # the first token's usage went out with the first run
        assert (finished.finish_reason, finished.generated_tokens) == (
            done.finish_reason,
            done.generated_tokens,
        )
        assert finished.prompt_tokens == done.prompt_tokens


async def test_a_stop_sequence_across_the_cut_still_ends_the_text(engine: HFEngine) -> None:
    free, _ = await run(
        engine, GenerationRequest("free", prompt=PROMPT, params=SamplingParams(max_new_tokens=24))
    )
    text = "".join(t.text for t in free)
    stop = text[len(free[0].text) + len(free[1].text) - 2 :][:5]  # spans the end of the second token
    params = SamplingParams(max_new_tokens=24, stop_sequences=[stop])
    full, done = await run(engine, GenerationRequest("stop-full", prompt=PROMPT, params=params))
    assert done.finish_reason == "stop_sequence"
    ids = [t.id for t in full]
    request = GenerationRequest("stop-cut", prompt=PROMPT, params=params, resume_ids=ids[:2])
    rest, finished = await run(engine, request)
    assert "".join(t.text for t in full[:2] + rest) == "".join(t.text for t in full)
    assert finished.finish_reason == "stop_sequence"


async def test_a_constrained_output_resumes_inside_its_grammar(engine: HFEngine) -> None:
    params = SamplingParams(
        max_new_tokens=40, structured=StructuredOutput("regex", "(cat|dog)( (cat|dog)){5}")
    )
    full, done = await run(engine, GenerationRequest("re-full", prompt=PROMPT, params=params))
    ids = [t.id for t in full]
    rest, finished = await run(
        engine, GenerationRequest("re-cut", prompt=PROMPT, params=params, resume_ids=ids[:3])
    )
    assert "".join(t.text for t in full[:3] + rest) == "".join(t.text for t in full)
    assert finished.finish_reason == done.finish_reason


async def test_a_grammar_after_the_thinking_resumes_on_either_side_of_its_marker(engine: HFEngine) -> None:
    # Free words (the thinking) until the first 4 tokens' text is complete, then the grammar: cut before
    # and after it.
    free, _ = await run(
        engine, GenerationRequest("think", prompt=PROMPT, params=SamplingParams(max_new_tokens=4))
    )
    marker = "".join(t.text for t in free)
    regex = StructuredOutput("regex", "(cat|dog)( (cat|dog)){3}", starts_after=marker)
    params = SamplingParams(max_new_tokens=40, structured=regex)
    full, done = await run(engine, GenerationRequest("think-full", prompt=PROMPT, params=params))
    text = "".join(t.text for t in full)
    assert text.startswith(marker) and done.finish_reason == "eos_token"
    ids = [t.id for t in full]
    for cut in (2, 6):
        request = GenerationRequest(f"think-cut{cut}", prompt=PROMPT, params=params, resume_ids=ids[:cut])
        rest, finished = await run(engine, request)
        assert "".join(t.text for t in full[:cut] + rest) == text
        assert finished.finish_reason == "eos_token"


async def test_prompt_logprobs_cover_the_prompt_only_when_resumed(engine: HFEngine) -> None:
    params = SamplingParams(max_new_tokens=6, prompt_logprobs=1)
    full, done = await run(engine, GenerationRequest("lp-full", prompt=PROMPT, params=params))
    request = GenerationRequest("lp-cut", prompt=PROMPT, params=params, resume_ids=[t.id for t in full[:2]])
    _, finished = await run(engine, request)
    assert finished.prompt_logprobs is not None and done.prompt_logprobs is not None
    assert [p[:2] for p in finished.prompt_logprobs] == [p[:2] for p in done.prompt_logprobs]


async def test_resumed_and_fresh_requests_batch_together(engine: HFEngine) -> None:
    params = SamplingParams(max_new_tokens=16)
    full, _ = await run(engine, GenerationRequest("b-full", prompt=PROMPT, params=params))
    ids = [t.id for t in full]
    results = await asyncio.gather(
        *(
            run(engine, GenerationRequest(f"b{i}", prompt=PROMPT, params=params, resume_ids=ids[:i]))
            for i in (0, 3, 9)
        )
    )
    for cut, (rest, _) in zip((0, 3, 9), results, strict=True):
        assert [t.id for t in rest] == ids[cut:]
