"""DJL's ``Input``: one request to a ``handle(inputs)`` model, as DJL's Python engine hands it over.

``properties`` are the request's HTTP headers (looked up case-insensitively) and, for the call that
initializes the model, the model's ``option.*`` settings (without the prefix) and ``model_dir``.
``content`` holds the query parameters, then the body under the key ``data``; the initializing call
has none (``is_empty()``).
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any


class Input:
    def __init__(
        self,
        properties: dict[str, str] | None = None,
        content: list[tuple[str, bytes]] | None = None,
    ) -> None:
        self.properties: dict[str, str] = dict(properties or {})
        self.content: list[tuple[str, bytes]] = list(content or [])

    def __str__(self) -> str:
        keys = [key for key, _ in self.content]
        return f"properties: {self.properties} content: {keys}"

    def get_properties(self) -> dict[str, str]:
        return self.properties

    def get_property(self, key: str) -> str | None:
        """The property ``key`` (a header: any case), None when absent."""
        wanted = key.lower()
        return next((v for k, v in self.properties.items() if k.lower() == wanted), None)

    def add_property(self, key: str, value: str) -> Input:
        self.properties[key] = value
        return self

    def add(self, key: str, value: bytes | str) -> Input:
        self.content.append((key, value.encode() if isinstance(value, str) else bytes(value)))
        return self

    def contains_key(self, key: str) -> bool:
        return any(k == key for k, _ in self.content)

    def is_empty(self) -> bool:
        """True for the call that initializes the model (no request content)."""
        return not self.content

    def is_batch(self) -> bool:
        return False  # lmi-core hands a handle() one request at a time

    def get_batch_size(self) -> int:
        return 1

    def get_batches(self) -> list[Input]:
        return [self]

    def get_function_name(self) -> str | None:
        return self.get_property("handler")

    def get_as_bytes(self, key: str | None = None) -> bytes | None:
        """The content ``key``; without a key the body (``data``), else the first entry."""
        if not self.content:
            return None
        if key is not None:
            found = next((v for k, v in self.content if k == key), None)
            if found is None:
                raise KeyError(f"requested data for key:{key} is not found!")
            return found
        return next((v for k, v in self.content if k == "data"), self.content[0][1])

    def _bytes(self, key: str | None) -> bytes:
        data = self.get_as_bytes(key)
        if data is None:
            raise ValueError("the input is empty")
        return data

    def get_as_string(self, key: str | None = None) -> str:
        return self._bytes(key).decode("utf-8")

    def get_as_json(self, key: str | None = None) -> Any:
        return json.loads(self._bytes(key).decode("utf-8"))

    def get_as_csv(self, key: str | None = None) -> list[dict[str, str]]:
        return list(csv.DictReader(io.StringIO(self.get_as_string(key))))

    def get_data(self, key: str | None = None) -> Any:
        """The content decoded by the request's content type: JSON, text, or bytes."""
        content_type = self.get_property("content-type") or ""
        if not self.content:
            return None
        if content_type.startswith("application/json"):
            return self.get_as_json(key)
        if content_type.startswith("text/"):
            return self.get_as_string(key)
        return self.get_as_bytes(key)
