"""Operations on the worker's socket: ``op`` in, ``opres`` or ``err`` out, cancellable like a request."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest

from lmi_core.engine import GenerationRequest
from lmi_core.errors import BadRequestError
from lmi_core.operations import (
    Detokenize,
    Embed,
    EmbedResult,
    Operation,
    PoolingEngine,
    Score,
    ScoreResult,
    Tokenize,
    TokenizerEngine,
    TokenizeResult,
)
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


class VectorEngine(StepEngine):
    """A ``PoolingEngine``: each input's vector is ``[length, 1]``; a pair scores its second's length."""

    async def embed(self, operation: Embed) -> EmbedResult:
        floats = [x for item in operation.inputs for x in (float(len(item)), 1.0)]
        return EmbedResult(struct.pack(f"<{len(floats)}f", *floats), 2, len(operation.inputs))

    async def score(self, operation: Score) -> ScoreResult:
        return ScoreResult([float(len(b)) for _, b in operation.pairs], 0)


async def test_a_pooling_engine_answers_embed_and_score_and_others_501() -> None:
    assert isinstance(VectorEngine(), PoolingEngine)
    reader, writer = await started(engine=VectorEngine())
    embed, score = Embed(["ab", "c"]), Score([("q", "abc")])
    writer.write(wire.Op("e", embed).to_frame() + wire.Op("s", score).to_frame())
    answers = {m.id: m for m in [await reply(reader), await reply(reader)] if isinstance(m, wire.OpResult)}
    assert embed.result_from_wire(answers["e"].value) == EmbedResult(struct.pack("<4f", 2, 1, 1, 1), 2, 2)
    assert score.result_from_wire(answers["s"].value) == ScoreResult([3.0], 0)
    writer.close()
    reader, writer = await started(engine=CharEngine())  # a tokenizer, not a pooling engine
    writer.write(wire.Op("b", embed).to_frame())
    error = await reply(reader)
    assert isinstance(error, wire.Err) and (error.error.status, error.error.type) == (501, "NotImplemented")
    writer.close()


OPERATIONS_AND_RESULTS: list[tuple[Operation[Any], Any]] = [
    (Tokenize(GenerationRequest("r", "x")), TokenizeResult([1], None)),
    (Detokenize([1, 2]), "text"),
    (Embed(["a", "b"], True, False, 2, "inputs"), EmbedResult(bytes(16), 2, 5)),
    (Embed([[1, 2], [3]]), EmbedResult(bytes(8), 1, 3)),
    (Score([("q", "d")], True, "texts"), ScoreResult([0.5], 2)),
]


@pytest.mark.parametrize(("operation", "result"), OPERATIONS_AND_RESULTS)
def test_operations_and_results_survive_their_codecs(operation: Operation[Any], result: Any) -> None:
    assert type(operation).from_wire(operation.to_wire()) == operation
    assert operation.result_from_wire(operation.result_to_wire(result)) == result


def test_a_result_that_does_not_fit_its_operation_is_refused() -> None:
    with pytest.raises(ValueError, match="2 float32 vectors"):
        Embed(["a", "b"]).result_from_wire([bytes(4), 1, 2])
    with pytest.raises(ValueError, match="1 scores for 2 pairs"):
        Score([("a", "b"), ("c", "d")]).result_from_wire([[0.5], 2])


def test_the_tokens_an_operation_charges_its_tenant_before_and_after_it_runs() -> None:
    assert Embed(["abcdefgh", "x"]).input_tokens() == 3 + 1  # characters / 4 + 1 each
    assert Embed([[1, 2, 3], [4]]).input_tokens() == 4  # token ids: exact
    assert Score([("abcd", "efgh")]).input_tokens() == 3
    tokenize = Tokenize(GenerationRequest("r", prompt="hello"))
    assert tokenize.input_tokens() == 0  # no place taken, nothing charged
    assert Embed(["a"]).used_tokens(EmbedResult(b"\0" * 4, 1, 7)) == 7
    assert Score([("a", "b")]).used_tokens(ScoreResult([0.5], 9)) == 9
    assert tokenize.used_tokens(TokenizeResult([1])) is None
