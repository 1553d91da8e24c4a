"""The single-slot collector between a rank's socket and a request's consumer."""

from __future__ import annotations

import asyncio

import pytest

from lmi_core.engine import Finished, Token
from lmi_core.errors import WorkerFailedError
from lmi_core.serving.request_stream import RequestStream


async def test_a_consumer_that_falls_behind_takes_the_backlog_in_one_batch() -> None:
    stream = RequestStream()
    tokens = [Token(i, str(i), None) for i in range(50)]
    for token in tokens:
        stream.put(token)  # never waits, whatever the consumer does
    done = Finished("length", 1, 50, "p")
    stream.put(done)
    assert await stream.take() == [*tokens, done]  # one wake-up for 51 events, in order


async def test_take_waits_for_the_next_event() -> None:
    stream = RequestStream()
    taken = asyncio.ensure_future(stream.take())
    await asyncio.sleep(0.01)
    assert not taken.done()
    stream.put(Token(1, "a", None))
    stream.put(Token(2, "b", None))  # arrives before the consumer runs: same batch
    assert await taken == [Token(1, "a", None), Token(2, "b", None)]


async def test_the_error_comes_after_the_events_and_the_first_error_wins() -> None:
    stream = RequestStream()
    stream.put(Token(1, "a", None))
    first = WorkerFailedError("rank 0 died")
    stream.fail(first)
    stream.fail(WorkerFailedError("later"))
    stream.put(Token(2, "b", None))  # after the error (a deadline): dropped, the stream ends now
    assert await stream.take() == [Token(1, "a", None)]
    with pytest.raises(WorkerFailedError) as raised:
        await stream.take()
    assert raised.value is first
    with pytest.raises(WorkerFailedError):  # and stays ended
        await stream.take()
