"""Frame encoding and the decoder production uses (``read_frame`` over an ``asyncio.StreamReader``),
fuzzed with arbitrary chunking and truncated, oversized and garbage input; the typed messages both ends
exchange (``to_frame`` / ``parse``), round-tripped and fuzzed: ``parse`` returns a message or raises
``ProtocolError``, never anything else."""

from __future__ import annotations

import asyncio
import re
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmi_core.engine import (
    EngineStats,
    Finished,
    GenerationRequest,
    LoraAdapter,
    SamplingParams,
    StructuredOutput,
    Token,
    WorkerContext,
)
from lmi_core.errors import EngineError, EngineFailedError, ServiceError
from lmi_core.operations import Detokenize, Embed, Score, Tokenize
from lmi_core.worker import wire
from lmi_core.worker.wire import ProtocolError, decode_body, encode, parse, read_frame

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
    """Every frame ``read_frame`` reads while ``chunks`` arrive one by one, then end of stream."""
    reader = asyncio.StreamReader()

    async def arrive() -> None:
        for chunk in chunks:
            reader.feed_data(chunk)
            await asyncio.sleep(0)  # the reader sees each chunk alone, as from a socket
        reader.feed_eof()

    feeding = asyncio.ensure_future(arrive())
    out = []
    try:
        while (message := await read_frame(reader, max_size)) is not None:
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


# -- messages: what one end sends is what the other reads -------------------------------------------

ids = st.text(max_size=40)
floats = st.floats(allow_nan=False)
tokens = st.builds(
    Token,
    id=st.integers(0, 2**32),
    text=st.text(),
    log_prob=st.none() | floats,
    special=st.booleans(),
    top_logprobs=st.none() | st.lists(st.tuples(st.integers(0, 2**32), st.text(), floats), max_size=3),
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
            st.none() | floats,
            st.integers(0, 2**20),
            st.lists(st.tuples(st.integers(0, 2**20), st.text(), floats), max_size=2),
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
    extra=st.dictionaries(st.text(max_size=10), floats, max_size=3),
    kv_cache_usage=st.none() | st.floats(0.0, 1.0),
    kv_cache_tokens=st.none() | st.integers(0, 2**40),
    prefix_cache_hits=st.none() | st.integers(0, 2**40),
    prefix_cache_queries=st.none() | st.integers(0, 2**40),
    adapters=st.lists(st.text(max_size=10), max_size=3),
    lora_loads_total=st.integers(0, 2**40),
    lora_evictions_total=st.integers(0, 2**40),
)
adapters = st.builds(LoraAdapter, name=st.text(max_size=10), path=st.text(max_size=20), pinned=st.booleans())
requests = st.builds(
    GenerationRequest,
    request_id=ids,
    prompt=st.none() | st.text(),
    messages=st.none() | st.lists(st.fixed_dictionaries({"role": st.text(max_size=9), "content": st.text()})),
    params=st.builds(
        SamplingParams,
        max_new_tokens=st.integers(1, 2**20),
        do_sample=st.booleans(),
        temperature=floats,
        seed=st.none() | st.integers(0, 2**32),
        stop_sequences=st.lists(st.text(max_size=5), max_size=3),
        logit_bias=st.lists(st.tuples(st.integers(0, 2**20), floats), max_size=3),
        structured=st.none()
        | st.builds(
            StructuredOutput,
            st.sampled_from(["json", "regex"]),
            st.text(),
            starts_after=st.none() | st.just("</think>"),
        ),
        stream_interval=st.none() | st.integers(1, 16),
    ),
    prompt_ids=st.none() | st.lists(st.integers(0, 2**20), max_size=5),
    chat_template_kwargs=st.none()
    | st.dictionaries(st.text(max_size=10), st.booleans() | st.text(max_size=5), max_size=3),
    adapter=st.none() | adapters,
    resume_ids=st.lists(st.integers(0, 2**20), max_size=5),
)
contexts = st.builds(
    WorkerContext,
    model_id=st.text(max_size=20),
    model_dir=st.none() | st.text(max_size=20),
    backend=st.sampled_from(["hf", "vllm"]),
    options=st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
    mode=st.sampled_from(["python", "mpi"]),
    world_size=st.integers(1, 8),
    device=st.sampled_from(["cpu", "cuda"]),
    dtype=st.none() | st.sampled_from(["fp16", "bf16"]),
)
# Every message type but ``Err``, whose exception compares by identity (its round trip is below).
comparable = st.one_of(
    st.builds(wire.Init, contexts),
    st.builds(wire.Req, ids, requests),
    st.builds(
        wire.Op,
        ids,
        st.builds(Tokenize, requests, st.none() | st.booleans(), st.booleans(), st.booleans(), st.booleans())
        | st.builds(Detokenize, st.lists(st.integers(0, 2**31), max_size=5))
        | st.builds(Embed, st.lists(st.text(), max_size=3), st.booleans(), st.none() | st.booleans())
        | st.builds(Score, st.lists(st.tuples(st.text(), st.text()), max_size=3), st.booleans()),
    ),
    st.builds(wire.Cancel, ids),
    st.builds(wire.Adapter, st.sampled_from(["load", "unload"]), adapters),
    st.builds(wire.Ping, st.integers(0, 2**63)),
    st.just(wire.Shutdown()),
    st.builds(wire.Loaded, st.integers(0, 64), st.none() | st.integers(1, 2**31)),
    st.builds(wire.Toks, st.lists(st.tuples(ids, tokens), max_size=4)),
    st.builds(wire.Done, ids, finishes),
    st.builds(wire.OpResult, ids, st.text() | st.lists(st.integers(0, 2**31) | st.none(), max_size=3)),
    st.builds(wire.Pong, st.integers(0, 2**63), st.none() | stats),
)
errors = st.builds(
    wire.Err,
    st.builds(
        ServiceError,
        st.text(),
        st.integers(400, 599),
        st.sampled_from(["BadRequestException", "X"]),
        st.none(),
    )
    | st.builds(EngineFailedError, st.text()),
    st.none() | ids,
)


