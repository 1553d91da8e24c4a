"""Converters for backend plugins' ``option.*`` strings.

Each takes the raw string and returns the typed value, or raises ``ValueError`` whose message says
what is allowed; ``parse_backend_options`` runs a backend's converters over its ``option.*`` keys and
turns those errors into a ``ConfigError`` naming the key. Standard library only.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lmi_core.errors import ConfigError

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


# Model options the HTTP layer reads (tool calling), the same on every backend: not engine options.
SERVER_OPTIONS = frozenset({"enable_auto_tool_choice", "tool_call_parser"})
# LoRA options, checked by the core (``config.lora_settings``) and read by every backend's engine.
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
