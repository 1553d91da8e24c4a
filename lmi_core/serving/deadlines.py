"""A request's deadlines, as pure arithmetic on ``time.monotonic()`` instants.

Invariant: a request has a total deadline (``option.predict_timeout``, lowered, never raised, by the
client's ``x-request-timeout``, which reaches the pool in ``routing.RequestContext.client_timeout``)
and, while it waits for a worker, a queue deadline never later than the total one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmi_core.errors import DeadlineError, QueueTimeoutError, RequestTimeoutError


@dataclass(frozen=True)
class Deadlines:
    total: float  # monotonic instant
    queue: float  # monotonic instant, <= total
    total_source: str  # what set ``total``, for the error message
    queue_source: str


def deadlines(
    started: float, predict_timeout: float, queue_timeout: float | None, client: float | None
) -> Deadlines:
    """The deadlines of a request that arrived at ``started``."""
    total, total_source = started + predict_timeout, f"option.predict_timeout={predict_timeout:g} s"
    if client is not None and client < predict_timeout:
        total, total_source = started + client, f"x-request-timeout={client:g} s"
    if queue_timeout is not None and started + queue_timeout < total:
        queue_source = f"option.queue_timeout={queue_timeout:g} s"
        return Deadlines(total, started + queue_timeout, total_source, queue_source)
    return Deadlines(total, total, total_source, total_source)


def waited_too_long(limits: Deadlines, what: str) -> DeadlineError:
    """The error of a request whose wait for ``what`` (a worker, its model's load) ran past
    ``limits.queue``: 503 + Retry-After for a queue deadline, 504 when the total one came first."""
    if limits.queue < limits.total:
        return QueueTimeoutError(f"no {what} within {limits.queue_source}")
    return RequestTimeoutError(f"request waited longer than {limits.total_source}")


def parse_client_timeout(text: str) -> float | None:
    """``x-request-timeout``'s seconds; None when it is not a positive finite number."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None
