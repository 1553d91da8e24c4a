"""The vLLM engine through lmi's worker hooks, in process, on the tiny demo model (CPU)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Any

import pytest

from lmi_core.engine import EngineStats, Finished, GenerationRequest, SamplingParams, StructuredOutput, Token
from lmi_core.errors import BadRequestError, ConfigError, EngineError
from lmi_core.operations import Detokenize, Tokenize
from tests.lmi_vllm.conftest import started_engine
from tests.other_engine import FINISHED, STATS, OtherEngine

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]  # the engine fixture's loop

# Matches the engine fixture's max_model_len (conftest.MAX_MODEL_LEN).
MAX_MODEL_LEN = 512

PROMPT = "The quick brown fox jumps over the lazy dog"
TIMEOUT = 120.0


async def run(
    pm: Any, engine: Any, prompt: str | None = PROMPT, **params: Any
) -> tuple[list[Token], Finished]:
    """All events of one request, through the handle_request hook."""
    request = GenerationRequest(
        request_id=f"t-{id(params)}-{len(params)}", prompt=prompt, params=SamplingParams(**params)
    )
    return await asyncio.wait_for(collect(pm.hook.handle_request(engine=engine, request=request)), TIMEOUT)


async def collect(events: Any) -> tuple[list[Token], Finished]:
    tokens: list[Token] = []
    finished: Finished | None = None
    async for event in events:
        assert finished is None, "no event may follow Finished"
        if isinstance(event, Token):
            tokens.append(event)
        else:
            finished = event
    assert finished is not None
    return tokens, finished


def text_of(tokens: list[Token]) -> str:
    return "".join(t.text for t in tokens)


async def test_loaded_engine_reports_stats(pm: Any, engine: Any) -> None:
    stats = pm.hook.engine_stats(engine=engine)
    assert isinstance(stats, EngineStats)
    assert stats.running == 0 and stats.waiting == 0


async def test_vllm_prometheus_logger_is_dropped_and_lmi_counts_still_come(pm: Any, engine: Any) -> None:
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    loggers = engine.llm.logger_manager.stat_loggers
    assert loggers and not any(isinstance(logger, PrometheusStatLogger) for logger in loggers)
    before = engine._scheduler.prefix_cache_queries
    await run(pm, engine, max_new_tokens=2)
    assert engine._scheduler.prefix_cache_queries > before  # lmi's SchedulerCounts logger records


async def test_greedy_is_deterministic_and_stops_at_max_new_tokens(pm: Any, engine: Any) -> None:
    first = await run(pm, engine, max_new_tokens=12, ignore_eos=True)
    second = await run(pm, engine, max_new_tokens=12, ignore_eos=True)
    assert [t.id for t in first[0]] == [t.id for t in second[0]]
    assert text_of(first[0]) == text_of(second[0])
    tokens, finished = first
    assert len(tokens) == 12
    assert finished.finish_reason == "length"
    assert finished.generated_tokens == 12
    assert finished.prompt == PROMPT
    assert finished.prompt_tokens == len(engine.tokenizer.encode(PROMPT))


async def test_streamed_texts_join_to_the_decoded_output(pm: Any, engine: Any) -> None:
    tokens, _ = await run(pm, engine, max_new_tokens=40, ignore_eos=True)
    decoded = engine.tokenizer.decode([t.id for t in tokens], skip_special_tokens=True)
    assert text_of(tokens) == decoded


async def test_logprobs_and_top_logprobs(pm: Any, engine: Any) -> None:
    tokens, _ = await run(pm, engine, max_new_tokens=6, ignore_eos=True, top_logprobs=3)
    for token in tokens:
        assert token.log_prob <= 0.0
        assert token.top_logprobs is not None and len(token.top_logprobs) == 3
        values = [lp for _, _, lp in token.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert token.top_logprobs[0][0] == token.id  # greedy picks the most likely token
        assert token.top_logprobs[0][2] == pytest.approx(token.log_prob)
    plain, _ = await run(pm, engine, max_new_tokens=6, ignore_eos=True)
    assert all(t.top_logprobs is None for t in plain)
    assert [t.log_prob for t in plain] == pytest.approx([t.log_prob for t in tokens])
    # A client that does not read logprobs does not make vLLM compute them.
    unasked, _ = await run(pm, engine, max_new_tokens=6, ignore_eos=True, logprobs=False)
    assert [t.id for t in unasked] == [t.id for t in plain]
    assert all(t.log_prob is None for t in unasked)
    assert engine.sampling_params(SamplingParams(logprobs=False)).logprobs is None


async def test_stop_sequence(pm: Any, engine: Any) -> None:
    tokens, _ = await run(pm, engine, max_new_tokens=40, ignore_eos=True)
    full = text_of(tokens)
    # A stop string from the middle of the greedy output: the output must end right before it.
    stop = next(
        full[i : i + 3]
        for i in range(4, len(full) - 3)
        if full[i : i + 3].strip() and "\ufffd" not in full[i : i + 3]
    )
    stopped, finished = await run(pm, engine, max_new_tokens=40, ignore_eos=True, stop_sequences=[stop])
    assert finished.finish_reason == "stop_sequence"
    assert text_of(stopped) == full[: full.index(stop)]


async def test_sampling_with_seed_is_reproducible(pm: Any, engine: Any) -> None:
    args = dict(
        max_new_tokens=10, ignore_eos=True, do_sample=True, temperature=1.5, top_k=50, top_p=0.9, seed=7
    )
    first, _ = await run(pm, engine, **args)
    second, _ = await run(pm, engine, **args)
    assert [t.id for t in first] == [t.id for t in second]


async def test_chat_messages_use_the_chat_template(pm: Any, engine: Any) -> None:
    request = GenerationRequest(
        request_id="chat-1",
        messages=[{"role": "user", "content": "hello"}],
        params=SamplingParams(max_new_tokens=4, ignore_eos=True),
    )
    tokens, finished = await collect(pm.hook.handle_request(engine=engine, request=request))
    assert finished.prompt == "<|user|>\nhello</s>\n<|assistant|>\n"
    assert len(tokens) == 4


async def test_tokenize_counts_what_a_generation_of_the_request_counts(pm: Any, engine: Any) -> None:
    for request in (
        GenerationRequest("tok-chat", messages=[{"role": "user", "content": "hello"}]),
        GenerationRequest("tok-text", prompt=PROMPT),
    ):
        counted = await pm.hook.handle_operation(engine=engine, operation=Tokenize(request, token_strs=True))
        generated = dataclasses.replace(request, params=SamplingParams(max_new_tokens=1))
        _, finished = await collect(pm.hook.handle_request(engine=engine, request=generated))
        assert len(counted.ids) == finished.prompt_tokens == len(counted.token_strs or [])
    ids = (await pm.hook.handle_operation(engine=engine, operation=Tokenize(request, False))).ids
    assert await pm.hook.handle_operation(engine=engine, operation=Detokenize(ids)) == PROMPT
    with pytest.raises(BadRequestError, match="out of the vocabulary"):
        await pm.hook.handle_operation(engine=engine, operation=Detokenize([10**8]))


async def test_concurrent_requests(pm: Any, engine: Any) -> None:
    results = await asyncio.gather(
        *(run(pm, engine, prompt=f"{PROMPT} {i}", max_new_tokens=8, ignore_eos=True) for i in range(4))
    )
    assert all(len(tokens) == 8 and finished.finish_reason == "length" for tokens, finished in results)


def count_aborts(engine: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The request ids ``engine`` aborts in vLLM from now on (its ``abort`` still runs)."""
    aborted: list[str] = []
    real = engine.abort

    async def abort(request_id: str) -> None:
        aborted.append(request_id)
        await real(request_id)

    monkeypatch.setattr(engine, "abort", abort)
    return aborted


