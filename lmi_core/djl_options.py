"""The ``option.*`` keys of DJL Serving's request/response behaviour, read by lmi-core's core on every
backend: output formats, TGI compatibility, SageMaker's stateful sessions, the custom code's handler.

Invariant: every key here is validated when the model's configuration is built (a bad value stops the
start with a ``ConfigError`` naming it) and then honoured, or refused by name when lmi-core does not
implement it (DJL's Bedrock formats); backends skip them (``option_values.SERVER_OPTIONS``).
Standard library only.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

from lmi_core.errors import ConfigError
from lmi_core.option_values import integer, true_or_false

OutputFormatter = Literal["json", "jsonlines", "sse", "json_chat", "jsonlines_chat", "sse_chat"]
OUTPUT_FORMATTERS: tuple[OutputFormatter, ...] = (
    "json",
    "jsonlines",
    "sse",
    "json_chat",
    "jsonlines_chat",
    "sse_chat",
)
# DJL values lmi-core refuses, with the reason.
REFUSED_FORMATTERS = {
    "3p": "Bedrock's response shape is not implemented",
    "3p_stream": "Bedrock's response shape is not implemented",
    "none": "raw engine output is not a response lmi-core writes",
}
T = TypeVar("T")
# DJL's default directory of session files (RAM-backed where /dev/shm exists).
SESSIONS_DIR = "djl_sessions"
SESSIONS_EXPIRATION = 20 * 60  # seconds: DJL's default


@functools.cache  # read per request (ModelConfig.djl): the stat of /dev/shm was half of its 7 us
def default_sessions_path() -> str:
    root = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(root, SESSIONS_DIR)


@dataclass(frozen=True)
class DjlOptions:
    """A model's DJL request/response options (``ModelConfig.djl``)."""

    output_formatter: OutputFormatter | None = None  # None: json, or jsonlines / sse when streamed
    tgi_compat: bool = False
    sessions: bool = True  # DJL's default: NEW_SESSION / CLOSE served, session ids checked
    sessions_path: str = ""
    sessions_expiration: int = SESSIONS_EXPIRATION
    handler: str = "handle"  # the function of the custom code that serves a handle() model


def output_formatter(value: str) -> OutputFormatter:
    """One of DJL's output formatter names that lmi-core writes (``ValueError`` naming the rest)."""
    for name in OUTPUT_FORMATTERS:
        if value == name:
            return name
    reason = REFUSED_FORMATTERS.get(value, "a custom formatter goes in model.py with @output_formatter")
    raise ValueError(f"one of {', '.join(OUTPUT_FORMATTERS)} ({value}: {reason})")


def _read(options: Mapping[str, str], key: str, convert: Callable[[str], T], default: T) -> T:
    if key not in options:
        return default
    try:
        return convert(str(options[key]))
    except ValueError as exc:
        raise ConfigError(f"option.{key}", options[key], str(exc)) from None


def djl_options(options: Mapping[str, str]) -> DjlOptions:
    """The DJL options of ``options`` (the model's ``option.*`` keys without the prefix)."""
    if _read(options, "bedrock_compat", true_or_false, False):
        raise ConfigError("option.bedrock_compat", options["bedrock_compat"], "false: not implemented")
    handler = str(options.get("handler", "handle"))
    if not handler.isidentifier():
        raise ConfigError("option.handler", handler, "a Python function name")
    return DjlOptions(
        output_formatter=_read(options, "output_formatter", output_formatter, None),
        tgi_compat=_read(options, "tgi_compat", true_or_false, False),
        sessions=_read(options, "enable_stateful_sessions", true_or_false, True),
        sessions_path=str(options.get("sessions_path") or default_sessions_path()),
        sessions_expiration=_read(options, "sessions_expiration", integer(1), SESSIONS_EXPIRATION),
        handler=handler,
    )
