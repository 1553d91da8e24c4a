"""What the pool records of one traced request: finished spans under the request's own.

Invariant: the serving side never imports OpenTelemetry. A ``RequestTrace`` (``http.tracing``'s, one
per traced HTTP request, on its ``RequestContext``) takes each span whole, with its wall-clock
bounds, once it is over; an untraced request has none and the pool skips every span (one ``None``
test per stage, nothing per token).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

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
