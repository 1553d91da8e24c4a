"""``option.*`` keys of the vLLM backend: checked in the server, turned into engine args in the worker.

Three kinds of keys:

* lmi keys with their own meaning, checked here without vLLM (``max_model_len``, ``enforce_eager``,
  ``dtype``, ...), DJL aliases (``max_rolling_batch_prefill_tokens``, ``quantize``) and this plugin's
  own keys (``cpu_kvcache_space``);
* any other field of vLLM's ``AsyncEngineArgs`` dataclass, passed through after converting the string
  by the field's declared type (JSON for dicts, lists and nested configs);
* everything else is an error naming the key.

Pass-through keys can only be checked where vLLM is importable. The server may run without vLLM (the
worker can use another interpreter, ``option.pythonExecutable``); then they are checked in the worker
when the engine loads, which fails the model's startup with the same ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import logging
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

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
from lmi_core.pooling import POOLING_OPTIONS

logger = logging.getLogger(__name__)

# DJL option names -> vLLM EngineArgs fields.
ALIASES: dict[str, str] = {
    "max_rolling_batch_prefill_tokens": "max_num_batched_tokens",
    "quantize": "quantization",
}

# EngineArgs fields that lmi sets from its own keys: naming them directly would be ambiguous.
RESERVED: dict[str, str] = {
    "model": "option.model_id",
    "max_num_seqs": "option.max_rolling_batch_size",
    "tensor_parallel_size": "option.tensor_parallel_degree",
    "pipeline_parallel_size": "option.pipeline_parallel_degree",
    "served_model_name": "option.served_model_name",
    "runner": "option.task",
}

# DJL keys accepted for compatibility; they change nothing here.
IGNORED = frozenset({"enable_streaming", "rolling_batch", "mpi_mode"})

# Keys checked without vLLM: key -> converter (raises ValueError naming what is allowed).
KNOWN: dict[str, Callable[[str], Any]] = {
    "dtype": dtype,
    "max_model_len": integer(1),
    "enforce_eager": boolean,
    "gpu_memory_utilization": fraction,
    "enable_prefix_caching": boolean,
    "enable_chunked_prefill": boolean,
    "trust_remote_code": boolean,
    "max_num_batched_tokens": integer(1),
    "quantization": nonempty,
    "block_size": integer(1),
    "seed": integer(),
    "max_logprobs": integer(0),
    "tokenizer": nonempty,
    "revision": nonempty,
}

# This plugin's own keys (not EngineArgs fields).
PLUGIN_KEYS: dict[str, Callable[[str], Any]] = {
    # GiB of KV cache on CPU (VLLM_CPU_KVCACHE_SPACE); vLLM's own default takes most of the RAM.
    "cpu_kvcache_space": integer(1),
    # Run one short request while loading, so the first client does not pay vLLM's lazy compiles.
    "warmup": boolean,
    # Prompt tokens a request may have (a 400 naming it past that); the context less one by default.
    "max_input_length": integer(1),
}


@dataclass
class VllmOptions:
    """Parsed options: ``AsyncEngineArgs`` keyword arguments plus this plugin's own settings."""

    engine_args: dict[str, Any] = field(default_factory=dict)
    cpu_kvcache_space: int | None = None
    warmup: bool = True


