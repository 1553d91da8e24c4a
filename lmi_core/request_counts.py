"""Counting an engine's requests as their events are relayed: in flight, finished, cancelled.

Invariant: every request that ``RequestCounts.relay`` starts is counted exactly once when its stream
ends: as finished if a ``Finished`` event passed, else as cancelled (closed early by the client, or
failed), and it is in flight in between. Part of the plugin API; standard library only.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from lmi_core.engine import EngineStats, Finished, GenerationEvent


@dataclass
class RequestCounts:
    """The request counters of one engine (``EngineStats.finished_total`` / ``cancelled_total``)."""

    in_flight: int = 0
    finished_total: int = 0
    cancelled_total: int = 0

    async def relay(
        self, events: AsyncGenerator[GenerationEvent, None]
    ) -> AsyncGenerator[GenerationEvent, None]:
        """Yield ``events`` up to their ``Finished``, counting the request; closing this closes them.

        An engine validates a request before it calls this (a request refused at once is not counted)
        and frees the request in ``events``' own ``finally`` when it did not finish.
        """
        self.in_flight += 1
        finished = False
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    finished = isinstance(event, Finished)
                    yield event
                    if finished:
                        return
        finally:
            self.in_flight -= 1
            if finished:
                self.finished_total += 1
            else:
                self.cancelled_total += 1

    def stats(self) -> EngineStats:
        """The counters as heartbeat stats, every request in flight counted as running."""
        return EngineStats(
            running=self.in_flight, finished_total=self.finished_total, cancelled_total=self.cancelled_total
        )
