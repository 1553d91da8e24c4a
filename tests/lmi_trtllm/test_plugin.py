"""The TensorRT-LLM backend without TensorRT-LLM: selection, mode, option checks, the missing-package
error (unit and through a real 2-rank ``lmi serve``), and the pure request/response conversions.

TensorRT-LLM needs NVIDIA GPUs and is not installable here, so nothing below runs its engine; the
conversion tests feed plain stand-ins shaped like its ``CompletionOutput`` (docs/trtllm.md).
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lmi_core import hookimpl
from lmi_core.backends import BackendSpec, resolve_model, select_backend
from lmi_core.config import build_model_config
from lmi_core.engine import (
    EngineStats,
    Finished,
    GenerationRequest,
    LoraAdapter,
    SamplingParams,
    Token,
    WorkerContext,
)
from lmi_core.errors import BadRequestError, ConfigError, EngineError
from lmi_core.option_values import importable
from lmi_core.plugins import new_plugin_manager
from lmi_trtllm import plugin
from lmi_trtllm.convert import (
    StreamState,
    delta_events,
    finish_reason,
    map_error,
    sampling_kwargs,
    token_logprob,
)
from lmi_trtllm.engine import FollowerEngine, TrtllmEngine
from lmi_trtllm.options import llm_kwargs, parse_options
from tests.conftest import ServerProcess
from tests.other_engine import FINISHED, STATS, OtherEngine

needs_no_tensorrt_llm = pytest.mark.skipif(
    importable("tensorrt_llm"), reason="checks the behaviour where tensorrt_llm is not installed"
)


class OtherBackends:
    """Two backends on either side of trtllm's auto priority (20): vllm-like 10, hf-like 90."""

    def __init__(self, *names: str) -> None:
        self.names = names

    @hookimpl
    def register_backends(self) -> list[BackendSpec]:
        specs = [
            BackendSpec(name="fast", rolling_batch=("fast",), auto_priority=10),
            BackendSpec(name="slow", rolling_batch=("disable",), auto_priority=90),
        ]
        return [s for s in specs if s.name in self.names]


def manager(*others: str) -> Any:
    pm = new_plugin_manager(load_entry_points=False)
    pm.register(plugin, name="trtllm")
    if others:
        pm.register(OtherBackends(*others))
    return pm


def resolve(properties: dict[str, str], pm: Any = None) -> Any:
    config = build_model_config({"option.model_id": "/models/m", **properties}, environ={})
    return resolve_model(config, pm or manager("slow"))


# -- registration, selection, mode -----------------------------------------------------------------


def test_installed_plugin_registers_the_trtllm_backend() -> None:
    spec = {s.name: s for group in new_plugin_manager().hook.register_backends() for s in group}["trtllm"]
    assert (spec.default_mode, spec.rolling_batch) == ("mpi", ("trtllm",))


@pytest.mark.parametrize(
    ("installed", "others", "picked"),
    [
        (True, ("slow",), "trtllm"),  # preferred over hf ...
        (True, ("fast", "slow"), "fast"),  # ... but not over vllm
        (False, ("slow",), "slow"),  # never while tensorrt_llm is missing
    ],
)
def test_auto_picks_trtllm_only_when_tensorrt_llm_is_importable(
    monkeypatch: pytest.MonkeyPatch, installed: bool, others: tuple[str, ...], picked: str
) -> None:
    monkeypatch.setattr(plugin, "importable", lambda name: installed and name == "tensorrt_llm")
    assert select_backend(manager(*others), None, "auto").name == picked


@needs_no_tensorrt_llm
def test_auto_refuses_trtllm_when_it_is_the_only_backend_and_not_installed() -> None:
    with pytest.raises(ConfigError, match="pip install tensorrt-llm") as info:
        resolve({"option.tensor_parallel_degree": "1"}, manager())
    assert info.value.key == "option.rolling_batch"