async def test_closing_the_stream_aborts_the_request_in_vllm(
    pm: Any, engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    aborted = count_aborts(engine, monkeypatch)
    before = (engine.requests.cancelled_total, engine.requests.finished_total)
    request = GenerationRequest(
        request_id="cancel-1",
        prompt=PROMPT,
        params=SamplingParams(max_new_tokens=MAX_MODEL_LEN - 20, ignore_eos=True),
    )
    events = pm.hook.handle_request(engine=engine, request=request)
    received = [await asyncio.wait_for(events.__anext__(), TIMEOUT) for _ in range(3)]
    assert all(isinstance(e, Token) for e in received)
    busy = pm.hook.engine_stats(engine=engine)  # vLLM's scheduler reported it with the first steps
    assert (busy.running, busy.waiting, busy.extra["inflight"]) == (1, 0, 1.0)
    assert busy.kv_cache_usage is not None and busy.kv_cache_usage > 0.0  # its blocks, typed for the router
    await events.aclose()  # what the worker's task cancellation amounts to
    assert (engine.requests.cancelled_total, engine.requests.finished_total) == (before[0] + 1, before[1])
    assert aborted == ["cancel-1"]
    # vLLM forgot the request: its output processor holds nothing (no need to wait for it).
    assert engine.llm.get_num_unfinished_requests() == 0
    assert pm.hook.engine_stats(engine=engine).extra["inflight"] == 0.0


async def test_cancelling_the_task_aborts_the_request(
    pm: Any, engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    aborted = count_aborts(engine, monkeypatch)
    first_token = asyncio.Event()
    request = GenerationRequest(
        request_id="cancel-2",
        prompt=PROMPT,
        params=SamplingParams(max_new_tokens=MAX_MODEL_LEN - 20, ignore_eos=True),
    )

    async def consume() -> None:
        async for _ in pm.hook.handle_request(engine=engine, request=request):
            first_token.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_token.wait(), TIMEOUT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert aborted == ["cancel-2"]
    assert engine.llm.get_num_unfinished_requests() == 0
    tokens, finished = await run(pm, engine, max_new_tokens=3, ignore_eos=True)  # still serving
    assert finished.finish_reason == "length" and len(tokens) == 3


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU per tensor-parallel rank")
async def test_tensor_parallel_2_gives_the_greedy_tokens_of_tp_1(
    pm: Any, engine: Any, worker_context: Any
) -> None:
    # vLLM's own TP workers; on a single-NUMA host the plugin binds each rank to its own CPUs.
    context = worker_context()
    context.tensor_parallel_degree = 2
    async with started_engine(pm, context) as tp2:
        tokens, finished = await run(pm, tp2, max_new_tokens=12, ignore_eos=True)
    expected, _ = await run(pm, engine, max_new_tokens=12, ignore_eos=True)
    assert [t.id for t in tokens] == [t.id for t in expected]
    assert finished.finish_reason == "length"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ  # set only while vLLM started its workers


async def test_prompt_longer_than_max_model_len_is_a_bad_request(pm: Any, engine: Any) -> None:
    with pytest.raises(BadRequestError) as info:
        await run(pm, engine, prompt=" ".join(["fox"] * (MAX_MODEL_LEN * 2)))
    assert info.value.param == "inputs" and info.value.status == 400
    assert str(MAX_MODEL_LEN) in str(info.value)


async def test_generation_is_cut_at_max_model_len(pm: Any, engine: Any) -> None:
    words = MAX_MODEL_LEN
    while len(engine.tokenizer.encode(" ".join(["fox"] * words))) > MAX_MODEL_LEN - 4:
        words -= 1
    prompt = " ".join(["fox"] * words)
    room = MAX_MODEL_LEN - len(engine.tokenizer.encode(prompt))
    tokens, finished = await run(pm, engine, prompt=prompt, max_new_tokens=30, ignore_eos=True)
    assert finished.finish_reason == "length"
    assert len(tokens) == room < 30


async def test_bad_sampling_parameters_are_bad_requests(pm: Any, engine: Any) -> None:
    # max_new_tokens 0 used to be refused; it now scores the prompt only (OpenAI echo, max_tokens=0).
    tokens, finished = await run(pm, engine, max_new_tokens=0)
    assert tokens == [] and finished.generated_tokens == 0
    with pytest.raises(BadRequestError):
        await run(pm, engine, max_new_tokens=2, typical_p=0.5)  # no typical sampling in vLLM
    with pytest.raises(BadRequestError):  # over vLLM's max_logprobs (20): rejected by vLLM itself
        await run(pm, engine, max_new_tokens=2, top_logprobs=50)
    assert engine.llm.get_num_unfinished_requests() == 0


async def test_stats_count_requests_and_finished_counts_tokens(pm: Any, engine: Any) -> None:
    before = pm.hook.engine_stats(engine=engine)
    tokens, finished = await run(pm, engine, max_new_tokens=5, ignore_eos=True)
    after = pm.hook.engine_stats(engine=engine)
    assert after.finished_total == before.finished_total + 1
    # Tokens are counted by the server, from the events (EngineStats has only what the engine knows).
    assert finished.generated_tokens == len(tokens) == 5
    assert finished.prompt_tokens == len(engine.tokenizer.encode(PROMPT))


async def test_max_model_len_matches_the_fixture(engine: Any, max_model_len: int) -> None:
    assert engine.max_model_len == max_model_len == MAX_MODEL_LEN


async def test_bad_option_fails_the_load_with_the_key(pm: Any, worker_context: Any) -> None:
    with pytest.raises(ConfigError, match=r"option\.max_modle_len"):
        pm.hook.load_engine(context=worker_context(max_modle_len="64"))


async def test_other_backends_are_left_alone(pm: Any, engine: Any, worker_context: Any) -> None:
    context = worker_context()
    context.backend = "hf"
    assert pm.hook.load_engine(context=context) is None
    other = OtherEngine()
    events = pm.hook.handle_request(engine=other, request=GenerationRequest(request_id="x", prompt="a"))
    assert await collect(events) == ([], FINISHED)
    assert pm.hook.engine_stats(engine=other) == STATS


async def test_a_repeated_prompt_is_counted_in_the_prefix_cache_stats(pm: Any, engine: Any) -> None:
    ids = engine.tokenizer.encode(" ".join(f"tenant context {i}" for i in range(200)))[:300]
    prompt = engine.tokenizer.decode(ids)
    before = pm.hook.engine_stats(engine=engine)
    # 3 tokens: the prefill step's stats are recorded before the request's last output.
    for _ in range(2):
        await run(pm, engine, prompt=prompt, max_new_tokens=3, ignore_eos=True)
    after = pm.hook.engine_stats(engine=engine)
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    assert queries >= 2 * 250  # both prompts were looked up, in tokens
    assert hits >= 250 - 128  # the second found all the first's whole blocks (a block is <= 128 tokens)
    assert after.kv_cache_tokens > 0 and after.kv_cache_usage == 0.0  # idle: nothing held
    assert not {"kv_cache_usage", "kv_cache_tokens", "prefix_cache_hits"} & after.extra.keys()


async def test_a_resumed_greedy_request_continues_the_uninterrupted_one(pm: Any, engine: Any) -> None:
    """Every cut of one generation: resumed exactly, or (cut inside a character) refused."""
    params = SamplingParams(max_new_tokens=20, ignore_eos=True, min_tokens=15)
    full, done = await collect(
        pm.hook.handle_request(engine=engine, request=GenerationRequest("full", prompt=PROMPT, params=params))
    )
    ids = [t.id for t in full]
    exact = 0
    for cut in range(1, len(ids)):
        request = GenerationRequest(f"cut{cut}", prompt=PROMPT, params=params, resume_ids=ids[:cut])
        try:
            rest, finished = await asyncio.wait_for(
                collect(pm.hook.handle_request(engine=engine, request=request)), TIMEOUT
            )
        except EngineError as exc:
            assert "inside a character" in str(exc)
            continue
        exact += 1
        assert [t.id for t in rest] == ids[cut:]
        assert text_of(full[:cut] + rest) == text_of(full), cut
        assert rest[0].prompt_tokens is None
        assert (finished.prompt_tokens, finished.generated_tokens) == (done.prompt_tokens, 20)
    assert exact > 0


async def test_a_structured_request_is_not_resumed(pm: Any, engine: Any) -> None:
    params = SamplingParams(max_new_tokens=5, structured=StructuredOutput("choice", '["a", "b"]'))
    request = GenerationRequest("s", prompt=PROMPT, params=params, resume_ids=[5])
    with pytest.raises(EngineError, match="structured-output"):
        await collect(pm.hook.handle_request(engine=engine, request=request))


async def test_option_max_input_length_is_checked_before_the_engine_runs(pm: Any, engine: Any) -> None:
    saved = engine.max_input_length
    engine.max_input_length = 8  # what option.max_input_length=8 sets at load
    try:
        with pytest.raises(BadRequestError, match=r"option\.max_input_length") as info:
            await run(pm, engine, prompt=" ".join(["fox"] * 20))
        assert info.value.param == "inputs"
        tokens, _ = await run(pm, engine, prompt="fox", max_new_tokens=2)
        assert len(tokens) == 2
    finally:
        engine.max_input_length = saved


async def test_priority_reaches_vllm_only_with_its_priority_scheduler(
    pm: Any, engine: Any, worker_context: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def spy(loaded: Any) -> list[int]:
        seen: list[int] = []
        real = loaded.llm.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            seen.append(kwargs["priority"])
            return real(*args, **kwargs)

        monkeypatch.setattr(loaded.llm, "generate", generate)
        return seen

    def request(priority: int) -> GenerationRequest:
        params = SamplingParams(max_new_tokens=2, ignore_eos=True)
        return GenerationRequest(f"p{priority}", prompt=PROMPT, params=params, priority=priority)

    # fcfs (vLLM's default) refuses any priority but 0: lmi's queue alone orders by it.
    fcfs = spy(engine)
    tokens, _ = await collect(pm.hook.handle_request(engine=engine, request=request(7)))
    assert len(tokens) == 2 and fcfs == [0]
    async with started_engine(pm, worker_context(scheduling_policy="priority", warmup="false")) as ordered:
        given = spy(ordered)
        for priority in (-3, 7):
            tokens, _ = await collect(pm.hook.handle_request(engine=ordered, request=request(priority)))
            assert len(tokens) == 2
        assert given == [-3, 7]
