"""What a JSON request body must be before any route reads it: UTF-8 text that the worker socket can carry.

Invariant: a body that leaves ``decode_utf8`` and ``check_body`` has no lone surrogate in any string or
key, no integer beyond 64 bits (msgpack's), and is nested at most ``MAX_DEPTH`` levels (no request
schema nests deeper than 5; msgpack refuses 512). A lone surrogate comes in two ways: a JSON escape
(``"\\udc00"``: valid JSON, no valid text), or raw bytes that are not UTF-8 (``ED A0 80``, an encoded
surrogate, which CPython's ``json.loads`` of bytes decodes with ``surrogatepass`` and let through to
the worker socket's encoder: a 500). ``decode_utf8`` turns every invalid byte into a lone surrogate
(``surrogateescape``), so both are one case, and ``check_body`` refuses it with a 400 naming the
field by its path, as it names an integer too large. The walk is iterative, so a deep body cannot
exhaust the interpreter's stack here either.
"""

from __future__ import annotations

import codecs
import re
from typing import Any

from lmi_core.errors import BadRequestError

MAX_DEPTH = 64
# A JSON escape of a UTF-16 surrogate (U+D800..U+DFFF). Pairs are fine and joined by json.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def has_surrogate_escape(raw: bytes) -> bool:
    """Whether ``raw`` has a ``\\uD800``..``\\uDFFF`` escape: only then can a decoded string hold a
    lone surrogate (with ``decode_utf8`` clean), so only then does ``check_body`` scan the strings."""
    return _SURROGATE_ESCAPE.search(raw) is not None


def decode_utf8(raw: bytes) -> tuple[str, bool]:
    """``raw`` as text (RFC 8259: JSON between systems is UTF-8; a BOM is skipped) and whether it was
    valid UTF-8. Invalid bytes become lone surrogates (``surrogateescape``) for ``check_body`` to find
    and name, rather than a byte offset the client would have to map back to a field."""
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return str(raw[start:], "utf-8"), True
    except UnicodeDecodeError:
        return str(raw[start:], "utf-8", "surrogateescape"), False


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


NOT_TEXT = "is not valid UTF-8 text (invalid bytes, or a lone UTF-16 surrogate)"


def check_body(value: Any, scan_text: bool) -> None:
    """Raise a 400 naming the field if ``value`` is nested too deep, holds an integer beyond 64 bits
    (it fits no field and cannot reach a worker) or, when ``scan_text``, a string or key that is not
    valid text."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_DEPTH:
            raise BadRequestError(f"request body is nested deeper than {MAX_DEPTH} levels", param=_path(path))
        if isinstance(item, int) and not -(2**63) <= item < 2**64:
            field = _path(path)
            raise BadRequestError(f"'{field}' is an integer that does not fit in 64 bits", field)
        if isinstance(item, str):
            if scan_text and not _valid_text(item):
                field = _path(path)
                raise BadRequestError(f"'{field}' {NOT_TEXT}", field)
        elif isinstance(item, dict):
            for key, child in item.items():
                if scan_text and not _valid_text(key):
                    raise BadRequestError(f"a field name {NOT_TEXT}", _path(path))
                stack.append((child, (*path, key)))
        elif isinstance(item, list):
            stack.extend((child, (*path, i)) for i, child in enumerate(item))
