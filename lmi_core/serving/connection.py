"""The server's end of one rank's socket: multiplexed request streams, pings, failure fan-out.

Invariant: what leaves this module is typed, never a raw frame. A request's ``RequestStream`` gets its
``Token``/``Finished`` events and then at most one exception (the engine's ``EngineError``, or the
connection's ``WorkerFailedError``); an operation's future gets its result value or one such
exception; a ``toks`` message (every request's tokens of one worker write) is split among the
streams here; ``control`` holds the rank's ``wire.Loaded`` or the error it
reported outside any request. A frame that ``wire.parse`` refuses, or a message a rank never sends,
fails the connection like a frame that is not msgpack.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from lmi_core.engine import EngineStats
from lmi_core.errors import ServiceError, WorkerFailedError
from lmi_core.serving.request_stream import RequestStream
from lmi_core.worker import wire

logger = logging.getLogger(__name__)


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
        self._results: dict[str, asyncio.Future[Any]] = {}  # operation id -> its raw result
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._ping_ids = itertools.count()
        # Loaded: the engine loaded; an error: init failed, the engine is unhealthy, or the connection broke.
        self.control: asyncio.Queue[wire.Loaded | ServiceError] = asyncio.Queue()
        self.last_stats = EngineStats()  # from the last pong that carried stats (not while loading)
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

    def send(self, message: wire.ServerMessage | bytes) -> None:
        """Write ``message``, or a frame already encoded (``wire.ServerMessage.to_frame``: a request
        is encoded once for every rank, and before anything is sent, so that a request that cannot
        be encoded fails alone and never leaves half a frame on the socket)."""
        if self.closed.done():
            raise self.closed.result()
        self._writer.write(message if isinstance(message, bytes) else message.to_frame())

    def open_stream(self, request_id: str) -> RequestStream:
        stream = RequestStream()
        if self.closed.done():
            stream.fail(self.closed.result())
        self._streams[request_id] = stream
        return stream

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def open_operation(self, request_id: str) -> asyncio.Future[Any]:
        """The future of operation ``request_id``: its ``OpResult`` value as sent (the caller decodes it
        with its operation), or the engine's error, or the connection's ``WorkerFailedError``."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.closed.done():
            future.set_exception(self.closed.result())
        self._results[request_id] = future
        return future

    def close_operation(self, request_id: str) -> None:
        self._results.pop(request_id, None)

    async def ping(self, timeout: float) -> None:
        """Round-trip a ping; raises ``TimeoutError`` if the rank does not answer in time."""
        ping_id = next(self._ping_ids)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings[ping_id] = future
        try:
            self.send(wire.Ping(ping_id))
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

    def _dispatch(self, message: wire.Message) -> None:
        if isinstance(message, wire.Toks):
            for rid, token in message.tokens:
                token_stream = self._streams.get(rid)
                if token_stream is not None:  # else cancelled meanwhile
                    token_stream.put(token)
        elif isinstance(message, wire.Done):
            stream = self._streams.get(message.id)
            if stream is not None:
                stream.put(message.finished)
        elif isinstance(message, wire.OpResult):
            result = self._results.get(message.id)
            if result is not None and not result.done():  # else cancelled meanwhile
                result.set_result(message.value)
        elif isinstance(message, wire.Err):
            if message.id is None:
                self.control.put_nowait(message.error)
            elif (stream := self._streams.get(message.id)) is not None:
                stream.fail(message.error)
            elif (result := self._results.get(message.id)) is not None and not result.done():
                result.set_exception(message.error)
        elif isinstance(message, wire.Pong):
            if message.stats is not None:  # None while the engine loads
                self.last_stats = message.stats
            future = self._pings.get(message.id)
            if future is not None and not future.done():
                future.set_result(None)
        elif isinstance(message, wire.Loaded):
            self.control.put_nowait(message)
        else:
            raise wire.ProtocolError(f"unexpected {message.t!r} message from a rank")

    def fail(self, error: WorkerFailedError) -> None:
        if self.closed.done():
            return
        self.closed.set_result(error)
        for stream in self._streams.values():
            stream.fail(error)
        for future in [*self._pings.values(), *self._results.values()]:
            if not future.done():
                future.set_exception(error)
        self.control.put_nowait(error)
        with contextlib.suppress(Exception):
            self._writer.close()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