def _frame_map(message: wire.Message) -> dict[str, Any]:
    """The map ``message`` travels as, as the other end decodes it."""
    return decode_body(message.to_frame()[wire.HEADER.size :])


@given(st.lists(comparable, max_size=4), st.integers(min_value=1, max_value=64))
def test_every_message_survives_the_socket(messages: list[wire.Message], chunk: int) -> None:
    async def read_all(data: bytes) -> list[wire.Message]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        out = []
        while (message := await wire.read_message(reader)) is not None:
            out.append(message)
        return out

    data = b"".join(message.to_frame() for message in messages)
    assert asyncio.run(read_all(data)) == messages
    assert [parse(frame) for frame in asyncio.run(_read_chunks(_chunked(data, chunk)))] == messages


@given(errors)
def test_an_error_arrives_as_an_engine_error_with_its_fields(sent: wire.Err) -> None:
    got = parse(_frame_map(sent))
    assert isinstance(got, wire.Err) and isinstance(got.error, EngineError) and got.id == sent.id
    assert (str(got.error), got.error.status, got.error.type, got.error.param) == (
        str(sent.error),
        sent.error.status,
        sent.error.type,
        sent.error.param,
    )
    assert isinstance(got.error, EngineFailedError) == isinstance(sent.error, EngineFailedError)


def test_a_token_travels_as_a_list() -> None:
    # Every generated token crosses the socket: field names in each would make a one-token frame
    # 136 bytes instead of 79 (Token.to_wire).
    assert Token(7, " hi", -0.5, last=True).to_wire() == [7, " hi", -0.5, False, None, True, None]
    pair = _frame_map(wire.Toks([("r", Token(7, " hi", -0.5))]))["tokens"][0]
    assert pair == ["r", [7, " hi", -0.5, False, None, False, None]]


def test_an_unknown_finish_reason_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown finish reason"):
        Finished.from_wire({"finish_reason": "exploded", "prompt_tokens": 1, "generated_tokens": 1})


REQUEST = GenerationRequest("r", "x").to_wire()
TOKEN = Token(1, "x", None).to_wire()
FINISHED = Finished("length", 1, 1).to_wire()
ERROR = EngineError("boom").to_wire()


