"""Operations a worker answers besides generation: one request in, one result out (tokenize, detokenize;
a pooling model's embed and score; a model's custom formatters; a request to a ``handle(inputs)`` model;
vLLM's sleep and wake-up).

A generation streams events; an operation returns one value. Each operation is a dataclass with its
wire codec and its result's (``to_wire``/``from_wire``, ``result_to_wire``/``result_from_wire``), named
by ``op`` in ``OPERATIONS``, which the wire message ``Op`` looks up. The server runs one through the
same pool as generations (``WorkerPool.perform``: deadlines, a failed worker's operation retried on
another), the worker through the ``handle_operation`` hook, whose built-in implementation dispatches
to the engine's optional protocol for it (``TokenizerEngine``, ``PoolingEngine``, ``HandlerEngine``), or
to the model's custom code for the formatters (``lmi_core.custom_code``). An engine without the protocol
answers 501.

Invariant: an operation that says ``idempotent`` (it changes no engine state; all but ``Invoke``,
``Sleep`` and ``WakeUp``) may run again after its worker failed, so the pool retries it on another
worker; ``all_ranks`` says whether every rank of an MPI worker must run it (in lockstep with its
generations) or rank 0 alone answers; ``takes_slot`` whether it holds one of the worker's
``max_rolling_batch_size`` places while it runs; ``tasks`` which models (``option.task``) answer it.
``Sleep`` and ``WakeUp`` (the residency's warm tier) change the engine's state: the pool sends them
to each of its workers (``WorkerPool.sleep``), never to "one of them". Standard library only (worker side).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

from lmi_core.engine import CHARS_PER_TOKEN, Engine, GenerationRequest
from lmi_core.pooling import Task

R = TypeVar("R")


class Operation(ABC, Generic[R]):
    """The base of every operation: what ``R`` it returns, and how it and its result travel."""

    op: ClassVar[str]
    all_ranks: ClassVar[bool] = False
    takes_slot: ClassVar[bool] = False
    # The models (``option.task``) that answer it; None: every model. The pool refuses the others.
    tasks: ClassVar[tuple[Task, ...] | None] = None
    idempotent: ClassVar[bool] = True

    def input_tokens(self) -> int:
        """The tokens of its inputs as the server can tell before a worker tokenizes them (exact for
        token ids, else characters / ``CHARS_PER_TOKEN``): what its tenant's token budget is charged
        when it is admitted. 0: it has no model input."""
        return 0

    def used_tokens(self, result: R) -> int | None:
        """The tokens it used, as its worker counted them (None: not counted); the budget is refunded
        to this."""
        return None

    @abstractmethod
    def to_wire(self) -> dict[str, Any]: ...

    @classmethod
    @abstractmethod
    def from_wire(cls, data: dict[str, Any]) -> Operation[Any]: ...

    @abstractmethod
    def result_to_wire(self, result: R) -> Any: ...

    @abstractmethod
    def result_from_wire(self, data: Any) -> R: ...


@dataclass
class Tokenize(Operation["TokenizeResult"]):
    """``request``'s prompt as the engine encodes it to generate (chat template, tools, special tokens),
    without the length checks of a generation: ``count_tokens`` and ``/tokenize`` agree with the
    prompt tokens of the same request. ``add_special_tokens=None`` adds them as a generation does
    (for a text prompt, not for a chat template, which writes its own)."""

    request: GenerationRequest
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True  # chat: end with the assistant's turn opening
    continue_final_message: bool = False  # chat: leave the last (assistant) message open
    token_strs: bool = False  # also return each token's string (the tokenizer's, not decoded text)
    op: ClassVar[str] = "tokenize"

    def to_wire(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "request": self.request.to_wire()}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Tokenize:
        special = data.get("add_special_tokens")
        return cls(
            GenerationRequest.from_wire(data["request"]),
            None if special is None else bool(special),
            bool(data.get("add_generation_prompt", True)),
            bool(data.get("continue_final_message", False)),
            bool(data.get("token_strs", False)),
        )

    def result_to_wire(self, result: TokenizeResult) -> Any:
        return [result.ids, result.token_strs]

    def result_from_wire(self, data: Any) -> TokenizeResult:
        ids, strs = data
        return TokenizeResult([int(i) for i in ids], None if strs is None else [str(s) for s in strs])


@dataclass
class TokenizeResult:
    ids: list[int]
    token_strs: list[str] | None = None


@dataclass
class Detokenize(Operation[str]):
    """The text of token ``ids`` (special tokens included, as vLLM's ``/detokenize``)."""

    ids: list[int]
    op: ClassVar[str] = "detokenize"

    def to_wire(self) -> dict[str, Any]:
        return {"ids": self.ids}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Detokenize:
        return cls([int(i) for i in data["ids"]])

    def result_to_wire(self, result: str) -> Any:
        return result

    def result_from_wire(self, data: Any) -> str:
        if not isinstance(data, str):
            raise TypeError(f"detokenize result is {type(data).__name__}, not str")
        return data


class _NoResult(Operation[None]):
    """An operation answered by its completion alone."""

    def result_to_wire(self, result: None) -> Any:
        return None

    def result_from_wire(self, data: Any) -> None:
        return None


@dataclass
class Sleep(_NoResult):
    """Put the engine to sleep at ``level`` (vLLM: 1 offloads the weights to host memory and drops the
    KV cache; 2 drops both). Every rank sleeps."""

    level: int = 1
    op: ClassVar[str] = "sleep"
    all_ranks: ClassVar[bool] = True
    idempotent: ClassVar[bool] = False

    def to_wire(self) -> dict[str, Any]:
        return {"level": self.level}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Sleep:
        return cls(int(data.get("level", 1)))


@dataclass
class WakeUp(_NoResult):
    """Wake a sleeping engine: its weights back on its devices, its KV cache allocated again."""

    op: ClassVar[str] = "wake_up"
    all_ranks: ClassVar[bool] = True
    idempotent: ClassVar[bool] = False

    def to_wire(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> WakeUp:
        return cls()


@dataclass
class Embed(Operation["EmbedResult"]):
    """One vector per input: texts, or token ids as they are (checked against the vocabulary). An input
    longer than the model's context is a 400 naming ``param``, or cut to it with ``truncate``.
    ``normalize`` None: the model's ``option.normalize``; ``dimensions``: keep the first ones (then
    normalized, as Matryoshka models are used). Every input runs in the engine's batches beside the
    other requests', so it takes a place like a generation; every rank of an MPI worker runs it."""

    inputs: list[str] | list[list[int]]
    truncate: bool = False
    normalize: bool | None = None
    dimensions: int | None = None
    param: str = "input"  # the request's field named by an error about an input
    op: ClassVar[str] = "embed"
    all_ranks: ClassVar[bool] = True
    takes_slot: ClassVar[bool] = True
    tasks: ClassVar[tuple[Task, ...] | None] = ("text-embedding",)

    def input_tokens(self) -> int:
        return sum(len(x) if isinstance(x, list) else len(x) // CHARS_PER_TOKEN + 1 for x in self.inputs)

    def used_tokens(self, result: EmbedResult) -> int | None:
        return result.prompt_tokens

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Embed:
        inputs = [x if isinstance(x, str) else [int(i) for i in x] for x in data["inputs"]]
        normalize, dimensions = data.get("normalize"), data.get("dimensions")
        return cls(
            inputs,  # type: ignore[arg-type]  # one kind per request, as the HTTP layer built it
            bool(data.get("truncate", False)),
            None if normalize is None else bool(normalize),
            None if dimensions is None else int(dimensions),
            str(data.get("param", "input")),
        )

    def result_to_wire(self, result: EmbedResult) -> Any:
        return [result.data, result.dimensions, result.prompt_tokens]

    def result_from_wire(self, data: Any) -> EmbedResult:
        vectors, dimensions, tokens = data
        if not isinstance(vectors, bytes) or len(vectors) != 4 * int(dimensions) * len(self.inputs):
            raise ValueError(f"embed result is not {len(self.inputs)} float32 vectors of {dimensions}")
        return EmbedResult(vectors, int(dimensions), int(tokens))


@dataclass
class EmbedResult:
    """The vectors as little-endian float32 bytes, row after row (``lmi_core.pooling``), their width,
    and the prompt tokens of all inputs together."""

    data: bytes
    dimensions: int
    prompt_tokens: int


@dataclass
class Score(Operation["ScoreResult"]):
    """The relevance of each ``(text_1, text_2)`` pair: a cross-encoder's score of the pair (a
    ``rerank`` model), or the cosine similarity of their embeddings (a ``text-embedding`` model)."""

    pairs: list[tuple[str, str]]
    truncate: bool = False
    param: str = "documents"  # the request's field named by an error about a pair
    op: ClassVar[str] = "score"
    all_ranks: ClassVar[bool] = True
    takes_slot: ClassVar[bool] = True
    tasks: ClassVar[tuple[Task, ...] | None] = ("text-embedding", "rerank")

    def input_tokens(self) -> int:
        return sum((len(a) + len(b)) // CHARS_PER_TOKEN + 1 for a, b in self.pairs)

    def used_tokens(self, result: ScoreResult) -> int | None:
        return result.prompt_tokens

    def to_wire(self) -> dict[str, Any]:
        return {"pairs": [list(p) for p in self.pairs], "truncate": self.truncate, "param": self.param}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Score:
        pairs = [(str(a), str(b)) for a, b in data["pairs"]]
        return cls(pairs, bool(data.get("truncate", False)), str(data.get("param", "documents")))

    def result_to_wire(self, result: ScoreResult) -> Any:
        return [result.scores, result.prompt_tokens]

    def result_from_wire(self, data: Any) -> ScoreResult:
        scores, tokens = data
        if len(scores) != len(self.pairs):
            raise ValueError(f"score result has {len(scores)} scores for {len(self.pairs)} pairs")
        return ScoreResult([float(s) for s in scores], int(tokens))


@dataclass
class ScoreResult:
    scores: list[float]
    prompt_tokens: int


@dataclass
class FormatInput(Operation["FormattedInput"]):
    """A request body through the model's custom input formatter (DJL's ``@input_formatter``), with
    the engine's tokenizer. ``code``: the custom code files, the first that has a formatter wins (an
    adapter's ``model.py``, then the model's; ``lmi_core.custom_code``)."""

    payload: dict[str, Any]
    code: list[str]
    op: ClassVar[str] = "format_input"

    def to_wire(self) -> dict[str, Any]:
        return {"payload": self.payload, "code": self.code}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> FormatInput:
        return cls(dict(data["payload"]), [str(p) for p in data["code"]])

    def result_to_wire(self, result: FormattedInput) -> Any:
        return [result.payload, result.output_formatter]

    def result_from_wire(self, data: Any) -> FormattedInput:
        payload, output = data
        if not isinstance(payload, dict):
            raise TypeError(f"format_input result is {type(payload).__name__}, not a dict")
        return FormattedInput(payload, bool(output))


@dataclass
class FormattedInput:
    payload: dict[str, Any]
    output_formatter: bool  # the files have an output formatter: each response object goes through it


@dataclass
class FormatOutput(Operation[Any]):
    """A response object (a whole result, or one streamed line) through the model's custom output
    formatter (DJL's ``@output_formatter``); ``code`` as ``FormatInput``'s."""

    data: Any
    code: list[str]
    op: ClassVar[str] = "format_output"

    def to_wire(self) -> dict[str, Any]:
        return {"data": self.data, "code": self.code}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> FormatOutput:
        return cls(data["data"], [str(p) for p in data["code"]])

    def result_to_wire(self, result: Any) -> Any:
        return result

    def result_from_wire(self, data: Any) -> Any:
        return data


@dataclass
class Invoke(Operation["InvokeResult"]):
    """One request to a ``handle(inputs)`` model (DJL's Python engine, ``lmi_core.worker.handler``):
    the HTTP headers as properties, the query parameters then the body (``data``) as content. It holds
    a place like a generation, and it is not retried on another worker: a handler may keep state."""

    properties: dict[str, str]
    content: list[tuple[str, bytes]]
    op: ClassVar[str] = "invoke"
    takes_slot: ClassVar[bool] = True
    idempotent: ClassVar[bool] = False

    def to_wire(self) -> dict[str, Any]:
        return {"properties": self.properties, "content": [list(entry) for entry in self.content]}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Invoke:
        content = [(str(key), bytes(value)) for key, value in data["content"]]
        return cls({str(k): str(v) for k, v in data["properties"].items()}, content)

    def result_to_wire(self, result: InvokeResult) -> Any:
        return [result.code, result.message, result.properties, result.body]

    def result_from_wire(self, data: Any) -> InvokeResult:
        code, message, properties, body = data
        return InvokeResult(
            int(code), str(message), {str(k): str(v) for k, v in properties.items()}, bytes(body)
        )


@dataclass
class InvokeResult:
    """A handler's ``Output``: status code and reason, headers, body."""

    code: int
    message: str
    properties: dict[str, str]
    body: bytes


# The operations the wire knows, by name: ``Op.from_frame`` decodes with ``OPERATIONS[op].from_wire``.
OPERATIONS: dict[str, type[Operation[Any]]] = {
    kind.op: kind
    for kind in (Tokenize, Detokenize, Sleep, WakeUp, Embed, Score, FormatInput, FormatOutput, Invoke)
}


@runtime_checkable
class TokenizerEngine(Engine, Protocol):
    """An engine that tokenizes outside a generation (``/tokenize``, ``/detokenize``,
    ``count_tokens``). Both run off the worker's event loop: their cost grows with the input."""

    async def tokenize(self, operation: Tokenize) -> TokenizeResult:
        """The prompt ids of ``operation.request``; a ``BadRequestError`` naming the field when the
        request has no prompt the engine can encode (no chat template, a token id out of range)."""
        ...

    async def detokenize(self, ids: list[int]) -> str:
        """The text of ``ids``; a ``BadRequestError`` for an id outside the vocabulary."""
        ...


@runtime_checkable
class SleepEngine(Engine, Protocol):
    """An engine with a sleep mode (vLLM's): it frees its device memory while its process stays, and
    wakes faster than it loads. The residency's warm tier (``lmi_core.serving.residency.warm_tier``)."""

    async def sleep(self, level: int) -> None: ...

    async def wake_up(self) -> None: ...


@runtime_checkable
class PoolingEngine(Engine, Protocol):
    """An engine of a pooling model (``option.task`` ``text-embedding`` or ``rerank``): it answers
    ``Embed`` and ``Score`` and refuses generations. Both batch with the other requests' inputs."""

    async def embed(self, operation: Embed) -> EmbedResult:
        """The vectors of ``operation.inputs``; a ``BadRequestError`` naming ``operation.param`` for an
        input too long (without ``truncate``), empty, or with a token id outside the vocabulary, and
        for ``dimensions`` wider than the model's; a 400 when the model does not embed."""
        ...

    async def score(self, operation: Score) -> ScoreResult:
        """The score of each pair; a ``BadRequestError`` for a pair too long (without ``truncate``)."""
        ...


@runtime_checkable
class HandlerEngine(Engine, Protocol):
    """An engine that answers ``Invoke``: a model served by its ``handle(inputs)`` function."""

    async def invoke(self, operation: Invoke) -> InvokeResult:
        """The handler's response to one request; its failure is the response too (a 424)."""
        ...
