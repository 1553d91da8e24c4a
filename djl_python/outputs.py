"""DJL's ``Output``: what a ``handle(inputs)`` model returns, written as the HTTP response.

``code`` and ``message`` become the status, ``properties`` the headers (``Content-Type`` among
them), and the content entry ``data`` (else the first entry) the body. Values added that are not
bytes or text are written as JSON, as DJL writes them.
"""

from __future__ import annotations

import json
from typing import Any


class Output:
    def __init__(self, code: int = 200, message: str = "OK") -> None:
        self.code = code
        self.message = message
        self.properties: dict[str, str] = {}
        self.content: list[tuple[str, bytes]] = []

    def __str__(self) -> str:
        keys = [key for key, _ in self.content]
        return f"Output(code={self.code}, message={self.message!r}, properties={self.properties}, {keys})"

    def set_code(self, code: int) -> Output:
        self.code = code
        return self

    def set_message(self, message: str) -> Output:
        self.message = message
        return self

    def error(self, error: str, code: int = 424, message: str = "invoke handler failure") -> Output:
        """The response DJL writes for a handler failure: ``{"code", "message", "error"}``."""
        self.code = code
        self.message = message
        self.add_property("content-type", "application/json")
        return self.add_as_json({"code": code, "message": message, "error": error})

    def add_property(self, key: str, value: Any) -> Output:
        self.properties[key] = str(value)
        return self

    def get_properties(self) -> dict[str, str]:
        return self.properties

    def get_property(self, key: str) -> str | None:
        return self.properties.get(key)

    def add(self, value: Any, key: str | None = None, batch_index: int | None = None) -> Output:
        """Add ``value`` (bytes, text, or anything JSON can write) under ``key``."""
        name = "" if key is None else str(key)
        if batch_index is not None:
            name = f"batch_{batch_index}.{name}"
        if isinstance(value, str):
            data = value.encode("utf-8")
        elif isinstance(value, bytes | bytearray):
            data = bytes(value)
        else:
            data = _json(value)
        self.content.append((name, data))
        return self

    def add_as_json(self, value: Any, key: str | None = None, batch_index: int | None = None) -> Output:
        return self.add(_json(value), key=key, batch_index=batch_index)

    def body(self) -> bytes:
        """What the response carries: the entry ``data``, else the first one, else nothing."""
        return next((v for k, v in self.content if k == "data"), self.content[0][1] if self.content else b"")


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, default=_plain).encode("utf-8")


def _plain(value: Any) -> Any:
    """numpy scalars and arrays, and anything with ``tolist`` or ``model_dump``, as JSON values."""
    for method in ("tolist", "model_dump", "item"):
        if hasattr(value, method):
            return getattr(value, method)()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
