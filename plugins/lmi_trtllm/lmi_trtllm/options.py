"""``option.*`` keys of the trtllm backend: checked in the server, made ``LLM`` arguments in the worker.

Everything here runs without TensorRT-LLM: the server may not have it (the workers can run another
interpreter, ``option.pythonExecutable``). Keys follow DJL LMI's TensorRT-LLM names where DJL has one
(``kv_cache_free_gpu_mem_fraction``, ``enable_kv_cache_reuse``, ``max_output_len``); any key not known
here is a ``ConfigError`` naming it, so a typo fails the start instead of being ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmi_core.errors import ConfigError
from lmi_core.option_values import (
    boolean,
    close_matches,
    dtype,
    fraction,
    importable,
    integer,
    nonempty,
    parse_backend_options,
)
from lmi_trtllm.versions import MANIFEST_RELEASE, SUPPORTED

if TYPE_CHECKING:
    from lmi_core.config import ModelConfig
    from lmi_core.engine import WorkerContext

BACKEND = "trtllm"

INSTALL_HINT = (
    f"install it on a CUDA host with `pip install tensorrt-llm=={MANIFEST_RELEASE}` (lmi_trtllm supports "
    f"tensorrt-llm{SUPPORTED}; NVIDIA's wheels bring their own torch, see docs/trtllm.md), or point "
    "option.pythonExecutable at a Python that has it"
)


# option key -> (``LLM(...)`` argument, converter raising ValueError that says what is allowed).
LLM_KEYS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "max_num_tokens": ("max_num_tokens", integer(1)),
    "max_input_len": ("max_input_len", integer(1)),
    "max_seq_len": ("max_seq_len", integer(2)),
    "enable_chunked_prefill": ("enable_chunked_prefill", boolean),
    "dtype": ("dtype", dtype),
    "trust_remote_code": ("trust_remote_code", boolean),
    "guided_decoding_backend": ("guided_decoding_backend", lambda v: _guided_backend(v)),
    "revision": ("revision", nonempty),
    "tokenizer": ("tokenizer", nonempty),
}

# option key -> (``KvCacheConfig`` field, converter).
KV_CACHE_KEYS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "kv_cache_free_gpu_mem_fraction": ("free_gpu_memory_fraction", fraction),
    "enable_kv_cache_reuse": ("enable_block_reuse", boolean),
}


def _module_list(value: str) -> list[str]:
    modules = [m.strip() for m in value.split(",") if m.strip()]
    if not modules:
        raise ValueError("a comma-separated list of TensorRT-LLM module names (attn_q,attn_v,...)")
    return modules


# option key -> (``LoraConfig`` field, converter): lmi's LoRA keys (vLLM's names, which TensorRT-LLM's
# LoraConfig shares) and TensorRT-LLM's target modules (needed when no lora_dir is given at build).
LORA_KEYS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "max_loras": ("max_loras", integer(1)),
    "max_lora_rank": ("max_lora_rank", integer(1)),
    "max_cpu_loras": ("max_cpu_loras", integer(1)),
    "lora_target_modules": ("lora_target_modules", _module_list),
}
ENABLE_LORA = "enable_lora"

# DJL splits the sequence budget in two; TensorRT-LLM's LLM API takes max_seq_len = input + output.
MAX_OUTPUT_LEN = "max_output_len"

# LLM arguments that lmi sets from its own keys: naming them directly would be ambiguous.
RESERVED: dict[str, str] = {
    "model": "option.model_id",
    "tensor_parallel_size": "option.tensor_parallel_degree",
    "pipeline_parallel_size": "option.pipeline_parallel_degree",
    "max_batch_size": "option.max_rolling_batch_size",
}

# DJL keys accepted for compatibility; they change nothing here.
IGNORED = frozenset({"enable_streaming"})


@dataclass
class TrtllmOptions:
    """Parsed options: plain ``LLM(...)`` arguments and ``KvCacheConfig`` fields."""

    llm_args: dict[str, Any] = field(default_factory=dict)
    kv_cache: dict[str, Any] = field(default_factory=dict)
    enable_lora: bool = False
    lora: dict[str, Any] = field(default_factory=dict)  # LoraConfig fields, used with enable_lora


def _guided_backend(value: str) -> str:
    if value not in ("llguidance", "xgrammar"):
        raise ValueError("llguidance or xgrammar")
    return value


def parse_options(options: Mapping[str, Any]) -> TrtllmOptions:
    """Convert the backend's ``option.*`` strings (keys without the prefix); raise ``ConfigError``."""
    parsed = TrtllmOptions()
    max_output_len: int | None = None

    def apply(key: str, value: str) -> None:
        nonlocal max_output_len
        if key in LLM_KEYS:
            arg, convert = LLM_KEYS[key]
            parsed.llm_args[arg] = convert(value)
        elif key in KV_CACHE_KEYS:
            kv_field, convert = KV_CACHE_KEYS[key]
            parsed.kv_cache[kv_field] = convert(value)
        elif key in LORA_KEYS:
            lora_field, convert = LORA_KEYS[key]
            parsed.lora[lora_field] = convert(value)
        elif key == ENABLE_LORA:
            parsed.enable_lora = boolean(value)
        elif key == MAX_OUTPUT_LEN:
            max_output_len = integer(1)(value)
        else:
            raise ValueError(_unknown_key_hint(key))

    parse_backend_options(options, apply, engine="TensorRT-LLM", ignored=IGNORED, reserved=RESERVED)
    if max_output_len is not None:
        _apply_max_output_len(parsed, max_output_len)
    input_len = parsed.llm_args.get("max_input_len")
    seq_len = parsed.llm_args.get("max_seq_len")
    if input_len is not None and seq_len is not None and input_len >= seq_len:
        raise ConfigError(
            "option.max_input_len",
            input_len,
            f"less than max_seq_len ({seq_len}): the sequence holds the prompt and at least one output token",
        )
    return parsed


