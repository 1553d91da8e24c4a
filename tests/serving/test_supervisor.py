"""``SupervisedWorker.generate`` over a fake rank's socket: what a request sends, and what it never may."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lmi_core.config import ModelConfig, ServerConfig
from lmi_core.engine import Finished, GenerationRequest, SamplingParams
from lmi_core.errors import BadRequestError, PayloadTooLargeError
from lmi_core.launch_spec import WorkerSlot
from lmi_core.operations import Detokenize, Operation, Tokenize
from lmi_core.plugins import new_plugin_manager
from lmi_core.serving.supervisor import SupervisedWorker, WorkerState
from lmi_core.worker import wire
from tests.serving.fake_rank import rank_pair


async def _ready_worker(
    tmp_path: Path,
) -> tuple[SupervisedWorker, asyncio.StreamReader, asyncio.StreamWriter]:
    """A READY worker whose one rank is a socket the test drives (no process)."""
    conn, reader, writer = await rank_pair(tmp_path)
    worker = SupervisedWorker(
        ModelConfig(name="m", model_id="/m"),
        ServerConfig(),
        WorkerSlot(0, str(tmp_path / "w0"), (), None, 1),
        new_plugin_manager(load_entry_points=False),
    )
    worker.ranks, worker.state = [conn], WorkerState.READY
    return worker, reader, writer


async def _run(worker: SupervisedWorker, request: GenerationRequest) -> list[object]:
    return [event async for event in worker.generate(request)]


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (
            GenerationRequest("a", "x\udced\udca0\udc80y"),
            "prompt",
        ),  # raw ED A0 80, decoded with surrogateescape
        (
            GenerationRequest("b", "hi", params=SamplingParams(stop_sequences=["ok", "\ud800"])),
            "params.stop_sequences[1]",
        ),
        (GenerationRequest("c", "hi", params=SamplingParams(seed=2**70)), "params.seed"),
        (GenerationRequest("d", messages=[{"role": "user", "content": "\udc00"}]), "messages[0].content"),
    ],
)
async def test_a_request_that_cannot_be_encoded_is_a_400_and_the_connection_serves_on(
    tmp_path: Path, request_: GenerationRequest, param: str
) -> None:
    """Before: ``wire.encode`` raised ``ProtocolError`` from ``RankConnection.send``: a 500."""
    worker, reader, writer = await _ready_worker(tmp_path)
    with pytest.raises(BadRequestError) as refused:
        await _run(worker, request_)
    assert refused.value.status == 400 and refused.value.param == param
    assert worker.accepting and not worker.ranks[0].closed.done()
    # The next request reaches the rank whole, and its answer comes back.
    running = asyncio.ensure_future(_run(worker, GenerationRequest("next", "hello")))
    message = await asyncio.wait_for(wire.read_message(reader), 5)
    assert isinstance(message, wire.Req) and message.request.prompt == "hello"
    writer.write(wire.Done("next", Finished("length", 1, 0)).to_frame())
    assert await asyncio.wait_for(running, 5) == [Finished("length", 1, 0)]
    await worker.ranks[0].close()


@pytest.mark.parametrize(
    ("operation", "param"),
    [
        (Tokenize(GenerationRequest("t", "x\udced\udca0\udc80y")), "prompt"),
        (Detokenize([1, 2**70]), "ids[1]"),
    ],
)
async def test_an_operation_that_cannot_be_encoded_is_a_400_and_the_connection_serves_on(
    tmp_path: Path, operation: Operation[object], param: str
) -> None:
    """As a generation: before, ``RankConnection.send`` raised ``ProtocolError`` (a 500)."""
    worker, reader, writer = await _ready_worker(tmp_path)
    with pytest.raises(BadRequestError) as refused:
        await worker.perform("op", operation)
    assert refused.value.status == 400 and refused.value.param == param
    assert worker.accepting and not worker.ranks[0].closed.done()
    running = asyncio.ensure_future(worker.perform("next", Detokenize([1])))
    message = await asyncio.wait_for(wire.read_message(reader), 5)
    assert isinstance(message, wire.Op) and message.id == "next"  # the first sent nothing, not even a cancel
    writer.write(wire.OpResult("next", "a").to_frame())
    assert await asyncio.wait_for(running, 5) == "a"
    await worker.ranks[0].close()


async def test_a_request_over_the_frame_limit_is_a_413(tmp_path: Path) -> None:
    """A prompt over the 64 MiB frame limit (a server run with a max_request_size above it)."""
    worker, _, _ = await _ready_worker(tmp_path)
    with pytest.raises(PayloadTooLargeError, match="too large for the worker socket"):
        await _run(worker, GenerationRequest("big", "x" * wire.DEFAULT_MAX_FRAME))
    assert not worker.ranks[0].closed.done()
    await worker.ranks[0].close()
