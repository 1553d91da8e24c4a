"""Option checks and pure conversions of the vLLM backend (most need no vLLM)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Literal

import pytest

from lmi_core.engine import GenerationRequest, SamplingParams, StructuredOutput
from lmi_core.errors import BadRequestError, ConfigError, EngineError
from lmi_core.serving.server import resolve_model
from lmi_vllm import options as opts
from lmi_vllm.convert import finish_reason, output_events, reasoning_kwargs, split_text
from lmi_vllm.start import cpu_bind_lists, structured_outputs_config


def model_config(**options: str) -> Any:
    from lmi_core.config import ModelConfig

    return ModelConfig(model_id="/models/x", backend="vllm", options=options)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_model_len", "abc"),
        ("max_model_len", "0"),
        ("enforce_eager", "maybe"),
        ("gpu_memory_utilization", "1.5"),
        ("dtype", "int3"),
        ("cpu_kvcache_space", "-1"),
        ("max_input_length", "0"),
        ("runner", "pooling"),  # reserved: option.task sets it
        ("max_num_seqs", "4"),  # reserved: lmi's option.max_rolling_batch_size sets it
    ],
)
def test_bad_known_option_names_the_key(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        opts.parse_options({key: value}, pass_through=False)
    assert info.value.key == f"option.{key}"
    assert value in str(info.value)


def test_known_options_convert_without_vllm() -> None:
    parsed = opts.parse_options(
        {
            "max_model_len": "256",
            "enforce_eager": "false",
            "dtype": "bf16",
            "quantize": "awq",
            "max_rolling_batch_prefill_tokens": "1024",
            "cpu_kvcache_space": "2",
            "warmup": "false",
            "enable_streaming": "true",  # DJL key, ignored
            "some_vllm_field": "x",  # unchecked without vLLM: kept for the worker to check
        },
        pass_through=False,
    )
    assert parsed.engine_args == {
        "max_model_len": 256,
        "enforce_eager": False,
        "dtype": "bfloat16",
        "quantization": "awq",
        "max_num_batched_tokens": 1024,
        "some_vllm_field": "x",
    }
    assert parsed.cpu_kvcache_space == 2
    assert parsed.warmup is False


def test_validate_config_hook_checks_dtype_and_ignores_other_backends(pm: Any) -> None:
    config = model_config(max_model_len="nope")
    with pytest.raises(ConfigError, match=r"option\.max_model_len"):
        pm.hook.validate_config(config=config)
    config.backend = "hf"
    pm.hook.validate_config(config=config)  # not ours: no error
    bad_dtype = model_config()
    bad_dtype.dtype = "fp8x"
    with pytest.raises(ConfigError, match=r"option\.dtype"):
        pm.hook.validate_config(config=bad_dtype)


def test_register_and_resolve_mode(pm: Any) -> None:
    specs = [s for group in pm.hook.register_backends() for s in group]
    spec = next(s for s in specs if s.name == "vllm")
    assert spec.default_mode == "python" and "lmi-dist" in spec.rolling_batch and spec.auto_priority == 10
    # No resolve_mode hook: the core falls back to the BackendSpec's default mode.
    assert resolve_model(model_config(), pm).mode == "python"


def test_convert_by_declared_type() -> None:
    assert opts.convert("8", int | None) == 8
    assert opts.convert("none", int | None) is None
    assert opts.convert("8", int | str) == 8
    assert opts.convert("abc", int | str) == "abc"
    assert opts.convert("True", bool) is True
    assert opts.convert("fcfs", Literal["fcfs", "priority"]) == "fcfs"
    assert opts.convert("1,2", list[int]) == [1, 2]
    assert opts.convert("[1, 2]", list[int] | None) == [1, 2]
    assert opts.convert('{"a": 1}', dict[str, Any]) == {"a": 1}
    with pytest.raises(ValueError, match="one of fcfs, priority"):
        opts.convert("lifo", Literal["fcfs", "priority"])
    with pytest.raises(ValueError, match="JSON object"):
        opts.convert("[1]", dict[str, int])


def test_split_text_joins_to_the_delta() -> None:
    assert split_text("ab", ["a"]) == ["ab"]
    assert split_text("ab", ["a", "b"]) == ["a", "b"]
    # Byte-level pieces that do not join to the delta (partial UTF-8): the last token takes it all.
    assert split_text("\ufffdx", ["", "x"]) == ["", "\ufffdx"]
    assert split_text("", []) == []


def test_cpu_bind_lists_split_the_cpus_among_the_ranks() -> None:
    assert cpu_bind_lists([0, 1], 2) == "0|1"
    assert cpu_bind_lists([0, 1, 2, 3, 4], 2) == "0,1|2,3"
    with pytest.raises(EngineError, match="at least one CPU each"):
        cpu_bind_lists([0], 2)


def test_finish_reason_mapping() -> None:
    assert finish_reason("length", None) == "length"
    assert finish_reason("stop", "###") == "stop_sequence"
    assert finish_reason("stop", None) == "eos_token"
    assert finish_reason("stop", 7) == "eos_token"
    assert finish_reason("abort", None) == "cancelled"
    with pytest.raises(EngineError):
        finish_reason("error", None)


def test_output_events_from_a_delta() -> None:
    lp = SimpleNamespace
    completion = SimpleNamespace(
        text="Hi there",
        token_ids=[5, 6],
        logprobs=[
            {
                5: lp(logprob=-0.5, rank=1, decoded_token="Hi"),
                9: lp(logprob=-1.0, rank=2, decoded_token="Ho"),
            },
            {6: lp(logprob=-0.1, rank=1, decoded_token=" there")},
        ],
        finish_reason="length",
        stop_reason=None,
    )
    output = SimpleNamespace(outputs=[completion], finished=True)
    events = output_events(output, frozenset({2}), 1, "prompt", 3, 4)
    tokens, finished = events[:2], events[2]
    assert [t.text for t in tokens] == ["Hi", " there"]
    assert tokens[0].log_prob == -0.5 and tokens[0].top_logprobs == [(5, "Hi", -0.5)]
    assert [t.last for t in tokens] == [False, True]  # the final token of a finished output
    assert finished.finish_reason == "length"
    assert (finished.prompt_tokens, finished.generated_tokens, finished.prompt) == (3, 6, "prompt")


# -- pass-through keys: need vLLM's EngineArgs ----------------------------------------------------


@pytest.mark.vllm
def test_pass_through_fields_convert_by_type() -> None:
    parsed = opts.parse_options(
        {
            "long_prefill_token_threshold": "16",
            "scheduling_policy": "priority",
            "disable_log_stats": "true",
            "compilation_config": '{"mode": 0}',
        },
        pass_through=True,
    )
    assert parsed.engine_args == {
        "long_prefill_token_threshold": 16,
        "scheduling_policy": "priority",
        "disable_log_stats": True,
        "compilation_config": {"mode": 0},
    }


@pytest.mark.vllm
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_modle_len", "64", "did you mean option.max_model_len"),
        ("long_prefill_token_threshold", "lots", "an integer"),
        ("scheduling_policy", "lifo", "one of fcfs, priority"),
        ("compilation_config", "{not json", "valid JSON"),
        ("compilation_config", '{"no_such_field": 1}', "a valid CompilationConfig"),
    ],
)
def test_bad_pass_through_option_names_the_key(key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        opts.parse_options({key: value}, pass_through=True)
    assert info.value.key == f"option.{key}"
    assert message in str(info.value)


@pytest.mark.vllm
def test_validate_config_checks_pass_through_when_vllm_is_installed(pm: Any) -> None:
    with pytest.raises(ConfigError, match=r"option\.not_a_vllm_field"):
        pm.hook.validate_config(config=model_config(not_a_vllm_field="1"))


# -- reasoning -------------------------------------------------------------------------------------


def test_reasoning_kwargs_place_the_grammar_of_a_constrained_request() -> None:
    thinks = StructuredOutput("json", "{}", starts_after="</think>")
    kwargs = {"enable_thinking": True}
    request = GenerationRequest("r", params=SamplingParams(structured=thinks), chat_template_kwargs=kwargs)
    assert reasoning_kwargs(request, gate=True) == {
        "reasoning_ended": False,  # the thinking comes first: vLLM's parser waits for its end
        "reasoning_parser_kwargs": {"chat_template_kwargs": kwargs},
    }
    at_once = GenerationRequest("r", params=SamplingParams(structured=StructuredOutput("json", "{}")))
    assert reasoning_kwargs(at_once, gate=True) == {
        "reasoning_ended": True,
        "reasoning_parser_kwargs": {"chat_template_kwargs": {}},
    }
    assert reasoning_kwargs(request, gate=False) == {}  # no parser in vLLM (refused before)
    assert reasoning_kwargs(GenerationRequest("r", prompt="x"), gate=True) == {}  # nothing to place


def test_a_constraint_after_the_thinking_needs_a_vllm_parser() -> None:
    from lmi_vllm.engine import VllmEngine

    params = SamplingParams(structured=StructuredOutput("json", "{}", starts_after="</think>"))
    with pytest.raises(BadRequestError, match="vLLM's reasoning parser"):
        VllmEngine.sampling_params(SimpleNamespace(reasoning_gate=False), params)  # type: ignore[arg-type]


def test_the_option_s_own_structured_outputs_config_keeps_its_reasoning_parser() -> None:
    given = {"backend": "xgrammar"}
    assert structured_outputs_config({"structured_outputs_config": given}, "qwen3") == {
        "reasoning_parser": "qwen3",
        **given,
    }
    own = {"reasoning_parser": "deepseek_r1"}
    assert structured_outputs_config({"structured_outputs_config": own}, "qwen3") == own
    assert structured_outputs_config({"structured_outputs_config": given}, None) == given


@pytest.mark.vllm
def test_lmi_s_parser_names_are_vllm_s() -> None:
    from lmi_core.reasoning import BUILTIN_PARSERS
    from lmi_vllm.start import vllm_reasoning_parser

    for name in BUILTIN_PARSERS:
        assert vllm_reasoning_parser({"reasoning_parser": name}) == name
    assert vllm_reasoning_parser({"reasoning_parser": "a_plugin_s_own"}) is None
    assert vllm_reasoning_parser({}) is None
    config = structured_outputs_config({}, "qwen3")
    assert (config.reasoning_parser, config.backend) == ("qwen3", "guidance")


@pytest.mark.parametrize(
    ("options", "given", "expected"),
    [
        ({}, None, {}),
        ({"task": "text-embedding"}, None, {"runner": "pooling", "pooler_config": {"use_activation": True}}),
        (
            {"task": "embed", "pooling": "mean", "normalize": "false"},
            {"max_embed_len": 4},
            {
                "runner": "pooling",
                "pooler_config": {"max_embed_len": 4, "seq_pooling_type": "MEAN", "use_activation": False},
            },
        ),
        ({"task": "rerank"}, None, {"runner": "pooling", "pooler_config": None}),
    ],
)
def test_a_pooling_task_runs_vllms_pooling_runner(
    options: dict[str, str], given: dict[str, Any] | None, expected: dict[str, Any]
) -> None:
    from lmi_core.pooling import pooling_settings
    from lmi_vllm.start import pooling_kwargs

    assert pooling_kwargs(pooling_settings(options), given) == expected