@pytest.mark.parametrize(
    ("frame", "problem"),
    [
        ({"t": "tok", "id": "r"}, "unknown message type 'tok'"),  # one frame per token: gone
        ({"id": "r"}, "unknown message type None"),
        ({"t": 5}, "unknown message type 5"),
        ({"t": "init"}, "no 'context'"),
        ({"t": "init", "context": {"model_id": "m"}}, "'context'"),  # fields missing
        ({"t": "req", "request": REQUEST}, "no 'id'"),
        ({"t": "req", "id": 5, "request": REQUEST}, "'id' is int, not str"),
        ({"t": "req", "id": "r", "request": ["r"]}, "'request'"),
        ({"t": "req", "id": "r", "request": {"request_id": "r", "params": {"top_q": 1}}}, "'request'"),
        ({"t": "op", "id": "r", "op": "classify", "args": {}}, "unknown operation 'classify'"),
        ({"t": "op", "id": "r", "args": {"ids": [1]}}, "no 'op'"),
        ({"t": "op", "op": "detokenize", "args": {"ids": [1]}}, "no 'id'"),
        ({"t": "op", "id": "r", "op": "detokenize"}, "no 'args'"),
        ({"t": "op", "id": "r", "op": "detokenize", "args": {"ids": ["x"]}}, "'args'"),
        ({"t": "op", "id": "r", "op": "tokenize", "args": {"request": ["r"]}}, "'args'"),
        ({"t": "opres", "id": "r"}, "no 'value'"),
        ({"t": "opres", "value": 1}, "no 'id'"),
        ({"t": "cancel"}, "no 'id'"),
        ({"t": "cancel", "id": ["r"]}, "'id' is list, not str"),
        ({"t": "adapter", "op": "reload", "adapter": {"name": "a", "path": "/a"}}, "unknown op 'reload'"),
        ({"t": "adapter", "op": "load"}, "no 'adapter'"),
        ({"t": "adapter", "op": "load", "adapter": {"name": "a"}}, "'adapter'"),
        ({"t": "ping", "id": "1"}, "'id' is str, not int"),
        ({"t": "ping", "id": True}, "'id' is bool, not int"),
        ({"t": "loaded"}, "no 'rank'"),
        ({"t": "loaded", "rank": 0, "max_model_len": "512"}, "'max_model_len' is str, not int"),
        ({"t": "toks"}, "no 'tokens'"),
        ({"t": "toks", "tokens": [["r", [1, "x"]]]}, "'tokens'"),  # a token too short
        ({"t": "toks", "tokens": [[5, TOKEN]]}, "not a string"),
        ({"t": "toks", "tokens": [[["r"], TOKEN]]}, "not a string"),
        ({"t": "toks", "tokens": {"r": TOKEN}}, "'tokens'"),
        ({"t": "done", "id": "r"}, "no 'finished'"),
        ({"t": "done", "id": "r", "finished": {"finish_reason": "bored"}}, "'finished'"),
        ({"t": "done", "finished": FINISHED}, "no 'id'"),
        ({"t": "err", "id": "r"}, "no 'error'"),
        ({"t": "err", "id": "r", "error": 5}, "'error'"),
        ({"t": "err", "id": 3, "error": ERROR}, "'id' is int, not str"),
        ({"t": "err", "error": {"status": "teapot"}}, "'error'"),
        ({"t": "pong"}, "no 'id'"),
        ({"t": "pong", "id": 0, "stats": [1, 2]}, "'stats'"),
        ({"t": "pong", "id": 0, "stats": {"running": float("inf")}}, "'stats'"),
    ],
)
def test_parse_refuses_missing_and_mistyped_fields(frame: dict[str, Any], problem: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(problem)):
        parse(frame)


# Arbitrary msgpack values, and maps whose keys are mostly the messages' own field names.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.binary(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = ["id", "context", "request", "op", "args", "adapter", "rank", "max_model_len", "tokens", "finished"]
FIELDS += ["value", "error"]
KINDS = [
    kind.t for kind in (wire.Init, wire.Req, wire.Op, wire.Cancel, wire.Adapter, wire.Ping, wire.Shutdown)
]
KINDS += [kind.t for kind in (wire.Loaded, wire.Toks, wire.Done, wire.OpResult, wire.Err, wire.Pong)]
maps = st.builds(
    lambda kind, rest: {**rest, "t": kind},
    st.sampled_from(KINDS) | st.text(max_size=6),
    st.dictionaries(st.sampled_from([*FIELDS, "stats"]) | st.text(max_size=6), values, max_size=5),
)


def _parses_or_refuses(frame: dict[Any, Any]) -> None:
    try:
        message = parse(frame)
    except ProtocolError:
        return
    assert message.t == frame["t"]


@given(maps)
@settings(max_examples=500)
def test_arbitrary_maps_parse_or_are_refused_with_a_protocol_error(frame: dict[Any, Any]) -> None:
    _parses_or_refuses(frame)
    _parses_or_refuses(decode_body(encode(frame)[wire.HEADER.size :]))  # as msgpack delivers it


def _mutated(data: st.DataObject, value: Any, depth: int = 0) -> Any:
    """``value`` with one part, at any depth, replaced by an arbitrary value."""
    if not isinstance(value, dict | list) or not value or depth > 5 or data.draw(st.integers(0, 3)) == 0:
        return data.draw(values)
    if isinstance(value, dict):
        key = data.draw(st.sampled_from(sorted(value, key=str)))
        return {**value, key: _mutated(data, value[key], depth + 1)}
    i = data.draw(st.integers(0, len(value) - 1))
    return [*value[:i], _mutated(data, value[i], depth + 1), *value[i + 1 :]]


@given(comparable | errors, st.data())
@settings(max_examples=500)
def test_valid_frames_with_one_part_broken_parse_or_are_refused(
    message: wire.Message, data: st.DataObject
) -> None:
    frame = _frame_map(message)
    fields = sorted(key for key in frame if key != "t")
    if fields:  # not shutdown
        key = data.draw(st.sampled_from(fields))
        frame[key] = _mutated(data, frame[key])
    _parses_or_refuses(frame)
