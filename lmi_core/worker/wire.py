"""The worker wire protocol: length-prefixed msgpack frames of typed messages, multiplexed by request id.

A frame is a 4-byte big-endian length followed by a msgpack map. Every map has ``t`` (the message
type); request-scoped messages also carry ``id``. Many requests are in flight on one connection and
their chunks interleave. No pickle, ever.

Invariant: a message is one of the frozen dataclasses below, both ways. A sender builds one and
writes its ``to_frame()``; a receiver gets one from ``read_message``, whose ``parse`` checks every
field (type and presence) and raises ``ProtocolError`` for anything else, so no end reads a raw map
and a malformed frame is one clean error, never a ``KeyError`` deep in a handler. The values inside a
message are encoded by their own classes (``lmi_core.engine``: ``Token``, ``Finished``,
``EngineStats``, ``GenerationRequest``, ``WorkerContext``, ``LoraAdapter``; ``lmi_core.errors``:
``ServiceError.to_wire`` / ``EngineError.from_wire``); the messages call those codecs. Standard library
and msgpack only: this module is imported by worker processes.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar, cast, get_args

import msgpack

from lmi_core.engine import EngineStats, Finished, GenerationRequest, LoraAdapter, Token, WorkerContext
from lmi_core.errors import EngineError, ServiceError
from lmi_core.operations import OPERATIONS, Operation

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 64 * 1024 * 1024

READY_LINE = "lmi-worker listening on"

Frame = dict[str, Any]  # a decoded frame: the msgpack map, before ``parse``
T = TypeVar("T")
AdapterOp = Literal["load", "unload"]

# What the payload codecs raise for a value of the wrong shape (a missing key, a list too short, a
# string where a number goes, an infinite float made an int).
DECODE_ERRORS = (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError)


class ProtocolError(Exception):
    """A frame that cannot be encoded or decoded: truncated, oversized, not a msgpack map, not a
    message; ``field`` is the path of the value that cannot be encoded, where one is to blame."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class FrameTooLargeError(ProtocolError):
    """A frame over the size limit (``DEFAULT_MAX_FRAME``), sent or received."""


# -- frames ----------------------------------------------------------------------------------------


def unencodable(value: Any) -> str | None:
    """The path (``request.params.stop_sequences[0]``) of the first value in ``value`` that msgpack
    cannot pack as this protocol packs it: text that is not UTF-8 (a lone surrogate), an integer
    beyond 64 bits, a type msgpack does not know; None if there is none."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(item, int) and not isinstance(item, bool):
            if not -(2**63) <= item < 2**64:
                return path
        elif isinstance(item, dict):
            for key, child in item.items():
                if unencodable(key) is not None:
                    return path
                stack.append((child, f"{path}.{key}" if path else str(key)))
        elif isinstance(item, (list, tuple)):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))
        elif not (item is None or isinstance(item, (bool, float, bytes))):
            return path
    return None


def encode(message: Frame, max_size: int = DEFAULT_MAX_FRAME) -> bytes:
    """Serialize ``message`` into one frame; ``ProtocolError`` naming the value that cannot be packed,
    ``FrameTooLargeError`` past ``max_size``."""
    try:
        body: bytes = msgpack.packb(message, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        field = unencodable(message)
        raise ProtocolError(f"message cannot be encoded: {field or 'a value'}: {exc}", field) from None
    check_length(len(body), max_size)
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> Frame:
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
        raise FrameTooLargeError(f"frame of {length} bytes exceeds the {max_size}-byte limit")


async def read_frame(reader: asyncio.StreamReader, max_size: int = DEFAULT_MAX_FRAME) -> Frame | None:
    """Read one frame; None at a clean end of stream, ``ProtocolError`` inside a frame."""
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


async def read_message(reader: asyncio.StreamReader, max_size: int = DEFAULT_MAX_FRAME) -> Message | None:
    """Read and ``parse`` one message; None at a clean end of stream, else ``ProtocolError``."""
    frame = await read_frame(reader, max_size)
    return None if frame is None else parse(frame)


# -- field checks ------------------------------------------------------------------------------------


def _bad(frame: Frame, problem: str) -> ProtocolError:
    return ProtocolError(f"bad {frame.get('t')!r} message: {problem}")


def _field(frame: Frame, key: str, kind: type[T]) -> T:
    """``frame[key]``, which must be a ``kind`` (a bool is no int)."""
    value = frame.get(key)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if key not in frame:
        raise _bad(frame, f"no {key!r}")
    raise _bad(frame, f"{key!r} is {type(value).__name__}, not {kind.__name__}")


def _optional(frame: Frame, key: str, kind: type[T]) -> T | None:
    """``frame[key]`` when present and not nil, then a ``kind``; else None."""
    return None if frame.get(key) is None else _field(frame, key, kind)


def _payload(frame: Frame, key: str, decode: Callable[[Any], T]) -> T:
    """``decode(frame[key])`` with the value's own codec; a missing or malformed one is an error."""
    if key not in frame:
        raise _bad(frame, f"no {key!r}")
    try:
        return decode(frame[key])
    except DECODE_ERRORS as exc:
        raise _bad(frame, f"{key!r}: {exc!r}") from None


