"""Operations on the worker's socket: ``op`` in, ``opres`` or ``err`` out, cancellable like a request."""

from __future__ import annotations

import asyncio

import pytest

from lmi_core.engine import GenerationRequest
from lmi_core.errors import BadRequestError
from lmi_core.operations import Detokenize, Tokenize, TokenizerEngine, TokenizeResult
from lmi_core.worker import wire
from tests.worker.test_worker_output import StepEngine, started


class CharEngine(StepEngine):
    """A ``TokenizerEngine`` whose tokens are characters; ``hold`` keeps its tokenize waiting."""

    def __init__(self) -> None:
        self.hold = asyncio.Event()
        self.hold.set()
        self.cancelled = asyncio.Event()

    async def tokenize(self, operation: Tokenize) -> TokenizeResult:
        try:
            await self.hold.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        prompt = operation.request.prompt or ""
        return TokenizeResult([ord(c) for c in prompt], list(prompt) if operation.token_strs else None)

    async def detokenize(self, ids: list[int]) -> str:
        if any(i < 0 for i in ids):
            raise BadRequestError("a negative token id", param="tokens")
        return "".join(map(chr, ids))


def tokenize(rid: str, prompt: str, strs: bool = False) -> bytes:
    return wire.Op(rid, Tokenize(GenerationRequest(rid, prompt), token_strs=strs)).to_frame()


async def reply(reader: asyncio.StreamReader) -> wire.Message:
    message = await asyncio.wait_for(wire.read_message(reader), 5)
    assert message is not None
    return message


async def test_an_operation_is_answered_with_its_encoded_result() -> None:
    assert isinstance(CharEngine(), TokenizerEngine)
    reader, writer = await started(engine=CharEngine())
    writer.write(tokenize("a", "hi", strs=True) + wire.Op("b", Detokenize([111, 107])).to_frame())
    answers = {m.id: m for m in [await reply(reader), await reply(reader)] if isinstance(m, wire.OpResult)}
    assert Tokenize(GenerationRequest("a")).result_from_wire(answers["a"].value) == TokenizeResult(
        [104, 105], ["h", "i"]
    )
    assert Detokenize([]).result_from_wire(answers["b"].value) == "ok"
    writer.close()


async def test_an_engine_error_and_a_missing_protocol_answer_the_operation_alone() -> None:
    reader, writer = await started(engine=CharEngine())
    writer.write(wire.Op("a", Detokenize([-1])).to_frame())
    error = await reply(reader)
    assert isinstance(error, wire.Err) and error.id == "a"
    assert (error.error.status, error.error.param) == (400, "tokens")
    writer.close()
    reader, writer = await started()  # a StepEngine: no TokenizerEngine
    writer.write(wire.Op("b", Detokenize([1])).to_frame())
    error = await reply(reader)
    assert isinstance(error, wire.Err) and error.id == "b"
    assert (error.error.status, error.error.type) == (501, "NotImplemented")
    assert "does not detokenize" in str(error.error)
    writer.close()


async def test_cancel_stops_an_operation_that_is_running() -> None:
    engine = CharEngine()
    engine.hold.clear()
    reader, writer = await started(engine=engine)
    writer.write(tokenize("a", "hi"))
    await asyncio.sleep(0.05)
    writer.write(wire.Cancel("a").to_frame() + tokenize("b", "x"))
    await asyncio.wait_for(engine.cancelled.wait(), 5)
    engine.hold.set()
    answer = await reply(reader)  # only b's: a cancelled operation gets no answer
    assert isinstance(answer, wire.OpResult) and answer.id == "b"
    writer.close()


@pytest.mark.parametrize("operation", [Tokenize(GenerationRequest("r", "x")), Detokenize([1, 2])])
def test_operations_and_results_survive_their_codecs(operation: Tokenize | Detokenize) -> None:
    assert type(operation).from_wire(operation.to_wire()) == operation
    result = TokenizeResult([1], None) if isinstance(operation, Tokenize) else "text"
    assert operation.result_from_wire(operation.result_to_wire(result)) == result
