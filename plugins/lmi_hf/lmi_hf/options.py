"""The ``option.*`` keys the HF backend accepts, checked in the server before any worker starts."""

from __future__ import annotations

from collections.abc import Callable

from lmi_core.errors import ConfigError


def _positive_int(value: str) -> bool:
    return value.isdigit() and int(value) > 0


def _bool(value: str) -> bool:
    return value.lower() in ("true", "false")


DTYPES = ("auto", "fp32", "float32", "fp16", "float16", "bf16", "bfloat16")

# key -> (check, what is allowed)
HF_OPTIONS: dict[str, tuple[Callable[[str], bool], str]] = {
    "max_model_len": (_positive_int, "a positive integer"),
    "device_map": (lambda v: bool(v), "an accelerate device_map such as auto, cuda, cpu"),
    "attn_implementation": (lambda v: v in ("eager", "sdpa", "flash_attention_2"), "eager, sdpa or flash_attention_2"),
    "low_cpu_mem_usage": (_bool, "true or false"),
    "task": (lambda v: v == "text-generation", "text-generation"),
    "enable_streaming": (lambda v: True, "any value (ignored: every request may stream)"),
    "output_formatter": (lambda v: True, "any value (ignored)"),
}


def validate_hf_options(options: dict[str, str], dtype: str | None) -> None:
    """Raise ``ConfigError`` for an option the HF backend does not know or a bad value."""
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError("option.dtype", dtype, f"one of {', '.join(DTYPES)}")
    for key, value in options.items():
        if key not in HF_OPTIONS:
            allowed = ", ".join(f"option.{k}" for k in sorted(HF_OPTIONS))
            raise ConfigError(f"option.{key}", value, f"a key the hf backend knows ({allowed})")
        check, allowed = HF_OPTIONS[key]
        if not check(value):
            raise ConfigError(f"option.{key}", value, allowed)
