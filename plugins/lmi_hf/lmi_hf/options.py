"""The ``option.*`` keys the HF backend accepts, checked in the server before any worker starts."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmi_core.errors import ConfigError
from lmi_core.option_values import LORA_OPTIONS, SERVER_OPTIONS
from lmi_core.pooling import POOLING_OPTIONS

if TYPE_CHECKING:
    from lmi_core.config import ModelConfig


def _positive_int(value: str) -> bool:
    return value.isdigit() and int(value) > 0


def _bool(value: str) -> bool:
    return value.lower() in ("true", "false")


DTYPES = ("auto", "fp32", "float32", "fp16", "float16", "bf16", "bfloat16")

# key -> (check, what is allowed)
HF_OPTIONS: dict[str, tuple[Callable[[str], bool], str]] = {
    "max_model_len": (_positive_int, "a positive integer"),
    "max_input_length": (_positive_int, "a positive integer (prompt tokens)"),
    "device_map": (lambda v: bool(v), "an accelerate device_map such as auto, cuda, cpu"),
    "attn_implementation": (
        lambda v: v in ("eager", "sdpa", "flash_attention_2"),
        "eager, sdpa or flash_attention_2",
    ),
    "low_cpu_mem_usage": (_bool, "true or false"),
    "enable_streaming": (lambda v: True, "any value (ignored: every request may stream)"),
}


def validate_hf_options(options: dict[str, str], dtype: str | None) -> None:
    """Raise ``ConfigError`` for an option the HF backend does not know or a bad value."""
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError("option.dtype", dtype, f"one of {', '.join(DTYPES)}")
    for key, value in options.items():
        if key in SERVER_OPTIONS or key in LORA_OPTIONS or key in POOLING_OPTIONS:  # checked by the core
            continue
        if key not in HF_OPTIONS:
            allowed = ", ".join(f"option.{k}" for k in sorted(HF_OPTIONS))
            raise ConfigError(f"option.{key}", value, f"a key the hf backend knows ({allowed})")
        check, allowed = HF_OPTIONS[key]
        if not check(value):
            raise ConfigError(f"option.{key}", value, allowed)


def local_model_config(config: ModelConfig) -> dict[str, Any] | None:
    """The model's ``config.json`` when the model is a local directory (None for a hub id)."""
    for candidate in (config.model_id, config.model_dir):
        path = Path(candidate or "") / "config.json"
        if candidate and path.is_file():
            data: dict[str, Any] = json.loads(path.read_text())
            nested: dict[str, Any] | None = data.get("text_config")
            return nested or data  # multimodal configs nest the language model's
    return None


def validate_parallelism(config: ModelConfig) -> None:
    """MPI mode splits attention heads, key/value heads and the vocabulary evenly across the ranks."""
    if config.mode != "mpi":
        return  # Python mode spreads whole layers over GPUs (device_map): any degree fits
    if not config.pooling.generates:
        # Encoders have no tensor-parallel plan in transformers, and one worker per device serves
        # small pooling models better than a sharded one.
        raise ConfigError(
            "engine",
            "MPI",
            f"Python: the hf backend serves option.task={config.pooling.task} in Python mode only",
        )
    if config.pipeline_parallel_degree > 1:
        raise ConfigError(
            "option.pipeline_parallel_degree",
            config.pipeline_parallel_degree,
            "1: the hf backend parallelizes MPI ranks by tensor_parallel_degree only",
        )
    tp = config.tensor_parallel_degree
    model = local_model_config(config) if isinstance(tp, int) and tp > 1 else None
    if model is None or not isinstance(tp, int):
        return
    heads = model.get("num_attention_heads")
    kv_heads = model.get("num_key_value_heads") or heads
    vocab = model.get("vocab_size")
    if any(isinstance(n, int) and n % tp for n in (heads, kv_heads, vocab)):
        raise ConfigError(
            "option.tensor_parallel_degree",
            tp,
            f"a divisor of the model's {heads} attention heads, {kv_heads} key/value heads and vocabulary "
            f"size {vocab} (in MPI mode each rank holds an equal share of each)",
        )
