"""The Responses API's store: the responses a model keeps (``option.responses_store=memory``).

Invariant: memory is bounded. Each model's store holds at most ``option.responses_store_size``
responses, dropping the least recently used first, and a response is gone ``option.responses_store_ttl``
seconds after it was last written or read (vLLM's and SGLang's stores are plain dicts that only grow).
A stored response is the response object (``GET /v1/responses/{id}``), the conversation it ends (the
chat messages a follow-up with ``previous_response_id`` continues, instructions excluded as OpenAI
does), the routing session its chain shares (so a follow-up goes to the worker holding its prefix),
and, while it runs, the flag that cancels it.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmi_core.config import ModelConfig
from lmi_core.errors import BadRequestError, NotFoundError

Clock = Callable[[], float]


@dataclass
class StoredResponse:
    response: dict[str, Any]  # the response object as GET returns it (its status says if it runs)
    messages: list[
        dict[str, Any]
    ]  # the conversation up to this response's input (its output added at the end)
    session: str  # the routing session of the chain this response belongs to
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # set by cancel while it runs

    @property
    def running(self) -> bool:
        return self.response.get("status") in ("queued", "in_progress")


class ResponseStore:
    """One model's stored responses: an LRU of at most ``size`` entries, each kept ``ttl`` seconds."""

    def __init__(self, size: int, ttl: float, clock: Clock = time.monotonic) -> None:
        self.size = size
        self.ttl = ttl
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, StoredResponse]] = OrderedDict()  # id -> (expiry, entry)

    def __len__(self) -> int:
        return len(self._entries)

    def ids(self) -> list[str]:
        """The stored responses' ids, least recently used first."""
        return list(self._entries)

    def put(self, response_id: str, entry: StoredResponse) -> None:
        self._entries[response_id] = (self.clock() + self.ttl, entry)
        self._entries.move_to_end(response_id)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        """The entry, kept ``ttl`` longer (a conversation in use stays); None once expired or dropped."""
        found = self._entries.get(response_id)
        if found is None:
            return None
        expiry, entry = found
        if self.clock() >= expiry:
            del self._entries[response_id]
            return None
        self.put(response_id, entry)
        return entry

    def configure(self, size: int, ttl: float) -> None:
        """New bounds (the model was registered again with other settings)."""
        self.size, self.ttl = size, ttl
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


class ResponseStores:
    """The stores of every model that keeps responses, by model name."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self._stores: dict[str, ResponseStore] = {}

    def of(self, config: ModelConfig) -> ResponseStore | None:
        """``config``'s model's store; None where the model does not keep responses."""
        if config.responses_store == "off":
            self._stores.pop(config.name, None)
            return None
        store = self._stores.get(config.name)
        if store is None:
            store = self._stores[config.name] = ResponseStore(
                config.responses_store_size, config.responses_store_ttl, self.clock
            )
        elif (store.size, store.ttl) != (config.responses_store_size, config.responses_store_ttl):
            store.configure(config.responses_store_size, config.responses_store_ttl)
        return store

    def previous(self, config: ModelConfig, response_id: str) -> StoredResponse:
        """The response a follow-up continues; a 404 that says why when there is none."""
        store = self.of(config)
        if store is None:
            raise NotFoundError(
                f"previous_response_id needs the response store, which is off for model {config.name} "
                "(option.responses_store=memory keeps responses)",
                param="previous_response_id",
            )
        entry = store.get(response_id)
        if entry is None:
            raise NotFoundError(
                f"response {response_id[:80]} is not stored (expired, evicted, or stored with store=false)",
                param="previous_response_id",
            )
        if entry.running:
            raise BadRequestError(
                f"response {response_id[:80]} is still running: continue it once it is done",
                param="previous_response_id",
            )
        return entry

    def find(self, response_id: str, models: Sequence[ModelConfig]) -> StoredResponse:
        """The stored response ``response_id`` of any of ``models`` (those served now); a 404 that
        says whether the store is off for all of them."""
        for name in set(self._stores) - {m.name for m in models}:  # an unloaded model's go with it
            del self._stores[name]
        stores = [store for store in map(self.of, models) if store is not None]
        if not stores:
            raise NotFoundError(
                "no model keeps responses (option.responses_store=memory): the Responses API is "
                "stateless here",
                param="response_id",
            )
        for store in stores:
            entry = store.get(response_id)
            if entry is not None:
                return entry
        raise NotFoundError(
            f"response {response_id[:80]} is not stored (expired or evicted)", param="response_id"
        )
