"""The server's end of a rank socket: multiplexing, pings, and failing open requests on bad input."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmi_core.engine import EngineStats, Finished, GenerationRequest, Token
from lmi_core.errors import EngineError, WorkerFailedError
from lmi_core.serving.request_stream import RequestStream
from lmi_core.worker import wire
from tests.serving.fake_rank import rank_pair


async def next_item(stream: RequestStream) -> object:
    """The stream's next batch, or the exception that ends it."""
    try:
        return await asyncio.wait_for(stream.take(), 5)
    except (EngineError, WorkerFailedError) as exc:
        return exc


async def test_interleaved_streams_reach_their_own_streams(tmp_path: Path) -> None:
    conn, _, rank = await rank_pair(tmp_path)
    a, b = conn.open_stream("a"), conn.open_stream("b")
    done = Finished("length", 3, 1, "x")
    for message in (
        # One worker write: every request's tokens in one frame.
        wire.Toks([("b", Token(1, "one", None)), ("a", Token(2, "two", -0.5))]),
        wire.Toks([("b", Token(3, "three", None))]),
        wire.Done("b", done),
        wire.Err(EngineError("boom", status=400, param="inputs"), "a"),
    ):
        rank.write(message.to_frame())
    await asyncio.sleep(0.1)  # all four frames are in before anyone takes
    assert (await next_item(b)) == [Token(1, "one", None), Token(3, "three", None), done]
    assert (await next_item(a)) == [Token(2, "two", -0.5)]
    error = await next_item(a)
    assert isinstance(error, EngineError) and (str(error), error.status, error.param) == (
        "boom",
        400,
        "inputs",
    )
    await conn.close()


@pytest.mark.parametrize(
    "message",
    [
        {"t": "toks", "tokens": [["r", [1, "x"]]]},  # too short
        {"t": "done", "id": "r", "finished": {"finish_reason": "bored"}},
        {"t": "err", "id": "r", "error": 5},
        {"t": "toks", "tokens": [[["r"], [1, "x", None, False, None, False]]]},  # unhashable id
        {"t": "toks", "tokens": [[5, [1, "x", None, False, None, False]]]},  # an id that is no string
        {"t": "pong", "id": 0, "stats": [1, 2]},
        {"t": "toks", "token": [1, "x", None, False, None, False]},  # no token list
        {"t": "tok", "id": "r", "token": [1, "x", None, False, None, False]},  # one frame per token: gone
        {"t": "done", "finished": Finished("length", 1, 1).to_wire()},  # no id
        {"t": "loaded", "rank": "0"},
        {"t": "loaded", "rank": 0, "max_model_len": "64"},
        {"t": "pong", "id": "0"},
        # Well-formed, but what the server sends, not a rank.
        wire.Req("r", GenerationRequest("r", "x")),
        wire.Ping(0),
        wire.Shutdown(),
    ],
)
async def test_a_frame_whose_payload_does_not_decode_fails_the_connection(
    tmp_path: Path, message: dict | wire.Message
) -> None:
    conn, _, rank = await rank_pair(tmp_path)
    stream = conn.open_stream("r")
    rank.write(wire.encode(message) if isinstance(message, dict) else message.to_frame())
    failure = await next_item(stream)
    assert isinstance(failure, WorkerFailedError) and "bad frame" in str(failure)
    assert await conn.control.get() is failure  # a load in progress sees it too
    await conn.close()


async def test_ping_round_trip_and_timeout(tmp_path: Path) -> None:
    conn, reader, rank = await rank_pair(tmp_path)
    pinged = asyncio.ensure_future(conn.ping(timeout=5))
    ping = await wire.read_message(reader)
    assert isinstance(ping, wire.Ping)
    rank.write(wire.Pong(ping.id, None).to_frame())  # loading: no stats yet
    await pinged
    assert conn.last_stats == EngineStats()
    pinged = asyncio.ensure_future(conn.ping(timeout=5))
    ping = await wire.read_message(reader)
    assert isinstance(ping, wire.Ping)
    rank.write(wire.Pong(ping.id, EngineStats(running=3)).to_frame())
    await pinged
    assert conn.last_stats == EngineStats(running=3)
    with pytest.raises(TimeoutError):
        await conn.ping(timeout=0.05)  # nobody answers this one
    await conn.close()


async def test_loaded_and_errors_outside_a_request_reach_control(tmp_path: Path) -> None:
    conn, _, rank = await rank_pair(tmp_path)
    rank.write(wire.Loaded(0, 4096).to_frame())
    assert await conn.control.get() == wire.Loaded(0, 4096)
    rank.write(wire.Err(EngineError("engine unhealthy: gone", status=500)).to_frame())
    error = await conn.control.get()
    assert isinstance(error, EngineError) and str(error) == "engine unhealthy: gone"
    assert not conn.closed.done()
    await conn.close()


async def test_eof_fails_every_open_request_at_once(tmp_path: Path) -> None:
    conn, _, rank = await rank_pair(tmp_path)
    streams = [conn.open_stream(str(i)) for i in range(3)]
    rank.close()
    for stream in streams:
        assert isinstance(await next_item(stream), WorkerFailedError)
    assert isinstance(await conn.closed, WorkerFailedError)
    late = conn.open_stream("late")  # a request after the failure fails too, never hangs
    assert isinstance(await next_item(late), WorkerFailedError)


@given(st.binary(min_size=1, max_size=64))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_garbage_from_a_rank_fails_requests_and_never_crashes(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    async def scenario() -> None:
        conn, _, rank = await rank_pair(tmp_path_factory.mktemp("g"))
        stream = conn.open_stream("r")
        rank.write(data)
        rank.close()
        first = await next_item(stream)
        # Garbage either decodes to messages for other ids (ignored) or fails the request cleanly.
        while not isinstance(first, Exception):
            first = await next_item(stream)
        assert isinstance(first, WorkerFailedError)
        await conn.close()

    asyncio.run(scenario())