def _token_pairs(items: Any) -> list[tuple[str, Token]]:
    pairs = [(rid, Token.from_wire(token)) for rid, token in items]
    if not all(isinstance(rid, str) for rid, _ in pairs):
        raise ValueError("a request id that is not a string")
    return pairs


# -- server -> worker ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Init:
    """Load the engine with ``context``; the worker answers ``Loaded`` or an ``Err`` without id."""

    context: WorkerContext
    t: ClassVar[str] = "init"

    def to_frame(self) -> bytes:
        return encode({"t": self.t, "context": self.context.to_wire()})

    @classmethod
    def from_frame(cls, frame: Frame) -> Init:
        return cls(_payload(frame, "context", WorkerContext.from_wire))


@dataclass(frozen=True)
class Req:
    """Generate ``request``; its events come back under ``id`` (``Toks``, then ``Done`` or ``Err``)."""

    id: str
    request: GenerationRequest
    t: ClassVar[str] = "req"

    def to_frame(self) -> bytes:
        return encode({"t": self.t, "id": self.id, "request": self.request.to_wire()})

    @classmethod
    def from_frame(cls, frame: Frame) -> Req:
        return cls(_field(frame, "id", str), _payload(frame, "request", GenerationRequest.from_wire))


@dataclass(frozen=True)
class Op:
    """Run ``operation`` (``lmi_core.operations``); its result comes back under ``id`` (``OpResult``,
    or ``Err``). ``Cancel`` with its id stops it."""

    id: str
    operation: Operation[Any]
    t: ClassVar[str] = "op"

    def to_frame(self) -> bytes:
        return encode({"t": self.t, "id": self.id, "op": self.operation.op, "args": self.operation.to_wire()})

    @classmethod
    def from_frame(cls, frame: Frame) -> Op:
        name = _field(frame, "op", str)
        kind = OPERATIONS.get(name)
        if kind is None:
            raise _bad(frame, f"unknown operation {name!r}")
        return cls(_field(frame, "id", str), _payload(frame, "args", kind.from_wire))


@dataclass(frozen=True)
class Cancel:
    """Stop request ``id`` (its client is gone); no reply."""

    id: str
    t: ClassVar[str] = "cancel"

    def to_frame(self) -> bytes:
        return encode({"t": self.t, "id": self.id})

    @classmethod
    def from_frame(cls, frame: Frame) -> Cancel:
        return cls(_field(frame, "id", str))


@dataclass(frozen=True)
class Adapter:
    """Load or unload a LoRA adapter. No reply: a load that fails is logged by the worker, and the
    request that later uses the adapter gets the engine's error."""

    op: AdapterOp
    adapter: LoraAdapter
    t: ClassVar[str] = "adapter"

    def to_frame(self) -> bytes:
        return encode({"t": self.t, "op": self.op, "adapter": self.adapter.to_wire()})

    @classmethod
    def from_frame(cls, frame: Frame) -> Adapter:
        op = _field(frame, "op", str)
        if op not in get_args(AdapterOp):
            raise _bad(frame, f"unknown op {op!r}")
        return cls(cast(AdapterOp, op), _payload(frame, "adapter", LoraAdapter.from_wire))


@dataclass(frozen=True)
class Ping:
    """A heartbeat; the worker answers ``Pong`` with the same ``id``."""

    id: int
    t: ClassVar[str] = "ping"

    def to_frame(self) -> bytes:
        return encode({"t": self.t, "id": self.id})

    @classmethod
    def from_frame(cls, frame: Frame) -> Ping:
        return cls(_field(frame, "id", int))


@dataclass(frozen=True)
class Shutdown:
    """Close the connection (the worker then exits)."""

    t: ClassVar[str] = "shutdown"

    def to_frame(self) -> bytes:
        return encode({"t": self.t})

    @classmethod
    def from_frame(cls, frame: Frame) -> Shutdown:
        return cls()


