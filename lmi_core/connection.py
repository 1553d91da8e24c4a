"""The server's end of one rank's socket: multiplexed request streams, pings, failure fan-out."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from typing import Any

from lmi_core import wire
from lmi_core.errors import WorkerFailedError

logger = logging.getLogger(__name__)

Message = dict[str, Any]


class RankConnection:
    """A connected rank. Messages for a request go to that request's queue; when the connection
    breaks, every open queue gets a ``WorkerFailedError`` at once (no request is left hanging)."""

    def __init__(
        self, rank: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, label: str = ""
    ) -> None:
        self.rank = rank
        self.label = label or f"rank {rank}"
        self._reader = reader
        self._writer = writer
        self._streams: dict[str, asyncio.Queue[Message | Exception]] = {}
        self._pings: dict[int, asyncio.Future[Message]] = {}
        self._ping_ids = itertools.count()
        self.control: asyncio.Queue[Message] = asyncio.Queue()  # loaded / init errors / unhealthy
        self.last_stats: dict[str, Any] = {}
        self.last_pong = time.monotonic()
        self.closed: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(
        cls, rank: int, address: str, deadline: float, alive: Any, label: str = ""
    ) -> RankConnection:
        """Connect to ``address``, retrying until it accepts, ``alive()`` is false or ``deadline``."""
        kind, target = wire.parse_address(address)
        while True:
            try:
                if kind == "unix":
                    reader, writer = await asyncio.open_unix_connection(str(target))
                else:
                    host, port = target  # type: ignore[misc]
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

    def open_stream(self, request_id: str) -> asyncio.Queue[Message | Exception]:
        queue: asyncio.Queue[Message | Exception] = asyncio.Queue()
        if self.closed.done():
            queue.put_nowait(self.closed.result())
        self._streams[request_id] = queue
        return queue

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
        error: Exception = WorkerFailedError(f"{self.label} closed its connection (the process died?)")
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
        if kind == wire.PONG:
            self.last_pong = time.monotonic()
            self.last_stats = message.get("stats") or self.last_stats
            future = self._pings.get(message.get("id", -1))
            if future is not None and not future.done():
                future.set_result(message)
            return
        rid = message.get("id")
        if rid is None:  # loaded, or an error not tied to a request (init, health)
            self.control.put_nowait(message)
            return
        queue = self._streams.get(rid)
        if queue is not None:
            queue.put_nowait(message)

    def fail(self, error: Exception) -> None:
        if self.closed.done():
            return
        self.closed.set_result(error)
        for queue in self._streams.values():
            queue.put_nowait(error)
        for future in self._pings.values():
            if not future.done():
                future.set_exception(error)
        self.control.put_nowait({"t": wire.ERROR, "status": 503, "message": str(error)})
        with contextlib.suppress(Exception):
            self._writer.close()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
