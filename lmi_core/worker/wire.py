"""The worker wire protocol: length-prefixed msgpack frames, multiplexed by request id.

A frame is a 4-byte big-endian length followed by a msgpack map. Every map has ``t`` (the message
type); request-scoped messages also carry ``id``. Many requests are in flight on one connection and
their chunks interleave. No pickle, ever: a frame decodes to plain data or raises ``ProtocolError``.
The values inside a frame are encoded by their own classes (``lmi_core.engine``: ``Token``,
``Finished``, ``EngineStats``, ``GenerationRequest``, ``WorkerContext``; ``lmi_core.errors``:
``ServiceError.to_wire`` / ``EngineError.from_wire``). Standard library and msgpack only: this module
is imported by worker processes.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgpack

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 64 * 1024 * 1024

# Server -> worker.
INIT = "init"  # {"context": WorkerContext}
REQUEST = "req"  # {"id", "request": GenerationRequest}
CANCEL = "cancel"  # {"id"}
# {"op": "load" | "unload", "adapter": LoraAdapter}: no reply. A load that fails is logged by the
# worker; the request that later uses the adapter gets the engine's error.
ADAPTER = "adapter"
PING = "ping"  # {"id"}
SHUTDOWN = "shutdown"
# Worker -> server.
LOADED = "loaded"  # init succeeded
# {"tokens": [[id, Token], ...]}: every token the worker produced for any request since its last write,
# in order; one frame per write (per engine step), not one per token (RankServer.send_token).
TOKENS = "toks"
DONE = "done"  # {"id", "finished": Finished}
ERROR = "err"  # {"id" (absent: init failed or engine unhealthy), "error": ServiceError}
PONG = "pong"  # {"id", "loading", "stats": EngineStats (absent while loading)}

READY_LINE = "lmi-worker listening on"


class ProtocolError(Exception):
    """A frame that cannot be decoded: truncated, oversized, or not a msgpack map."""


def encode(message: dict[str, Any], max_size: int = DEFAULT_MAX_FRAME) -> bytes:
    """Serialize ``message`` into one frame."""
    try:
        body: bytes = msgpack.packb(message, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"message cannot be encoded: {exc}") from None
    if len(body) > max_size:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the {max_size}-byte limit")
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """Deserialize one frame body; anything but a msgpack map with a string ``t`` is an error."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage input
        raise ProtocolError(f"invalid msgpack frame: {exc.__class__.__name__}: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("t"), str):
        raise ProtocolError(f"frame is not a message map: {type(message).__name__}")
    return message


def check_length(length: int, max_size: int) -> None:
    if length > max_size:
        raise ProtocolError(f"frame of {length} bytes exceeds the {max_size}-byte limit")


async def read_message(
    reader: asyncio.StreamReader, max_size: int = DEFAULT_MAX_FRAME
) -> dict[str, Any] | None:
    """Read one message; None at a clean end of stream, ``ProtocolError`` inside a frame."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError(f"truncated frame header: {len(exc.partial)} of 4 bytes") from None
        return None
    (length,) = HEADER.unpack(header)
    check_length(length, max_size)
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError(f"truncated frame: {len(exc.partial)} of {length} bytes") from None
    return decode_body(body)


def parse_address(address: str) -> tuple[str, str | tuple[str, int]]:
    """``unix:/path`` -> ("unix", path); ``tcp:host:port`` -> ("tcp", (host, port))."""
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest:
        return "unix", rest
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit():
            return "tcp", (host, int(port))
    raise ValueError(f"bad worker address {address!r}: expected unix:<path> or tcp:<host>:<port>")
