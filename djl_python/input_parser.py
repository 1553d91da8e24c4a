"""DJL's ``@input_formatter``: marks the function lmi-core runs on each request body before parsing it.

The function is called as ``f(decoded_payload, tokenizer=tokenizer)`` with the request's JSON object and
the engine's tokenizer (None where the engine has none), and returns the body to serve.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


def input_formatter(function: F) -> F:
    """Mark ``function`` as the model's input formatter (DJL's attribute, so DJL finds it too)."""
    function.is_input_formatter = True  # type: ignore[attr-defined]
    return function
