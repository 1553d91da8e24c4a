"""Frame encoding and the decoder production uses (``read_message`` over an ``asyncio.StreamReader``),
fuzzed with arbitrary chunking and truncated, oversized and garbage input; the payload codecs."""

from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmi_core.engine import EngineStats, Finished, Token
from lmi_core.worker import wire
from lmi_core.worker.wire import ProtocolError, decode_body, encode, read_message

messages = st.fixed_dictionaries(
    {"t": st.sampled_from(["req", "toks", "done", "ping"])},
    optional={
        "id": st.text(max_size=20),
        "token": st.lists(
            st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(), st.floats(allow_nan=False), st.booleans())
        ),
    },
)


async def _read_chunks(chunks: list[bytes], max_size: int = wire.DEFAULT_MAX_FRAME) -> list[dict]:
    """Every message ``read_message`` reads while ``chunks`` arrive one by one, then end of stream."""
    reader = asyncio.StreamReader()

    async def arrive() -> None:
        for chunk in chunks:
            reader.feed_data(chunk)
            await asyncio.sleep(0)  # the reader sees each chunk alone, as from a socket
        reader.feed_eof()

    feeding = asyncio.ensure_future(arrive())
    out = []
    try:
        while (message := await read_message(reader, max_size)) is not None:
            out.append(message)
    finally:
        await feeding
    return out


def _chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@given(st.lists(messages, max_size=5), st.integers(min_value=1, max_value=17))
def test_roundtrip_in_arbitrary_chunks(batch: list[dict], chunk: int) -> None:
    data = b"".join(encode(m) for m in batch)
    assert asyncio.run(_read_chunks(_chunked(data, chunk))) == batch


@given(st.binary(max_size=200), st.integers(min_value=1, max_value=17))
@settings(max_examples=300)
def test_garbage_never_escapes_as_anything_but_protocol_error(data: bytes, chunk: int) -> None:
    try:
        asyncio.run(_read_chunks(_chunked(data, chunk), max_size=1000))
    except ProtocolError:
        pass


@given(messages, st.data())
def test_truncated_stream_is_reported(message: dict, data: st.DataObject) -> None:
    frame = encode(message)
    cut = data.draw(st.integers(min_value=1, max_value=len(frame) - 1))
    with pytest.raises(ProtocolError, match="truncated"):
        asyncio.run(_read_chunks([frame[:cut]]))


def test_unencodable_message_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="cannot be encoded"):
        encode({"t": "x", "n": 2**70})
    with pytest.raises(ProtocolError, match="cannot be encoded"):
        encode({"t": "x", "obj": object()})


def test_oversized_frame_is_refused_before_reading_it() -> None:
    # Only the header has arrived: the reader refuses the frame without waiting for its body.
    with pytest.raises(ProtocolError, match="exceeds the 100-byte limit"):
        asyncio.run(_read_chunks([struct.pack(">I", 101)], max_size=100))
    with pytest.raises(ProtocolError, match="exceeds"):
        encode({"t": "x", "blob": b"x" * 200}, max_size=100)


@pytest.mark.parametrize("body", [b"\xc1", b"\x93\x01\x02\x03", b"\x81\xa1t\x01", b"\xa3abc"])
def test_non_message_bodies_are_refused(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_body(body)


async def test_async_reader_reads_frames_and_reports_truncation() -> None:
    frames = encode({"t": "ping", "id": 1}) + encode({"t": "pong", "id": 1})
    assert [m["t"] for m in await _read_chunks([frames])] == ["ping", "pong"]
    with pytest.raises(ProtocolError, match="truncated frame header"):
        await _read_chunks([frames[: -len(encode({"t": "pong", "id": 1})) + 2]])
    with pytest.raises(ProtocolError, match="truncated frame: 3 of"):
        await _read_chunks([struct.pack(">I", 10) + b"abc"])


@pytest.mark.parametrize(
    ("address", "parsed"),
    [("unix:/tmp/s.0", ("unix", "/tmp/s.0")), ("tcp:10.0.0.1:9000", ("tcp", ("10.0.0.1", 9000)))],
)
def test_parse_address(address: str, parsed: tuple) -> None:
    assert wire.parse_address(address) == parsed
    with pytest.raises(ValueError, match="bad worker address"):
        wire.parse_address("pipe:x")


# -- payload codecs (lmi_core.engine): what the worker sends is what the server reads -------------

tokens = st.builds(
    Token,
    id=st.integers(0, 2**32),
    text=st.text(),
    log_prob=st.none() | st.floats(allow_nan=False),
    special=st.booleans(),
    top_logprobs=st.none()
    | st.lists(st.tuples(st.integers(0, 2**32), st.text(), st.floats(allow_nan=False)), max_size=3),
    last=st.booleans(),
    prompt_tokens=st.none() | st.integers(0, 2**20),
)
finishes = st.builds(
    Finished,
    finish_reason=st.sampled_from(["length", "eos_token", "stop_sequence", "cancelled"]),
    prompt_tokens=st.integers(0, 2**20),
    generated_tokens=st.integers(0, 2**20),
    prompt=st.text(),
    prompt_logprobs=st.none()
    | st.lists(
        st.tuples(
            st.integers(0, 2**20),
            st.text(),
            st.none() | st.floats(allow_nan=False),
            st.integers(0, 2**20),
            st.lists(st.tuples(st.integers(0, 2**20), st.text(), st.floats(allow_nan=False)), max_size=2),
        ),
        max_size=3,
    ),
)
stats = st.builds(
    EngineStats,
    running=st.integers(0, 1000),
    waiting=st.integers(0, 1000),
    finished_total=st.integers(0, 2**40),
    cancelled_total=st.integers(0, 2**40),
    extra=st.dictionaries(st.text(max_size=10), st.floats(allow_nan=False), max_size=3),
    kv_cache_usage=st.none() | st.floats(0.0, 1.0),
    kv_cache_tokens=st.none() | st.integers(0, 2**40),
    prefix_cache_hits=st.none() | st.integers(0, 2**40),
    prefix_cache_queries=st.none() | st.integers(0, 2**40),
)


@given(tokens, finishes, stats)
def test_payloads_survive_the_socket(token: Token, finished: Finished, stat: EngineStats) -> None:
    frames = [
        encode({"t": wire.TOKENS, "tokens": [["r", token.to_wire()]]}),
        encode({"t": wire.DONE, "id": "r", "finished": finished.to_wire()}),
        encode({"t": wire.PONG, "id": 1, "stats": stat.to_wire()}),
    ]
    got_token, got_finished, pong = asyncio.run(_read_chunks(frames))
    assert Token.from_wire(got_token["tokens"][0][1]) == token
    assert Finished.from_wire(got_finished["finished"]) == finished
    assert EngineStats.from_wire(pong["stats"]) == stat


def test_a_token_travels_as_a_list() -> None:
    # One frame per generated token: field names in every frame would make it 60% larger.
    assert Token(7, " hi", -0.5, last=True).to_wire() == [7, " hi", -0.5, False, None, True, None]


def test_an_unknown_finish_reason_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown finish reason"):
        Finished.from_wire({"finish_reason": "exploded", "prompt_tokens": 1, "generated_tokens": 1})
