"""LoRA in the TensorRT-LLM backend without TensorRT-LLM: options -> ``LoraConfig`` fields, lmi's
adapter -> ``LoRARequest`` arguments and ids, and the 400 naming an adapter TensorRT-LLM refuses."""

from __future__ import annotations

import pytest

from lmi_core.engine import LoraAdapter, WorkerContext
from lmi_core.errors import ConfigError
from lmi_trtllm.convert import lora_error, lora_id, lora_request_kwargs
from lmi_trtllm.options import llm_kwargs, parse_options


def context(**options: str) -> WorkerContext:
    return WorkerContext(model_id="/models/m", model_dir=None, backend="trtllm", options=options)


def test_lora_options_become_a_lora_config() -> None:
    kwargs = llm_kwargs(
        context(
            enable_lora="true",
            max_loras="2",
            max_lora_rank="16",
            max_cpu_loras="4",
            lora_target_modules="attn_q, attn_v",
        )
    )
    assert kwargs["lora_config"] == {
        "max_loras": 2,
        "max_lora_rank": 16,
        "max_cpu_loras": 4,
        "lora_target_modules": ["attn_q", "attn_v"],
    }


def test_no_lora_config_unless_enabled() -> None:
    assert "lora_config" not in llm_kwargs(context(max_loras="2"))
    assert "lora_config" not in llm_kwargs(context(enable_lora="false"))
    assert llm_kwargs(context(enable_lora="true"))["lora_config"] == {}  # TensorRT-LLM's defaults


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"enable_lora": "maybe"}, "option.enable_lora"),
        ({"max_loras": "0"}, "option.max_loras"),
        ({"max_lora_rank": "x"}, "option.max_lora_rank"),
        ({"lora_target_modules": " , "}, "option.lora_target_modules"),
    ],
)
def test_bad_lora_options_name_the_key(options: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        parse_options(options)


def test_lora_request_arguments_and_ids() -> None:
    ids: dict[tuple[str, str], int] = {}
    a = LoraAdapter("a", "/adapters/a")
    assert lora_id(ids, a) == 1
    assert lora_id(ids, LoraAdapter("b", "/adapters/b")) == 2
    assert lora_id(ids, LoraAdapter("a", "/adapters/a", pinned=True)) == 1  # same weights, same id
    assert lora_id(ids, LoraAdapter("a", "/adapters/a-v2")) == 3  # new weights: a new id
    assert lora_request_kwargs(a, 1) == {
        "lora_name": "a",
        "lora_int_id": 1,
        "lora_path": "/adapters/a",
        "lora_ckpt_source": "hf",
    }


def test_lora_error_is_a_400_naming_the_adapter() -> None:
    error = lora_error(LoraAdapter("a", "/gone"), ValueError("lora_path (/gone) does not exist."))
    assert (error.status, error.param) == (400, "adapter")
    assert "'a'" in str(error) and "does not exist" in str(error)
