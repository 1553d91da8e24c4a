"""The server's end of one rank's socket: multiplexed request streams, pings, failure fan-out.

Invariant: what leaves this module is typed, never a raw frame. A request's ``RequestStream`` gets its
``Token``/``Finished`` events and then at most one exception (the engine's ``EngineError``, or the
connection's ``WorkerFailedError``); a ``toks`` frame (every request's tokens of one worker write) is
split among the streams here; ``control`` holds ``None`` (engine loaded) or the error a rank
reported outside any request. A frame whose payload does not decode fails the connection like a
frame that is not msgpack.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from lmi_core.engine import EngineStats, Finished, Token
from lmi_core.errors import EngineError, ServiceError, WorkerFailedError
from lmi_core.serving.request_stream import RequestStream
from lmi_core.worker import wire

logger = logging.getLogger(__name__)

Message = dict[str, Any]
T = TypeVar("T")


def payload(message: Message, key: str, decode: Callable[[Any], T]) -> T:
    """``decode(message[key])``; a missing or malformed payload is a ``ProtocolError``."""
    try:
        return decode(message[key])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise wire.ProtocolError(f"bad {message['t']!r} message: {exc!r}") from None


def decode_tokens(message: Message) -> list[tuple[str, Token]]:
    """A ``toks`` frame as (request id, token) pairs, in order."""

    def decode(items: Any) -> list[tuple[str, Token]]:
        pairs = [(rid, Token.from_wire(token)) for rid, token in items]
        if not all(isinstance(rid, str) for rid, _ in pairs):
            raise ValueError("a request id that is not a string")
        return pairs

    return payload(message, "tokens", decode)


def decode_stream_item(message: Message) -> Finished | EngineError:
    """A request-scoped message as what it carries: the finish, or the engine's error."""
    kind = message["t"]
    if kind == wire.DONE:
        return payload(message, "finished", Finished.from_wire)
    if kind == wire.ERROR:
        return payload(message, "error", EngineError.from_wire)
    raise wire.ProtocolError(f"unexpected {kind!r} message for a request")


def decode_control(message: Message) -> EngineError | None:
    """A message tied to no request: None for ``loaded``, else the error the rank reported."""
    kind = message["t"]
    if kind == wire.LOADED:
        return None
    if kind == wire.ERROR:
        return payload(message, "error", EngineError.from_wire)
    raise wire.ProtocolError(f"unexpected {kind!r} message without a request id")


class RankConnection:
    """A connected rank. Messages for a request go to that request's stream; when the connection
    breaks, every open stream gets a ``WorkerFailedError`` at once (no request is left hanging)."""

    def __init__(
        self, rank: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, label: str = ""
    ) -> None:
        self.rank = rank
        self.label = label or f"rank {rank}"
        self._reader = reader
        self._writer = writer
        self._streams: dict[str, RequestStream] = {}
        self._pings: dict[int, asyncio.Future[Message]] = {}
        self._ping_ids = itertools.count()
        # None: the engine loaded; an error: init failed, the engine is unhealthy, or the connection broke.
        self.control: asyncio.Queue[ServiceError | None] = asyncio.Queue()
        self.last_stats = EngineStats()  # from the last pong that carried stats (not while loading)
        self.last_pong = time.monotonic()
        self.closed: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(
        cls, rank: int, address: str, deadline: float, alive: Callable[[], bool], label: str = ""
    ) -> RankConnection:
        """Connect to ``address``, retrying until it accepts, ``alive()`` is false or ``deadline``."""
        kind, target = wire.parse_address(address)
        while True:
            try:
                if kind == "unix":
                    reader, writer = await asyncio.open_unix_connection(str(target))
                else:
                    assert isinstance(target, tuple)  # parse_address: ("tcp", (host, port))
                    host, port = target
                    reader, writer = await asyncio.open_connection(host, port)
                return cls(rank, reader, writer, label)
            except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, OSError):
                if not alive():
                    raise WorkerFailedError(f"rank {rank} exited before it listened on {address}") from None
                if time.monotonic() > deadline:
                    raise WorkerFailedError(f"rank {rank} did not listen on {address} in time") from None
                await asyncio.sleep(0.05)

    def send(self, message: Message) -> None:
        if self.closed.done():
            raise self.closed.result()
        self._writer.write(wire.encode(message))

    def open_stream(self, request_id: str) -> RequestStream:
        stream = RequestStream()
        if self.closed.done():
            stream.fail(self.closed.result())
        self._streams[request_id] = stream
        return stream

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def ping(self, timeout: float) -> Message:
        """Round-trip a ping; raises ``TimeoutError`` if the rank does not answer in time."""
        ping_id = next(self._ping_ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pings[ping_id] = future
        try:
            self.send({"t": wire.PING, "id": ping_id})
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        finally:
            self._pings.pop(ping_id, None)

    async def _read_loop(self) -> None:
        error = WorkerFailedError(f"{self.label} closed its connection (the process died?)")
        try:
            while True:
                message = await wire.read_message(self._reader)
                if message is None:
                    break
                self._dispatch(message)
        except wire.ProtocolError as exc:
            error = WorkerFailedError(f"{self.label} sent a bad frame: {exc}")
        except (ConnectionError, OSError) as exc:
            error = WorkerFailedError(f"{self.label}: connection lost: {exc}")
        except asyncio.CancelledError:
            error = WorkerFailedError(f"{self.label}: connection closed by the server")
        self.fail(error)

    def _dispatch(self, message: Message) -> None:
        kind = message["t"]
        rid = message.get("id")
        if kind == wire.PONG:
            self.last_pong = time.monotonic()
            if "stats" in message:  # absent while the engine loads
                self.last_stats = payload(message, "stats", EngineStats.from_wire)
            future = self._pings.get(rid) if isinstance(rid, int) else None
            if future is not None and not future.done():
                future.set_result(message)
        elif kind == wire.TOKENS:
            for token_rid, token in decode_tokens(message):  # all decoded first: a bad frame fails whole
                token_stream = self._streams.get(token_rid)
                if token_stream is not None:  # else cancelled meanwhile
                    token_stream.put(token)
        elif rid is None:
            self.control.put_nowait(decode_control(message))
        elif isinstance(rid, str):
            item = decode_stream_item(message)  # also for a closed stream: a bad frame is never ignored
            stream = self._streams.get(rid)
            if stream is None:
                pass
            elif isinstance(item, Exception):
                stream.fail(item)
            else:
                stream.put(item)
        else:
            raise wire.ProtocolError(f"bad {kind!r} message: request id {rid!r}")

    def fail(self, error: WorkerFailedError) -> None:
        if self.closed.done():
            return
        self.closed.set_result(error)
        for stream in self._streams.values():
            stream.fail(error)
        for future in self._pings.values():
            if not future.done():
                future.set_exception(error)
        self.control.put_nowait(error)
        with contextlib.suppress(Exception):
            self._writer.close()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
