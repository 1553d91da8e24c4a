"""Frame encoding and decoding; fuzzed with truncated, oversized and garbage input."""

from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmi_core import wire
from lmi_core.wire import FrameDecoder, ProtocolError, decode_body, encode, read_message

messages = st.fixed_dictionaries(
    {"t": st.sampled_from(["req", "tok", "done", "ping"])},
    optional={
        "id": st.text(max_size=20),
        "token": st.lists(
            st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(), st.floats(allow_nan=False), st.booleans())
        ),
    },
)


@given(st.lists(messages, max_size=5), st.integers(min_value=1, max_value=17))
def test_roundtrip_in_arbitrary_chunks(batch: list[dict], chunk: int) -> None:
    data = b"".join(encode(m) for m in batch)
    decoder = FrameDecoder()
    out = [m for i in range(0, len(data), chunk) for m in decoder.feed(data[i : i + chunk])]
    decoder.close()
    assert out == batch


@given(st.binary(max_size=200))
@settings(max_examples=300)
def test_garbage_never_escapes_as_anything_but_protocol_error(data: bytes) -> None:
    decoder = FrameDecoder(max_size=1000)
    try:
        list(decoder.feed(data))
        decoder.close()
    except ProtocolError:
        pass


@given(messages, st.data())
def test_truncated_stream_is_reported(message: dict, data: st.DataObject) -> None:
    frame = encode(message)
    cut = data.draw(st.integers(min_value=1, max_value=len(frame) - 1))
    decoder = FrameDecoder()
    assert list(decoder.feed(frame[:cut])) == []
    with pytest.raises(ProtocolError, match="truncated"):
        decoder.close()


def test_unencodable_message_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="cannot be encoded"):
        encode({"t": "x", "n": 2**70})
    with pytest.raises(ProtocolError, match="cannot be encoded"):
        encode({"t": "x", "obj": object()})


def test_oversized_frame_is_refused_before_reading_it() -> None:
    with pytest.raises(ProtocolError, match="exceeds the 100-byte limit"):
        list(FrameDecoder(max_size=100).feed(struct.pack(">I", 101)))
    with pytest.raises(ProtocolError, match="exceeds"):
        encode({"t": "x", "blob": b"x" * 200}, max_size=100)


@pytest.mark.parametrize("body", [b"\xc1", b"\x93\x01\x02\x03", b"\x81\xa1t\x01", b"\xa3abc"])
def test_non_message_bodies_are_refused(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_body(body)


async def _read_all(data: bytes, max_size: int = 1000) -> list[dict]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    out = []
    while (message := await read_message(reader, max_size)) is not None:
        out.append(message)
    return out


async def test_async_reader_reads_frames_and_reports_truncation() -> None:
    frames = encode({"t": "ping", "id": 1}) + encode({"t": "pong", "id": 1})
    assert [m["t"] for m in await _read_all(frames)] == ["ping", "pong"]
    with pytest.raises(ProtocolError, match="truncated frame header"):
        await _read_all(frames[: -len(encode({"t": "pong", "id": 1})) + 2])
    with pytest.raises(ProtocolError, match="truncated frame: 3 of"):
        await _read_all(struct.pack(">I", 10) + b"abc")


@pytest.mark.parametrize(
    ("address", "parsed"),
    [("unix:/tmp/s.0", ("unix", "/tmp/s.0")), ("tcp:10.0.0.1:9000", ("tcp", ("10.0.0.1", 9000)))],
)
def test_parse_address(address: str, parsed: tuple) -> None:
    assert wire.parse_address(address) == parsed
    with pytest.raises(ValueError, match="bad worker address"):
        wire.parse_address("pipe:x")
