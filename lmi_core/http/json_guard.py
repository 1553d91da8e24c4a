"""What a parsed JSON request body must be before any route reads it: text that UTF-8 can carry.

Invariant: a body that leaves ``check_body`` has no lone surrogate in any string or key (``"\\udc00"``
is valid JSON but no valid text: it passed pydantic in some fields and then failed when the request
was packed for the worker, a 500) and is nested at most ``MAX_DEPTH`` levels (no request schema
nests deeper than 5; msgpack refuses 512). Each failure is a 400 naming the field by its path.
The walk is iterative, so a deep body cannot exhaust the interpreter's stack here either.
"""

from __future__ import annotations

import re
from typing import Any

from lmi_core.errors import BadRequestError

MAX_DEPTH = 64
# A JSON escape of a UTF-16 surrogate (U+D800..U+DFFF): the only way one gets into a parsed string
# (raw surrogate bytes are invalid UTF-8 and fail the decode). Pairs are fine and joined by json.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _path(parts: tuple[str | int, ...]) -> str:
    """``("messages", 0, "content")`` -> ``messages[0].content`` (``body`` for the top level)."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "body"


def _valid_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_body(raw: bytes, value: Any) -> None:
    """Raise a 400 naming the field if ``value`` (parsed from ``raw``) is nested too deep or holds a
    lone surrogate. The surrogate scan runs only when ``raw`` has a surrogate escape at all."""
    scan_text = _SURROGATE_ESCAPE.search(raw) is not None
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_DEPTH:
            raise BadRequestError(f"request body is nested deeper than {MAX_DEPTH} levels", param=_path(path))
        if isinstance(item, str):
            if scan_text and not _valid_text(item):
                field = _path(path)
                raise BadRequestError(f"'{field}' contains a lone UTF-16 surrogate: not valid text", field)
        elif isinstance(item, dict):
            for key, child in item.items():
                if scan_text and not _valid_text(key):
                    raise BadRequestError("a field name contains a lone UTF-16 surrogate", _path(path))
                stack.append((child, (*path, key)))
        elif isinstance(item, list):
            stack.extend((child, (*path, i)) for i, child in enumerate(item))
