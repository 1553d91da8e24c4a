"""Converters for backend plugins' ``option.*`` strings, and ``importable``.

Each converter takes the raw string and returns the typed value, or raises ``ValueError`` whose
message says what is allowed; ``parse_backend_options`` runs a backend's converters over its
``option.*`` keys and turns those errors into a ``ConfigError`` naming the key. ``importable`` tells a
plugin whether its engine's package is installed, without importing it. Standard library only.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from lmi_core.errors import ConfigError

T = TypeVar("T")

# lmi / DJL dtype names -> the names torch-based engines take.
DTYPES: dict[str, str] = {
    "auto": "auto",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
}


def importable(name: str) -> bool:
    """Whether this interpreter can import the top-level package ``name``, without importing it (an
    engine's import takes seconds: the server's hooks and the config checks only ask)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    # origin None: a namespace package (a directory of that name on sys.path, such as tests/lmi_vllm
    # when tests/ is on it), not the package.
    return spec is not None and spec.origin is not None


def boolean(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError("true or false")


def integer(minimum: int | None = None) -> Callable[[str], int]:
    """An integer converter, at least ``minimum`` when given."""
    allowed = "an integer" if minimum is None else f"an integer >= {minimum}"

    def convert(value: str) -> int:
        try:
            number = int(value.strip())
        except ValueError:
            raise ValueError(allowed) from None
        if minimum is not None and number < minimum:
            raise ValueError(allowed)
        return number

    return convert


def fraction(value: str) -> float:
    """A number in (0, 1], such as a memory fraction."""
    try:
        number = float(value)
    except ValueError:
        raise ValueError("a number in (0, 1]") from None
    if not 0.0 < number <= 1.0:
        raise ValueError("a number in (0, 1]")
    return number


def nonempty(value: str) -> str:
    if not value.strip():
        raise ValueError("a non-empty string")
    return value.strip()


def dtype(value: str) -> str:
    try:
        return DTYPES[value.strip().lower()]
    except KeyError:
        raise ValueError(f"one of {', '.join(DTYPES)}") from None


def close_matches(key: str, known: Iterable[str]) -> str:
    """`` (did you mean option.x?)`` for a misspelt key, or an empty string."""
    close = difflib.get_close_matches(key, list(known), n=3)
    return f" (did you mean {', '.join('option.' + c for c in close)}?)" if close else ""


# Model options the core reads, the same on every backend, not engine options: tool calling, reasoning
# and chat template defaults (the HTTP layer; lmi_vllm reads reasoning_parser too, for vLLM's grammar
# gate), DJL's output formats, TGI mode and sessions (``lmi_core.djl_options``), the custom code file
# and its handler (``lmi_core.custom_code``).
SERVER_OPTIONS = frozenset(
    {
        "enable_auto_tool_choice",
        "tool_call_parser",
        "reasoning_parser",
        "default_chat_template_kwargs",
        "output_formatter",
        "tgi_compat",
        "bedrock_compat",
        "enable_stateful_sessions",
        "sessions_path",
        "sessions_expiration",
        "entryPoint",
        "handler",
    }
)
# LoRA options, checked by the core (``lora_settings`` in ``build_model_config``) and read by every
# backend's engine with the same defaults.
LORA_OPTIONS = frozenset({"enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras"})


def parse_backend_options(
    options: Mapping[str, Any],
    apply: Callable[[str, str], None],
    *,
    engine: str,
    ignored: Iterable[str] = (),
    reserved: Mapping[str, str] | None = None,
) -> None:
    """Call ``apply(key, value)`` for every backend option (keys without ``option.``, values as strings).

    ``ignored`` keys (DJL's, meaningless here) are skipped; a ``reserved`` key (one lmi sets from its own
    option, named by the mapping) is an error pointing at that option; a ``ValueError`` from ``apply``
    (a bad value, or an unknown key) becomes a ``ConfigError`` naming ``option.<key>`` and the value.
    """
    skip = frozenset(ignored) | SERVER_OPTIONS
    for key, raw in options.items():
        value = str(raw)
        name = f"option.{key}"
        if key in skip:
            continue
        if reserved and key in reserved:
            raise ConfigError(name, value, f"{reserved[key]} instead (lmi sets {engine}'s {key} from it)")
        try:
            apply(key, value)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(name, value, str(exc)) from None


# vLLM's MaxLoRARanks (vllm/config/lora.py): the ranks its LoRA kernels are built for.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA for one model. The keys stay in ``options`` too: every backend reads them (vLLM's own
    engine arguments have these names and meanings)."""

    enabled: bool = False
    max_loras: int = 4  # adapters active in one batch
    max_lora_rank: int = 16  # the largest ``r`` an adapter may have
    max_cpu_loras: int = 4  # adapters a worker keeps loaded (LRU beyond), >= max_loras


def true_or_false(value: str) -> bool:
    """DJL's booleans (``Boolean.parseBoolean``, but strict): every backend reads the same value."""
    if value.strip().lower() not in ("true", "false"):
        raise ValueError("true or false")
    return value.strip().lower() == "true"


def json_object(value: str) -> dict[str, Any]:
    try:
        loaded = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"a JSON object ({exc})") from None
    if not isinstance(loaded, dict):
        raise ValueError("a JSON object")
    return loaded


def read_option(options: Mapping[str, Any], key: str, convert: Callable[[str], T], default: T) -> T:
    """``option.<key>`` converted (``default`` when unset); a bad value is a ``ConfigError`` naming it."""
    raw = options.get(key)
    if raw is None:
        return default
    try:
        return convert(str(raw))
    except ValueError as exc:
        raise ConfigError(f"option.{key}", raw, str(exc)) from None


def default_chat_template_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    """``option.default_chat_template_kwargs``: variables every chat request's template gets unless the
    request's own ``chat_template_kwargs`` sets them (``{"enable_thinking": false}``)."""
    return read_option(options, "default_chat_template_kwargs", json_object, {})


def lora_settings(options: Mapping[str, str]) -> LoraSettings:
    """``option.enable_lora``, ``max_loras``, ``max_lora_rank``, ``max_cpu_loras``; a bad value is a
    ``ConfigError`` naming its key."""
    enabled = read_option(options, "enable_lora", true_or_false, False)
    max_loras = read_option(options, "max_loras", integer(1), LoraSettings.max_loras)
    rank = read_option(options, "max_lora_rank", integer(1), LoraSettings.max_lora_rank)
    if rank not in LORA_RANKS:
        raise ConfigError("option.max_lora_rank", options["max_lora_rank"], f"one of {LORA_RANKS}")
    cpu = read_option(options, "max_cpu_loras", integer(1), max_loras)
    if cpu < max_loras:
        allowed = f"at least max_loras ({max_loras})"
        raise ConfigError("option.max_cpu_loras", options["max_cpu_loras"], allowed)
    return LoraSettings(enabled, max_loras, rank, cpu)
