"""The worker-side engine contract: what a request is and what an engine yields.

Engine plugins import only this module (and ``hookspecs``) from lmi-core; it depends on the standard
library alone so that a worker can run in another virtual environment than the server.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["length", "eos_token", "stop_sequence", "cancelled"]

SAMPLING_EPS = 1e-5

StructuredKind = Literal["json", "regex", "choice", "grammar"]


@dataclass
class StructuredOutput:
    """A constraint on the generated text, which must be a complete match of ``spec`` read as ``kind``:
    ``json`` a JSON schema (JSON text), ``regex`` a regular expression, ``choice`` a JSON list of
    strings (the text is exactly one), ``grammar`` a Lark or GBNF grammar."""

    kind: StructuredKind
    spec: str
    # JSON without optional whitespace. Flexible whitespace lets greedy decoding of a weak model emit
    # whitespace until max_tokens (measured: the demo model, every schema); compact ends in ~50 tokens.
    compact_json: bool = True


@dataclass
class SamplingParams:
    """Generation parameters shared by every API; engines map them to their own."""

    max_new_tokens: int = 30
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_sequences: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    # Number of alternatives per token to report (OpenAI top_logprobs); 0 = none.
    top_logprobs: int = 0
    # Whether the client reads each token's log-prob; an engine may skip computing it when not
    # (vLLM: about a third of its per-token cost on CPU) and report None.
    logprobs: bool = True
    structured: StructuredOutput | None = None

    @property
    def greedy(self) -> bool:
        """Greedy decoding: no sampling, or a temperature / top_p so small that sampling tends to
        greedy anyway (and would overflow: logits / 1e-38 are inf; vLLM's rule for temperature)."""
        return not self.do_sample or self.temperature < SAMPLING_EPS or self.top_p < SAMPLING_EPS


@dataclass
class GenerationRequest:
    """One generation: a prompt (text, or chat messages for the tokenizer's template)."""

    request_id: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    # Function tools for the chat template (OpenAI's ``tools`` entries), when the request has them.
    tools: list[dict[str, Any]] | None = None

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> GenerationRequest:
        fields = dict(data.get("params", {}))
        if fields.get("structured") is not None:
            fields["structured"] = StructuredOutput(**fields["structured"])
        params = SamplingParams(**fields)
        return cls(
            request_id=data["request_id"],
            prompt=data.get("prompt"),
            messages=data.get("messages"),
            params=params,
            tools=data.get("tools"),
        )


@dataclass
class Token:
    """One generated token; ``text`` is the incremental detokenized text it adds."""

    id: int
    text: str
    log_prob: float | None
    special: bool = False
    top_logprobs: list[tuple[int, str, float]] | None = None
    # True on a request's final token (a ``Finished`` follows at once): lets streams mark the last
    # line without waiting for another event.
    last: bool = False


@dataclass
class Finished:
    """The last event of a request."""

    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    prompt: str = ""


GenerationEvent = Token | Finished


@dataclass
class WorkerContext:
    """What an engine plugin gets to load its engine inside a worker process."""

    model_id: str
    model_dir: str | None
    backend: str
    options: dict[str, Any]
    mode: Literal["python", "mpi"] = "python"
    rank: int = 0
    world_size: int = 1
    tensor_parallel_degree: int = 1
    pipeline_parallel_degree: int = 1
    device: Literal["cpu", "cuda"] = "cpu"
    max_batch_size: int = 32

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> WorkerContext:
        return cls(**data)


@dataclass
class EngineStats:
    """Counters an engine reports with each heartbeat (summed over workers for /metrics)."""

    running: int = 0
    waiting: int = 0
    finished_total: int = 0
    cancelled_total: int = 0
    generated_tokens_total: int = 0
    prompt_tokens_total: int = 0
    extra: dict[str, float] = field(default_factory=dict)
