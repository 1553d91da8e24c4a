"""One request's events on the server side: a single-slot collector between the socket and the client.

Invariant: a consumer's ``take()`` returns every event that arrived since its last ``take()``, in
order, as one batch (the "slot"), and the terminal exception only after them (events that arrive
after it are dropped: a deadline ends a stream that still streams); producers never wait.
So a client that falls behind costs one wake-up per batch, not per token, and its backlog is the
slot's list, never a queue of wake-ups that delays other requests (vLLM's ``RequestOutputCollector``
does the same with merged ``RequestOutput`` deltas). Events stay distinct: the LMI API writes one line
per token, with its own log-prob; a consumer may merge the texts of a batch into one chunk.
``StallTimer`` watches a stream for progress at the same price: nothing per event but a float store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from lmi_core.engine import GenerationEvent


class RequestStream:
    """The events of one request, collected until its consumer takes them (one asyncio loop)."""

    def __init__(self) -> None:
        self._events: list[GenerationEvent] = []
        self._error: Exception | None = None
        self._ready = asyncio.Event()

    def put(self, event: GenerationEvent) -> None:
        if self._error is None:
            self._events.append(event)
            self._ready.set()

    def fail(self, error: Exception) -> None:
        """End the stream with ``error`` after the events already in; the first error wins."""
        if self._error is None:
            self._error = error
        self._ready.set()

    async def take(self) -> list[GenerationEvent]:
        """Every event since the last ``take``; waits for one; raises the error once they are taken."""
        while not self._events and self._error is None:
            self._ready.clear()
            await self._ready.wait()
        if not self._events:
            assert self._error is not None
            raise self._error
        events, self._events = self._events, []
        return events


class StallTimer:
    """Calls ``on_stall`` once no event came for ``timeout`` seconds (``option.stall_timeout``).

    One timer per request, not one per event: ``progress()`` only stores the time, and the timer,
    when it fires, re-arms itself from that time until a whole ``timeout`` has passed without any.
    """

    def __init__(self, timeout: float, on_stall: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._on_stall = on_stall
        self._last = self._loop.time()
        self._handle = self._loop.call_at(self._last + timeout, self._check)

    def progress(self) -> None:
        """An event came now."""
        self._last = self._loop.time()

    def cancel(self) -> None:
        self._handle.cancel()

    def _check(self) -> None:
        if self._loop.time() - self._last < self._timeout:
            self._handle = self._loop.call_at(self._last + self._timeout, self._check)
        else:
            self._on_stall()