@functools.cache
def engine_arg_fields() -> dict[str, Any]:
    """The fields of vLLM's ``AsyncEngineArgs``, by name, with their declared types (imports vLLM)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return {f.name: f.type for f in dataclasses.fields(AsyncEngineArgs) if not f.name.startswith("_")}


def parse_options(options: Mapping[str, Any], *, pass_through: bool | None = None) -> VllmOptions:
    """Convert the backend's ``option.*`` strings (keys without the prefix) to engine arguments.

    ``pass_through``: check keys that are vLLM EngineArgs fields (needs vLLM); None = when importable.
    Unchecked pass-through keys are kept as strings. Raises ``ConfigError`` naming the bad key.
    """
    if pass_through is None:
        pass_through = importable("vllm")
    fields = engine_arg_fields() if pass_through else None
    parsed = VllmOptions()

    def apply(key: str, value: str) -> None:
        if key in PLUGIN_KEYS:
            converted = PLUGIN_KEYS[key](value)
            if key == "cpu_kvcache_space":
                parsed.cpu_kvcache_space = converted
            elif key == "warmup":
                parsed.warmup = converted
        elif (target := ALIASES.get(key, key)) in KNOWN:
            parsed.engine_args[target] = KNOWN[target](value)
        elif fields is None:
            parsed.engine_args[target] = value  # checked in the worker, where vLLM is installed
        elif target in fields:
            parsed.engine_args[target] = convert(value, fields[target])
        else:
            raise ValueError(_unknown_key_hint(key, fields))

    # option.task, pooling and normalize: the core's (lmi_core.pooling); engine_kwargs maps them.
    ignored = IGNORED | POOLING_OPTIONS
    parse_backend_options(options, apply, engine="vLLM", ignored=ignored, reserved=RESERVED)
    return parsed


def _unknown_key_hint(key: str, fields: Mapping[str, Any]) -> str:
    hint = close_matches(key, [*fields, *KNOWN, *PLUGIN_KEYS, *ALIASES])
    return f"a key the vllm backend knows: an lmi option or a vLLM EngineArgs field{hint}"


# -- string -> declared type ---------------------------------------------------------------------


def convert(value: str, annotation: Any) -> Any:
    """Convert a ``serving.properties`` string to the EngineArgs field type ``annotation``.

    Raises ``ValueError`` whose message says what is allowed.
    """
    if isinstance(annotation, str) or annotation is Any:
        return _json_or_str(value)  # an annotation vLLM left unresolved: let vLLM check it
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if len(members) < len(args) and value.strip().lower() in ("none", "null"):
            return None
        # str last, so that "8" becomes 8 for `int | str`.
        members.sort(key=lambda a: a is str)
        for member in members:
            try:
                return convert(value, member)
            except ValueError:
                continue
        raise ValueError(" or ".join(_describe(m) for m in members))
    if origin is Literal:
        for choice in args:
            if str(choice) == value.strip() or (
                isinstance(choice, str) and choice.lower() == value.strip().lower()
            ):
                return choice
        raise ValueError(f"one of {', '.join(str(a) for a in args)}")
    if annotation is bool:
        return boolean(value)
    if annotation is int:
        return integer()(value)
    if annotation is float:
        try:
            return float(value)
        except ValueError:
            raise ValueError("a number") from None
    if annotation is str:
        return value
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        for member in annotation:
            if value.strip().lower() in (member.name.lower(), str(member.value).lower()):
                return member
        raise ValueError(f"one of {', '.join(m.name for m in annotation)}")
    if origin in (list, set, tuple, frozenset) or annotation in (list, set, tuple, frozenset):
        container = origin or annotation
        items = (
            _json(value)
            if value.strip().startswith("[")
            else [v.strip() for v in value.split(",") if v.strip()]
        )
        if not isinstance(items, list):
            raise ValueError("a JSON list or a comma-separated list")
        item_type = args[0] if args else str
        return container(convert(i, item_type) if isinstance(i, str) else i for i in items)
    if origin is dict or annotation is dict or _is_config_class(annotation):
        loaded = _json(value)
        if not isinstance(loaded, dict):
            raise ValueError("a JSON object")
        if _is_config_class(annotation):
            try:  # vLLM's config classes check their fields on construction (cheap, offline)
                annotation(**loaded)
            except Exception as exc:
                lines = str(exc).strip().splitlines()
                raise ValueError(f"a valid {annotation.__name__} ({lines[0] if lines else exc!r})") from None
        return loaded  # EngineArgs.__post_init__ builds the nested config from the dict
    if origin is type or origin is typing.Callable or typing.get_origin(annotation) is not None:
        raise ValueError(f"a {_describe(annotation)}, which cannot be given as a string")
    return _json_or_str(value)


def _is_config_class(annotation: Any) -> bool:
    return isinstance(annotation, type) and (
        dataclasses.is_dataclass(annotation) or hasattr(annotation, "model_fields")
    )


def _json(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"valid JSON ({exc.msg} at column {exc.colno})") from None


def _json_or_str(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _describe(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")
