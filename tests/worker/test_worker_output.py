"""The worker's socket: one ``toks`` frame per write for every request, the stream interval, and a
frame it cannot read closing the connection cleanly."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from lmi_core.engine import (
    Engine,
    EngineStats,
    Finished,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    Token,
    WorkerContext,
)
from lmi_core.errors import EngineError
from lmi_core.plugins import new_plugin_manager
from lmi_core.worker import wire
from lmi_core.worker.rank_server import RankServer, stream_interval


class StepEngine:
    """Every request gets one token per engine step (one loop iteration), like a batching engine."""

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        for i in range(request.params.max_new_tokens):
            await asyncio.sleep(0)  # the next step
            yield Token(i, f"t{i}", None)
        yield Finished("length", 1, request.params.max_new_tokens)

    def stats(self) -> EngineStats:
        return EngineStats()

    def shutdown(self) -> None:
        pass


_serving: set[asyncio.Task[None]] = set()


async def started(
    options: dict[str, Any] | None = None, engine: Engine | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A RankServer with ``engine`` (a ``StepEngine`` by default) on one end of a socket pair; the
    test holds the other."""
    ours, theirs = socket.socketpair()
    worker = RankServer(0, new_plugin_manager(load_entry_points=False))
    worker.engine = engine or StepEngine()
    worker.stream_interval = stream_interval(options or {})
    worker_reader, worker_writer = await asyncio.open_connection(sock=theirs)
    # Held: asyncio keeps only a weak reference to a task, and a collected one closes the socket.
    task = asyncio.get_running_loop().create_task(worker.serve(worker_reader, worker_writer))
    _serving.add(task)
    task.add_done_callback(_serving.discard)
    return await asyncio.open_connection(sock=ours)


def request(rid: str, tokens: int, interval: int | None = None) -> bytes:
    params = SamplingParams(max_new_tokens=tokens, stream_interval=interval)
    return wire.Req(rid, GenerationRequest(rid, "x", params=params)).to_frame()


async def frames_until_done(reader: asyncio.StreamReader, requests: int) -> list[wire.Message]:
    frames: list[wire.Message] = []
    done = 0
    while done < requests:
        message = await asyncio.wait_for(wire.read_message(reader), 5)
        assert message is not None
        frames.append(message)
        done += isinstance(message, wire.Done)
    return frames


async def test_one_frame_carries_the_tokens_of_every_request_of_a_step() -> None:
    reader, writer = await started()
    writer.write(b"".join(request(rid, 3) for rid in "abc"))  # all three arrive in one read
    frames = await frames_until_done(reader, 3)
    steps = [[rid for rid, _ in frame.tokens] for frame in frames if isinstance(frame, wire.Toks)]
    assert sorted(rid for step in steps for rid in step) == sorted("abc" * 3)
    # Frames carry several requests' tokens (three when the requests arrive in one read; a loaded
    # machine may split the read), never one frame per token.
    assert len(steps) < 9 and max(len(step) for step in steps) > 1
    assert all(isinstance(frame, wire.Done) for frame in frames[-3:])  # each after its last token
    writer.close()


@pytest.mark.parametrize(
    ("model", "per_request", "sizes"), [({}, 4, [4, 4, 2]), ({"stream_interval": "3"}, None, [3, 3, 3, 1])]
)
async def test_the_stream_interval_gathers_tokens_and_the_rest_go_with_the_finish(
    model: dict[str, str], per_request: int | None, sizes: list[int]
) -> None:
    reader, writer = await started(model)
    writer.write(request("r", 10, per_request))
    frames = await frames_until_done(reader, 1)
    assert [len(frame.tokens) for frame in frames if isinstance(frame, wire.Toks)] == sizes
    tokens = [token for frame in frames if isinstance(frame, wire.Toks) for _, token in frame.tokens]
    assert [token.id for token in tokens] == list(range(10))
    writer.close()


@pytest.mark.parametrize("value", ["0", "-2", "two", 1.5])
def test_a_bad_stream_interval_is_an_error(value: object) -> None:
    with pytest.raises(EngineError, match="stream_interval"):
        stream_interval({"stream_interval": value})


def test_a_worker_context_keeps_the_option() -> None:
    context = WorkerContext("m", None, "hf", {"stream_interval": "2"})
    assert stream_interval(WorkerContext.from_wire(context.to_wire()).options) == 2


BODY = GenerationRequest("r", "x").to_wire()


@pytest.mark.parametrize(
    "frame",
    [
        wire.encode({"t": "req", "request": BODY}),  # no id
        wire.encode({"t": "req", "id": 5, "request": BODY}),
        wire.encode({"t": "req", "id": "r", "request": "x"}),
        wire.encode({"t": "cancel", "id": ["r"]}),
        wire.encode({"t": "ping"}),
        wire.encode({"t": "init", "context": {"model_id": "m"}}),  # was a worker that never loaded
        wire.encode({"t": "adapter", "op": "reload", "adapter": {"name": "a", "path": "/a"}}),
        wire.encode({"t": "reload"}),  # an unknown type
        wire.Toks([]).to_frame(),  # what a worker sends, not the server
        b"\x00\x00\x00\x01\xc1",  # not msgpack
    ],
)
async def test_a_frame_the_worker_cannot_read_closes_the_connection_with_one_log_line(
    frame: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    reader, writer = await started()
    with caplog.at_level(logging.INFO, logger="lmi_core.worker"):
        writer.write(wire.Ping(1).to_frame() + frame + wire.Ping(2).to_frame())
        assert await asyncio.wait_for(wire.read_message(reader), 5) == wire.Pong(1, EngineStats())
        assert await asyncio.wait_for(wire.read_message(reader), 5) is None  # closed: no pong 2
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and "rank 0: closing the connection: " in record.getMessage()
    assert record.exc_info is None and "Traceback" not in caplog.text
    writer.close()
