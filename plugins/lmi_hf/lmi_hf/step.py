"""What the HF engine's scheduler steps work on: ``StepPlan`` (what changes before a step), the
``Coordinator`` through which every rank applies the same plan, and ``Sequence`` (one request's state).

Plain data and the single-process coordinator: the engine (``lmi_hf.engine``) owns the scheduling,
``lmi_hf.distributed`` the MPI coordinator and the plan's codec.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lmi_core.engine import GenerationEvent, GenerationRequest
from lmi_core.errors import EngineError
from lmi_core.request_checks import check_token_ids
from lmi_hf.grammar import TokenConstraint
from lmi_hf.text import IncrementalDetokenizer, StopMatcher

Emit = Callable[[GenerationEvent | EngineError], None]


@dataclass
class StepPlan:
    """What changes before a step: requests admitted (with their sampling seeds) and cancelled;
    LoRA adapters dropped (asked for, and LRU evictions) and installed before the admissions, and
    waiting requests that fail (message: their adapter cannot be read)."""

    admit: list[tuple[str, int]] = field(default_factory=list)
    cancel: list[str] = field(default_factory=list)
    stop: bool = False
    unload: list[str] = field(default_factory=list)
    evict: list[str] = field(default_factory=list)
    load: list[tuple[str, str]] = field(default_factory=list)
    fail: list[tuple[str, str]] = field(default_factory=list)


class Coordinator(Protocol):
    """Who decides each step: this process alone, or rank 0 for every rank of an MPI job."""

    @property
    def leader(self) -> bool:
        """Whether this process makes the plans (the others receive them)."""
        ...

    def exchange(self, plan: StepPlan) -> StepPlan:
        """The step's plan for every rank: the leader's ``plan``, sent to or received from the others."""
        ...


class LocalCoordinator:
    """Python mode: this process alone decides each step."""

    def exchange(self, plan: StepPlan) -> StepPlan:
        return plan

    @property
    def leader(self) -> bool:
        return True


@dataclass
class Sequence:
    """One request's state inside the engine."""

    request: GenerationRequest
    prompt_ids: list[int]
    prompt_text: str
    max_new_tokens: int
    emit: Emit
    detokenizer: IncrementalDetokenizer
    stop: StopMatcher
    generator: torch.Generator | None = None
    seed: int = 0  # a sampled request's seed (its generator is re-seeded per position)
    constraint: TokenConstraint | None = None  # the output's grammar, when constrained
    generated: int = 0
    cancelled: bool = False
    done: bool = False
    # How often each token was generated (frequency/presence/repetition penalties, min_tokens).
    output_counts: Counter[int] = field(default_factory=Counter)
    # Tokens that end the generation (EOS unless ignored, plus stop_token_ids): min_tokens masks them.
    stop_ids: frozenset[int] = frozenset()
    prompt_logprobs: list[Any] | None = None
    # Tokens generated before a stream migrated here (GenerationRequest.resume_ids), replayed through
    # the detokenizer, stop matcher and grammar; the model sees prompt + these as its input.
    resumed: list[int] = field(default_factory=list)

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.resumed if self.resumed else self.prompt_ids

    def replay(self, tokens: list[int], vocab_size: int) -> None:
        """Put this sequence where it was after ``tokens`` (delivered by another worker): their text went
        to the client already, so only the state they leave is kept (held-back bytes, a partial stop
        match, the grammar's position, the penalty counts)."""
        check_token_ids(tokens, vocab_size)
        for token in tokens:
            text = "" if token in self.request.params.stop_token_ids else self.detokenizer.add(token)
            if self.constraint is not None:
                self.constraint.accept(token, text)
            self.output_counts[token] += 1
            self.stop.feed(text)
        self.generated = len(tokens)
        self.resumed = list(tokens)
