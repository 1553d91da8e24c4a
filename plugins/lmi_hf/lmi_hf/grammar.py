"""Constrained decoding for the HF engine with llguidance: one matcher per constrained sequence.

Invariant: a constrained sequence only ever samples a token its grammar allows next, and an end-of-
sequence token exactly where the grammar may end (llguidance allows the tokenizer's EOS ids only in an
accepting state); so a constrained output that ends by EOS is a complete match of its grammar.

llguidance rather than xgrammar, for correctness: with the demo model xgrammar 0.2.8 let a raw control
character into a JSON string (invalid JSON by RFC 8259), llguidance 1.7/1.9 did not. Otherwise close
(measured on the shared 2-core machine, demo tokenizer, the test schemas; noisy): compile 0.5 ms per
schema (llguidance) vs 2.6 ms (xgrammar), mask + advance 0.16 vs 0.09 ms per token; both accepted
every JSON-schema keyword probed (pattern, format, exclusiveMinimum, $ref, oneOf, min/maxItems, const,
patternProperties).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from lmi_core.engine import StructuredOutput
from lmi_core.errors import BadRequestError
from lmi_core.grammars import llguidance_grammar
from lmi_core.reasoning import partial_suffix

CACHE_SIZE = 256  # compiled grammars kept per engine, by grammar text
_SHIFTS = torch.arange(32, dtype=torch.int32)


class GrammarCompiler:
    """An engine's grammar compiler: the llguidance view of its tokenizer (built on first use, about
    a second for a 150k vocabulary) and a fresh compiled matcher per grammar text, copied per request."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: set[int]) -> None:
        self._hf_tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_ids = sorted(eos_ids)
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._compiled: dict[str, Any] = {}
        self._executor: Any = None

    def _lltokenizer(self) -> Any:
        if self._tokenizer is None:
            import llguidance.hf

            self._tokenizer = llguidance.hf.from_tokenizer(
                self._hf_tokenizer, n_vocab=self._vocab_size, eos_token=self._eos_ids or None
            )
        return self._tokenizer

    def allowed(self, constraints: list[TokenConstraint]) -> torch.Tensor:
        """Which tokens each of ``constraints`` allows next: a bool row per constraint (the rows of one
        batch step in one call, computed on llguidance's threads without the GIL)."""
        from llguidance.torch import fill_next_token_bitmask_par

        if self._executor is None:
            from llguidance import LLExecutor

            self._executor = LLExecutor()
        words = (self._vocab_size + 31) // 32
        bitmask = torch.empty((len(constraints), words), dtype=torch.int32)
        matchers = [(c.matcher, i) for i, c in enumerate(constraints)]
        fill_next_token_bitmask_par(self._executor, matchers, bitmask)
        for constraint in constraints:
            constraint.check()
        # One bit per token (bit i of word j: token 32 j + i), unpacked for masked_fill.
        allowed = ((bitmask.unsqueeze(-1) >> _SHIFTS) & 1).flatten(-2).bool()
        return allowed[:, : self._vocab_size]

    def compile(self, constraint: StructuredOutput) -> TokenConstraint:
        """A matcher for ``constraint`` at its start (waiting for ``constraint.starts_after`` first, when
        set); blocking (run it off the event loop)."""
        from llguidance import LLMatcher

        grammar = llguidance_grammar(constraint)
        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is None:
                compiled = LLMatcher(self._lltokenizer(), grammar, log_level=0)
                if compiled.is_error():
                    raise BadRequestError(f"invalid {constraint.kind} constraint: {compiled.get_error()}")
                if len(self._compiled) >= CACHE_SIZE:
                    self._compiled.pop(next(iter(self._compiled)))
                self._compiled[grammar] = compiled
            return TokenConstraint(compiled.deep_copy(), constraint.starts_after)


class TokenConstraint:
    """One sequence's position in its grammar (``GrammarCompiler.allowed`` reads what it allows next);
    advanced by each sampled token. With ``starts_after`` (a reasoning model's end of thinking) it is
    inactive, allowing every token, until that text has appeared in the output: the grammar then
    starts with the token after the one that completed it."""

    def __init__(self, matcher: Any, starts_after: str | None = None) -> None:
        self.matcher = matcher
        self.waiting_for = starts_after or None  # None: active
        self._tail = ""  # the output's end while waiting, as long as a partial ``waiting_for``

    @property
    def active(self) -> bool:
        return self.waiting_for is None

    def accept(self, token: int, text: str) -> None:
        """Advance past ``token``, whose text (before stop-sequence holding) is ``text``."""
        if self.waiting_for is None:
            self.matcher.consume_token(token)
            self.check()
            return
        self._tail += text
        if self.waiting_for in self._tail:
            self.waiting_for, self._tail = None, ""
        else:
            self._tail = self._tail[len(self._tail) - partial_suffix(self._tail, self.waiting_for) :]

    def check(self) -> None:
        if self.matcher.is_error():
            raise RuntimeError(f"grammar matcher failed: {self.matcher.get_error()}")