@pytest.mark.parametrize("selection", [{"option.rolling_batch": "trtllm"}, {"option.backend": "trtllm"}])
def test_explicit_selection_resolves_to_mpi_mode_without_the_package(selection: dict[str, str]) -> None:
    config = resolve({**selection, "option.tensor_parallel_degree": "2"})
    assert (config.backend, config.mode, config.world_size) == ("trtllm", "mpi", 2)


def test_explicit_mpi_mode_false_is_allowed_for_one_rank_only() -> None:
    one = resolve(
        {"option.rolling_batch": "trtllm", "option.tensor_parallel_degree": "1", "option.mpi_mode": "false"}
    )
    assert one.mode == "python"
    with pytest.raises(ConfigError) as info:
        resolve(
            {
                "option.rolling_batch": "trtllm",
                "option.tensor_parallel_degree": "2",
                "option.mpi_mode": "false",
            }
        )
    assert info.value.key == "option.mpi_mode"


@pytest.mark.parametrize("tp", [None, "max"])
def test_tensor_parallel_degree_must_be_an_explicit_integer(tp: str | None) -> None:
    properties = {"option.rolling_batch": "trtllm"}
    if tp is not None:
        properties["option.tensor_parallel_degree"] = tp
    with pytest.raises(ConfigError, match="explicit integer") as info:
        resolve(properties)
    assert info.value.key == "option.tensor_parallel_degree"


# -- options ---------------------------------------------------------------------------------------


def test_known_options_convert_to_llm_arguments() -> None:
    parsed = parse_options(
        {
            "max_num_tokens": "8192",
            "max_input_len": "1024",
            "max_output_len": "512",
            "kv_cache_free_gpu_mem_fraction": "0.8",
            "enable_kv_cache_reuse": "false",
            "enable_chunked_prefill": "true",
            "dtype": "bf16",
            "trust_remote_code": "false",
            "enable_streaming": "true",  # DJL key, ignored
        }
    )
    assert parsed.llm_args == {
        "max_num_tokens": 8192,
        "max_input_len": 1024,
        "max_seq_len": 1536,  # DJL's max_input_len + max_output_len
        "enable_chunked_prefill": True,
        "dtype": "bfloat16",
        "trust_remote_code": False,
    }
    assert parsed.kv_cache == {"free_gpu_memory_fraction": 0.8, "enable_block_reuse": False}


