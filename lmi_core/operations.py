"""Operations a worker answers besides generation: one request in, one result out (tokenize, detokenize).

A generation streams events; an operation returns one value. Each operation is a dataclass with its
wire codec and its result's (``to_wire``/``from_wire``, ``result_to_wire``/``result_from_wire``), named
by ``op`` in ``OPERATIONS``, which the wire message ``Op`` looks up. The server runs one through the
same pool as generations (``WorkerPool.perform``: deadlines, a failed worker's operation retried on
another), the worker through the ``handle_operation`` hook, whose built-in implementation dispatches
to the engine's optional protocol for it (``TokenizerEngine``). An engine without it answers 501.

Invariant: an operation is idempotent (tokenizing changes no engine state), so the pool may run it
again after its worker failed. ``Sleep`` and ``WakeUp`` (the residency's warm tier) change the
engine's state but are idempotent too; the pool sends them to each of its workers
(``WorkerPool.sleep``), never to "one of them". ``all_ranks`` says whether every rank of an MPI
worker must run it (in lockstep with its generations) or rank 0 alone answers; ``takes_slot``
whether it holds one of the worker's ``max_rolling_batch_size`` places while it runs. Standard
library only (worker side).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

from lmi_core.engine import Engine, GenerationRequest

R = TypeVar("R")


class Operation(ABC, Generic[R]):
    """The base of every operation: what ``R`` it returns, and how it and its result travel."""

    op: ClassVar[str]
    all_ranks: ClassVar[bool] = False
    takes_slot: ClassVar[bool] = False

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

    def to_wire(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> WakeUp:
        return cls()


# The operations the wire knows, by name: ``Op.from_frame`` decodes with ``OPERATIONS[op].from_wire``.
OPERATIONS: dict[str, type[Operation[Any]]] = {
    kind.op: kind for kind in (Tokenize, Detokenize, Sleep, WakeUp)
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