# -- worker -> server ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    """The engine loaded on ``rank``; what it knows of its limits, told once, here (None: it does not
    say). ``max_model_len``: its context length, prompt plus generated tokens
    (``engine.ContextEngine``); ``max_input_length`` and ``max_token_bytes``: the most tokens a prompt
    may have, and the most bytes of prompt one token stands for (``engine.InputLimitEngine``);
    ``max_images``: the images one prompt may hold (``engine.ImageEngine``; 0: a text-only engine)."""

    rank: int
    max_model_len: int | None = None
    max_input_length: int | None = None
    max_token_bytes: int | None = None
    max_images: int = 0
    t: ClassVar[str] = "loaded"

    def to_frame(self) -> bytes:
        return encode(
            {
                "t": self.t,
                "rank": self.rank,
                "max_model_len": self.max_model_len,
                "max_input_length": self.max_input_length,
                "max_token_bytes": self.max_token_bytes,
                "max_images": self.max_images,
            }
        )

    @classmethod
    def from_frame(cls, frame: Frame) -> Loaded:
        return cls(
            _field(frame, "rank", int),
            _optional(frame, "max_model_len", int),
            _optional(frame, "max_input_length", int),
            _optional(frame, "max_token_bytes", int),
            _optional(frame, "max_images", int) or 0,
        )


@dataclass(frozen=True)
class Toks:
    """Every token the worker produced for any request since its last write, in order: one frame per
    write (per engine step), not one per token (``RankServer.send_tokens``). Each ``Token`` travels
    as a list (``Token.to_wire``)."""

    tokens: list[tuple[str, Token]]  # (request id, token)
    t: ClassVar[str] = "toks"

    def to_frame(self) -> bytes:
        return encode({"t": self.t, "tokens": [[rid, token.to_wire()] for rid, token in self.tokens]})

    @classmethod
    def from_frame(cls, frame: Frame) -> Toks:
        return cls(_payload(frame, "tokens", _token_pairs))  # all decoded first: a bad frame fails whole


@dataclass(frozen=True)
class Done:
    """Request ``id`` finished; its last event."""

    id: str
    finished: Finished
    t: ClassVar[str] = "done"

    def to_frame(self) -> bytes:
        return encode({"t": self.t, "id": self.id, "finished": self.finished.to_wire()})

    @classmethod
    def from_frame(cls, frame: Frame) -> Done:
        return cls(_field(frame, "id", str), _payload(frame, "finished", Finished.from_wire))


@dataclass(frozen=True)
class OpResult:
    """Operation ``id``'s result, as its operation encodes it (``Operation.result_to_wire``); the
    server decodes it with the operation it sent (``Operation.result_from_wire``)."""

    id: str
    value: Any
    t: ClassVar[str] = "opres"

    def to_frame(self) -> bytes:
        return encode({"t": self.t, "id": self.id, "value": self.value})

    @classmethod
    def from_frame(cls, frame: Frame) -> OpResult:
        if "value" not in frame:
            raise _bad(frame, "no 'value'")
        return cls(_field(frame, "id", str), frame["value"])


@dataclass(frozen=True)
class Err:
    """``error`` ended request ``id``; without an id, the engine failed to load or is unhealthy. It
    arrives as an ``EngineError`` with the sent error's status, type, message and param."""

    error: ServiceError
    id: str | None = None
    t: ClassVar[str] = "err"

    def to_frame(self) -> bytes:
        return encode({"t": self.t, "id": self.id, "error": self.error.to_wire()})

    @classmethod
    def from_frame(cls, frame: Frame) -> Err:
        return cls(_payload(frame, "error", EngineError.from_wire), _optional(frame, "id", str))


@dataclass(frozen=True)
class Pong:
    """The answer to ``Ping`` ``id``, with the engine's counters (None while the engine loads)."""

    id: int
    stats: EngineStats | None = None
    t: ClassVar[str] = "pong"

    def to_frame(self) -> bytes:
        stats = self.stats.to_wire() if self.stats is not None else None
        return encode({"t": self.t, "id": self.id, "stats": stats})

    @classmethod
    def from_frame(cls, frame: Frame) -> Pong:
        stats = _payload(frame, "stats", EngineStats.from_wire) if frame.get("stats") is not None else None
        return cls(_field(frame, "id", int), stats)


ServerMessage = Init | Req | Op | Cancel | Adapter | Ping | Shutdown
WorkerMessage = Loaded | Toks | Done | OpResult | Err | Pong
Message = ServerMessage | WorkerMessage

_PARSERS: dict[str, Callable[[Frame], Message]] = {
    kind.t: kind.from_frame
    for kind in (Init, Req, Op, Cancel, Adapter, Ping, Shutdown, Loaded, Toks, Done, OpResult, Err, Pong)
}


def parse(frame: Frame) -> Message:
    """The message a decoded frame holds; ``ProtocolError`` for an unknown type or a missing or
    mistyped field. Which messages an end accepts is its own dispatch's business."""
    kind = frame.get("t")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    return parser(frame)


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