@pytest.mark.parametrize(
    ("options", "key", "expected"),
    [
        ({"max_num_tokens": "lots"}, "option.max_num_tokens", "an integer >= 1"),
        ({"max_seq_len": "0"}, "option.max_seq_len", "an integer >= 2"),
        ({"kv_cache_free_gpu_mem_fraction": "1.5"}, "option.kv_cache_free_gpu_mem_fraction", "(0, 1]"),
        ({"enable_chunked_prefill": "maybe"}, "option.enable_chunked_prefill", "true or false"),
        ({"dtype": "int3"}, "option.dtype", "one of auto, fp16"),
        ({"max_batch_size": "8"}, "option.max_batch_size", "option.max_rolling_batch_size instead"),
        ({"max_num_token": "8"}, "option.max_num_token", "did you mean option.max_num_tokens"),
        ({"max_output_len": "64"}, "option.max_output_len", "together with option.max_input_len"),
        ({"max_output_len": "64", "max_seq_len": "128"}, "option.max_output_len", "unset when"),
        ({"max_input_len": "128", "max_seq_len": "128"}, "option.max_input_len", "less than max_seq_len"),
    ],
)
def test_bad_options_name_the_key(options: dict[str, str], key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_options(options)
    assert info.value.key == key
    assert expected in str(info.value)


def test_validate_config_checks_options_and_dtype_at_startup() -> None:
    base = {"option.rolling_batch": "trtllm", "option.tensor_parallel_degree": "2"}
    with pytest.raises(ConfigError, match=r"option\.kv_cache_fre"):
        resolve({**base, "option.kv_cache_fre": "0.5"})
    with pytest.raises(ConfigError, match=r"option\.dtype"):
        resolve({**base, "option.dtype": "int3"})


def test_llm_kwargs_from_the_worker_context() -> None:
    context = WorkerContext(
        model_id="/models/m",
        model_dir=None,
        backend="trtllm",
        options={"kv_cache_free_gpu_mem_fraction": "0.5"},
        dtype="fp16",
        trust_remote_code=True,
        mode="mpi",
        world_size=4,
        tensor_parallel_degree=2,
        pipeline_parallel_degree=2,
        max_batch_size=16,
    )
    assert llm_kwargs(context) == {
        "model": "/models/m",
        "tensor_parallel_size": 2,
        "pipeline_parallel_size": 2,
        "max_batch_size": 16,
        "guided_decoding_backend": "llguidance",
        "dtype": "float16",
        "trust_remote_code": True,
        "kv_cache_config": {"free_gpu_memory_fraction": 0.5},
    }


# -- loading without TensorRT-LLM ------------------------------------------------------------------


@needs_no_tensorrt_llm
def test_load_without_tensorrt_llm_raises_a_clear_engine_error() -> None:
    context = WorkerContext(model_id="/models/m", model_dir=None, backend="trtllm", options={}, device="cuda")
    with pytest.raises(EngineError, match=r"tensorrt_llm package.*pip install tensorrt-llm"):
        manager().hook.load_engine(context=context)


async def test_other_backends_are_left_alone() -> None:
    context = WorkerContext(model_id="/models/m", model_dir=None, backend="hf", options={})
    pm = manager()
    assert pm.hook.load_engine(context=context) is None
    other = OtherEngine()
    events = pm.hook.handle_request(engine=other, request=GenerationRequest("r"))
    assert [e async for e in events] == [FINISHED]
    assert pm.hook.engine_stats(engine=other) == STATS


# -- ranks > 0 -------------------------------------------------------------------------------------


async def test_follower_rank_finishes_requests_at_once_and_reports_a_dead_loop() -> None:
    release = threading.Event()
    follower = FollowerEngine(1, release.wait)
    pm = manager()
    events = pm.hook.handle_request(engine=follower, request=GenerationRequest("r", prompt="hi"))
    assert [e async for e in events] == []
    assert pm.hook.engine_stats(engine=follower).running == 0

    def fail() -> None:
        raise RuntimeError("MPI went away")

    broken = FollowerEngine(2, fail)
    broken._thread.join(5)
    with pytest.raises(EngineError, match="MPI went away"):
        broken.stats()
    broken.shutdown()
    broken.stats()  # stopped on purpose: healthy
    release.set()


# -- rank 0 with a stand-in LLM ---------------------------------------------------------------------


class StreamingResult:
    """A stand-in for the streaming ``RequestOutput`` of ``LLM.generate_async``."""

    def __init__(self, completions: list[SimpleNamespace]) -> None:
        self.prompt_token_ids = [1, 2, 3]
        self.completions = completions
        self.aborted = False

    async def __aiter__(self) -> AsyncGenerator[SimpleNamespace, None]:
        for i, done in enumerate(self.completions):
            yield SimpleNamespace(outputs=[done], finished=i == len(self.completions) - 1)
            await asyncio.sleep(0)

    def abort(self) -> None:
        self.aborted = True


class StandInLLM:
    """The parts of ``tensorrt_llm.LLM`` that ``TrtllmEngine`` uses."""

    def __init__(self, completions: list[SimpleNamespace], lora: bool = False) -> None:
        self.tokenizer = SimpleNamespace(all_special_ids=[0], decode=lambda ids: "?")
        self._executor = SimpleNamespace(is_shutdown=lambda: False)
        self.args = SimpleNamespace(lora_config={} if lora else None)  # LLM.args: the parsed LlmArgs
        self.completions = completions
        self.results: list[StreamingResult] = []
        self.lora_requests: list[Any] = []

    def generate_async(
        self, text: str, sampling_params: Any, streaming: bool, lora_request: Any = None
    ) -> StreamingResult:
        self.lora_requests.append(lora_request)
        self.results.append(StreamingResult(self.completions))
        return self.results[-1]


async def test_rank_0_counts_requests_and_aborts_a_closed_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # TrtllmEngine imports tensorrt_llm.SamplingParams; the stand-in takes its keyword arguments.
    monkeypatch.setitem(sys.modules, "tensorrt_llm", SimpleNamespace(SamplingParams=dict))
    monkeypatch.setitem(
        sys.modules, "tensorrt_llm.sampling_params", SimpleNamespace(GuidedDecodingParams=dict)
    )
    llm = StandInLLM([completion([5], "a"), completion([6], "b"), completion([7], "c", reason="length")])
    engine = TrtllmEngine(llm)
    pm = manager()
    request = GenerationRequest("r", prompt="hi", params=SamplingParams(max_new_tokens=3))
    events = [e async for e in pm.hook.handle_request(engine=engine, request=request)]
    assert [type(e) for e in events] == [Token, Token, Token, Finished] and not llm.results[0].aborted
    stream = pm.hook.handle_request(engine=engine, request=request)
    await anext(stream)
    assert pm.hook.engine_stats(engine=engine) == EngineStats(running=1, finished_total=1)
    await stream.aclose()  # the client left
    assert llm.results[1].aborted
    assert pm.hook.engine_stats(engine=engine) == EngineStats(finished_total=1, cancelled_total=1)
    with pytest.raises(BadRequestError):  # refused before it reaches TensorRT-LLM: not counted
        pm.hook.handle_request(engine=engine, request=GenerationRequest("bad"))
    assert len(llm.results) == 2 and pm.hook.engine_stats(engine=engine).cancelled_total == 1


async def test_rank_0_sends_each_request_s_adapter_as_a_lora_request(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt_llm", SimpleNamespace(SamplingParams=dict))
    monkeypatch.setitem(
        sys.modules, "tensorrt_llm.sampling_params", SimpleNamespace(GuidedDecodingParams=dict)
    )

    def lora_request(**kwargs: Any) -> dict[str, Any]:  # TensorRT-LLM's check of the path
        if not Path(kwargs["lora_path"]).exists():
            raise ValueError(f"lora_path ({kwargs['lora_path']}) does not exist.")
        return kwargs

    monkeypatch.setitem(
        sys.modules, "tensorrt_llm.executor.request", SimpleNamespace(LoRARequest=lora_request)
    )
    llm = StandInLLM([completion([7], "c", reason="length")], lora=True)
    engine = TrtllmEngine(llm)
    pm = manager()
    params = SamplingParams(max_new_tokens=1)
    for i, adapter in enumerate([LoraAdapter("a", str(tmp_path)), None, LoraAdapter("a", str(tmp_path))]):
        request = GenerationRequest(f"r{i}", prompt="hi", params=params, adapter=adapter)
        _ = [e async for e in pm.hook.handle_request(engine=engine, request=request)]
    assert [r and (r["lora_name"], r["lora_int_id"]) for r in llm.lora_requests] == [("a", 1), None, ("a", 1)]
    stats = pm.hook.engine_stats(engine=engine)
    assert (stats.adapters, stats.lora_loads_total) == (["a"], 1)
    with pytest.raises(EngineError, match="'gone'") as raised:
        pm.hook.handle_request(
            engine=engine,
            request=GenerationRequest("x", prompt="hi", adapter=LoraAdapter("gone", str(tmp_path / "no"))),
        )
    assert (raised.value.status, raised.value.param) == (400, "adapter")
    await engine.unload_adapter("a")
    assert pm.hook.engine_stats(engine=engine).adapters == []
    without = TrtllmEngine(StandInLLM([]))
    with pytest.raises(BadRequestError, match="enable_lora"):
        without.generate(GenerationRequest("y", prompt="hi", adapter=LoraAdapter("a", str(tmp_path))))


# -- sampling parameters and finish reasons ------------------------------------------------------------


def test_greedy_request_is_explicitly_greedy() -> None:
    kwargs = sampling_kwargs(SamplingParams(max_new_tokens=5, stop_sequences=["\n"]))
    assert kwargs == {
        "max_tokens": 5,
        "ignore_eos": False,
        "logprobs": 1,
        "temperature": 0.0,
        "top_k": 1,
        "top_p": 1.0,
        "stop": ["\n"],
    }


def test_sampled_request_maps_every_parameter() -> None:
    params = SamplingParams(
        max_new_tokens=7, do_sample=True, temperature=0.7, top_p=0.9, top_k=0, seed=3, top_logprobs=4
    )
    kwargs = sampling_kwargs(params, templated=True)
    assert kwargs == {
        "max_tokens": 7,
        "ignore_eos": False,
        "logprobs": 4,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 0,
        "seed": 3,
        "add_special_tokens": False,
    }


@pytest.mark.parametrize(
    ("params", "param"), [({"max_new_tokens": 0}, "max_new_tokens"), ({"top_logprobs": -1}, "top_logprobs")]
)
def test_bad_sampling_parameters_are_bad_requests(params: dict[str, int], param: str) -> None:
    with pytest.raises(BadRequestError) as info:
        sampling_kwargs(SamplingParams(**params))
    assert info.value.param == param


@pytest.mark.parametrize(
    ("reason", "stop_reason", "expected"),
    [
        ("length", None, "length"),
        ("stop", None, "eos_token"),
        ("stop", 128009, "eos_token"),  # a stop token id
        ("stop", "\n\n", "stop_sequence"),
        ("cancelled", None, "cancelled"),
    ],
)
def test_finish_reasons(reason: str, stop_reason: int | str | None, expected: str) -> None:
    assert finish_reason(reason, stop_reason) == expected


def test_timeout_and_unknown_finish_reasons_are_errors() -> None:
    with pytest.raises(EngineError) as info:
        finish_reason("timeout", None)
    assert info.value.status == 504
    with pytest.raises(EngineError, match="not_finished"):
        finish_reason("not_finished", None)


def test_errors_map_to_status_codes() -> None:
    assert map_error(ValueError("prompt longer than max_seq_len")).status == 400
    assert map_error(RuntimeError("executor died")).status == 424
    original = EngineError("x", status=503)
    assert map_error(original) is original


# -- streamed responses -> tokens ----------------------------------------------------------------------


def lp(value: float) -> SimpleNamespace:
    return SimpleNamespace(logprob=value, rank=None)


def completion(
    ids: list[int], text: str, logprobs: list[Any] | None = None, reason: str | None = None, stop: Any = None
) -> SimpleNamespace:
    """A stand-in with the fields of TensorRT-LLM's streamed ``CompletionOutput``."""
    return SimpleNamespace(
        token_ids_diff=ids,
        text_diff=text,
        logprobs_diff=logprobs or [],
        finish_reason=reason,
        stop_reason=stop,
    )


def events(state: StreamState, output: SimpleNamespace, finished: bool = False, top_n: int = 0) -> list[Any]:
    return delta_events(
        output,
        finished,
        state,
        special_ids=frozenset({2}),
        top_n=top_n,
        decode=lambda tid: f"<{tid}>",
        prompt="Hi",
        prompt_tokens=3,
    )


def test_a_stream_becomes_tokens_then_finished() -> None:
    state = StreamState()
    first = events(state, completion([10], " Hello", [{10: lp(-0.5), 11: lp(-1.5)}]))
    assert first == [Token(id=10, text=" Hello", log_prob=-0.5, prompt_tokens=3)]  # on the first only
    last = events(state, completion([11, 2], " world", [-0.25, -0.1], reason="stop"), finished=True)
    assert last == [
        Token(id=11, text="", log_prob=-0.25),
        Token(id=2, text=" world", log_prob=-0.1, special=True, last=True),
        Finished(finish_reason="eos_token", prompt_tokens=3, generated_tokens=3, prompt="Hi"),
    ]


def test_text_without_a_token_goes_with_the_next_token() -> None:
    state = StreamState()
    assert events(state, completion([], "\u00e9")) == []
    assert [t.text for t in events(state, completion([7], "!"))] == ["\u00e9!"]


def test_top_logprobs_are_the_most_likely_alternatives() -> None:
    entry = {5: lp(-3.0), 1: lp(-0.1), 9: lp(-0.9)}  # 5 was sampled, outside the top 2
    assert token_logprob(5, entry, 2, lambda tid: f"<{tid}>") == (-3.0, [(1, "<1>", -0.1), (9, "<9>", -0.9)])
    assert token_logprob(5, None, 2, str) == (0.0, None)
    [token] = events(StreamState(), completion([5], "x", [entry]), top_n=1)
    assert token.top_logprobs == [(1, "<1>", -0.1)]


def test_a_finish_without_new_tokens_still_counts_every_token() -> None:
    state = StreamState()
    events(state, completion([4, 5], "ab"))
    [done] = events(state, completion([], "", reason="length"), finished=True)
    assert done == Finished(finish_reason="length", prompt_tokens=3, generated_tokens=2, prompt="Hi")


# -- a real server -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.mpi
@needs_no_tensorrt_llm
def test_serving_without_tensorrt_llm_fails_fast_from_a_two_rank_mpi_job(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    model = tmp_path / "trt-model"
    model.mkdir()
    (model / "serving.properties").write_text(
        "option.rolling_batch=trtllm\noption.tensor_parallel_degree=2\n"
    )
    server = start_server("--model-dir", str(model), wait=False)
    server.proc.wait(timeout=120)
    log = server.log()
    assert server.proc.returncode == 1, log[-3000:]
    assert "backend=trtllm mode=mpi" in log and "ranks/worker=2" in log
    assert "rank 0 host" in log and "rank 1 host" in log  # both ranks of the mpirun job started
    assert "lmi: error: model failed to load" in log
    assert "tensorrt_llm package" in log and "pip install tensorrt-llm" in log
    assert "restarting" not in log  # a load failure is final, not retried


def test_sampling_extras_map_to_tensorrt_llm_names() -> None:
    params = SamplingParams(
        max_new_tokens=4,
        repetition_penalty=1.2,
        frequency_penalty=0.5,
        presence_penalty=0.25,
        min_tokens=2,
        min_p=0.1,
        stop_token_ids=[7, 9],
    )
    kwargs = sampling_kwargs(params)
    assert kwargs["repetition_penalty"] == 1.2 and kwargs["frequency_penalty"] == 0.5
    assert kwargs["presence_penalty"] == 0.25 and kwargs["min_tokens"] == 2 and kwargs["min_p"] == 0.1
    assert kwargs["stop_token_ids"] == [7, 9]
    assert "repetition_penalty" not in sampling_kwargs(SamplingParams(max_new_tokens=4))


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"logit_bias": [(3, 1.0)]}, "logit_bias"),
        ({"typical_p": 0.5}, "typical_p"),
        ({"prompt_logprobs": 0}, "prompt_logprobs"),
        ({"truncate": 8}, "truncate"),
    ],
)
def test_what_tensorrt_llm_cannot_do_is_a_400_naming_it(params: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequestError) as info:
        sampling_kwargs(SamplingParams(max_new_tokens=4, **params))
    assert info.value.param == param and "trtllm" in str(info.value)
