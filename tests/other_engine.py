"""An engine of some other backend, for checking that a backend plugin's hooks leave it alone."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from lmi_core import EngineStats, Finished, GenerationEvent, GenerationRequest

FINISHED = Finished("length", 0, 0)
STATS = EngineStats(waiting=7)


class OtherEngine:
    """An ``Engine`` that finishes every request at once and reports ``STATS``."""

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        yield FINISHED

    def stats(self) -> EngineStats:
        return STATS

    def shutdown(self) -> None:
        pass