def _apply_max_output_len(parsed: TrtllmOptions, max_output_len: int) -> None:
    name = f"option.{MAX_OUTPUT_LEN}"
    if "max_seq_len" in parsed.llm_args:
        allowed = "unset when option.max_seq_len is set (max_seq_len bounds prompt plus output)"
        raise ConfigError(name, max_output_len, allowed)
    input_len = parsed.llm_args.get("max_input_len")
    if input_len is None:
        raise ConfigError(
            name,
            max_output_len,
            "set together with option.max_input_len (max_seq_len = max_input_len + max_output_len), "
            "or option.max_seq_len instead",
        )
    parsed.llm_args["max_seq_len"] = input_len + max_output_len


def _unknown_key_hint(key: str) -> str:
    known = [*LLM_KEYS, *KV_CACHE_KEYS, *LORA_KEYS, ENABLE_LORA, MAX_OUTPUT_LEN]
    listed = ", ".join("option." + k for k in sorted(known))
    return f"a key the trtllm backend knows ({listed}){close_matches(key, known)}"


def check_config(config: ModelConfig) -> None:
    """Server-side checks of a model served by trtllm: selection, parallelism, options."""
    chosen_by_auto = config.backend_name is None and (config.rolling_batch or "auto").lower() == "auto"
    if chosen_by_auto and not importable("tensorrt_llm"):
        # The backend is registered even without TensorRT-LLM (so that naming it explicitly reaches the
        # worker's clear install message); auto prefers any other backend and must not settle on it.
        raise ConfigError(
            "option.rolling_batch",
            config.rolling_batch or "auto",
            "a backend this host can run: auto only picks trtllm where this Python imports tensorrt_llm "
            f"({INSTALL_HINT}); set option.rolling_batch=trtllm to use it from another interpreter",
        )
    tp = config.tensor_parallel_degree
    if "tensor_parallel_degree" not in config.model_fields_set or not isinstance(tp, int):
        raise ConfigError(
            "option.tensor_parallel_degree",
            tp if "tensor_parallel_degree" in config.model_fields_set else None,
            "an explicit integer for the trtllm backend (TensorRT-LLM runs one rank per GPU; a built "
            "engine has a fixed degree)",
        )
    if config.mode != "mpi" and config.world_size > 1:
        raise ConfigError(
            "option.mpi_mode",
            config.mpi_mode,
            "true (or unset) when tensor_parallel_degree x pipeline_parallel_degree > 1: the trtllm "
            "backend runs its ranks in lmi's mpirun job, not as processes TensorRT-LLM spawns itself",
        )
    options: dict[str, Any] = dict(config.options)
    if config.dtype is not None:
        options["dtype"] = config.dtype
    parse_options(options)


def llm_kwargs(context: WorkerContext) -> dict[str, Any]:
    """``LLM(...)`` keyword arguments for ``context``, with ``kv_cache_config`` and ``lora_config`` as
    plain dicts (``KvCacheConfig(**it)``, ``LoraConfig(**it)`` in the worker) and without the MPI
    session (rank 0 adds it)."""
    parsed = parse_options(context.options)
    kwargs: dict[str, Any] = {
        "model": context.model_id,
        "tensor_parallel_size": context.tensor_parallel_degree,
        "pipeline_parallel_size": context.pipeline_parallel_degree,
        "max_batch_size": context.max_batch_size,
        "trust_remote_code": context.trust_remote_code,
        # Needed for any guided decoding; llguidance as in the other backends (JSON strings stay RFC 8259).
        "guided_decoding_backend": "llguidance",
        **parsed.llm_args,
    }
    if context.dtype is not None:  # checked by validate_config in the server
        kwargs["dtype"] = dtype(context.dtype)
    if parsed.kv_cache:
        kwargs["kv_cache_config"] = dict(parsed.kv_cache)
    if parsed.enable_lora:
        kwargs["lora_config"] = dict(parsed.lora)
    return kwargs
