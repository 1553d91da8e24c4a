"""DJL's ``@output_formatter``: marks the function lmi-core runs on each response object it writes.

The function is called as ``f(response_data)`` with the response object (the whole result, or one
streamed line) and returns the object to write instead (a JSON value, or a string written as is).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


def output_formatter(function: F) -> F:
    """Mark ``function`` as the model's output formatter (DJL's attribute, so DJL finds it too)."""
    function.is_output_formatter = True  # type: ignore[attr-defined]
    return function
