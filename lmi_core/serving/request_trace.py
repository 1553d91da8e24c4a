"""What the serving side tells one traced request's trace: its generations and finished spans.

Invariant: the serving side never imports OpenTelemetry. A ``RequestTrace`` (``http.tracing``'s, one
per traced HTTP request, on its ``RequestContext``) takes each span whole, with its wall-clock
bounds, once it is over, and hears of each generation from the one observer that already times it
(``http.metrics``' instrument); an untraced request has none and every stage skips it (one ``None``
test per stage, nothing per token).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from lmi_core.engine import Finished, GenerationRequest

AttributeValue = str | int | float | bool
Attributes = Mapping[str, AttributeValue]


class RequestTrace(Protocol):
    def span(
        self,
        name: str,
        start_ns: int,
        end_ns: int,
        attributes: Attributes,
        error: BaseException | None = None,
    ) -> None:
        """Record a child span of the request's span, ``time.time_ns()`` bounds; ``error`` failed it."""
        ...

    def generation(self, model: str, request: GenerationRequest) -> GenerationRequest:
        """A generation starts on ``model``: ``request`` as the worker gets it (carrying the trace)."""
        ...

    def finished(self, event: Finished, first_token_at: float | None) -> None:
        """The generation finished (``first_token_at``: ``time.monotonic()`` of its first token)."""
        ...

    def fail(self, error: BaseException) -> None:
        """The generation failed with ``error``."""
        ...
