"""The single-slot collector between a rank's socket and a request's consumer, and its stall timer."""

from __future__ import annotations

import asyncio

import pytest

from lmi_core.engine import Finished, Token
from lmi_core.errors import WorkerFailedError
from lmi_core.serving.request_stream import RequestStream, StallTimer


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


async def test_the_stall_timer_re_arms_from_the_last_event_and_fires_once_none_came(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    now = [loop.time()]
    monkeypatch.setattr(loop, "time", lambda: now[0])  # the loop's clock, for its timers too

    async def at(seconds: float) -> None:
        """Move the clock ``seconds`` on and let the loop run the timers that are due."""
        now[0] += seconds
        for _ in range(3):
            await asyncio.sleep(0)

    start = now[0]
    fired: list[float] = []
    timer = StallTimer(10.0, lambda: fired.append(now[0] - start))
    await at(6)
    timer.progress()  # an event at 6 s
    await at(6)  # 12 s: the timer armed at start finds an event 6 s ago and re-arms for 16 s
    assert fired == []
    timer.progress()  # 12 s
    await at(5)  # 17 s: re-arms for 22 s
    await at(5)  # 22 s: 10 s without an event
    assert fired == [pytest.approx(22)]
    await at(30)
    assert fired == [pytest.approx(22)]  # once
    timer.cancel()


async def test_a_cancelled_stall_timer_never_fires(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    now = [loop.time()]
    monkeypatch.setattr(loop, "time", lambda: now[0])
    fired: list[bool] = []
    StallTimer(1.0, lambda: fired.append(True)).cancel()
    now[0] += 5
    for _ in range(3):
        await asyncio.sleep(0)
    assert fired == []
