"""One constraint, one grammar: a ``StructuredOutput`` as llguidance grammar text, and its check.

The server checks every constraint with the same compiler the HF engine decodes with, so an invalid
schema, regex or grammar is a 400 before the request is queued; both sides derive the grammar from
``llguidance_grammar`` alone, so what is checked is what is decoded. Results are cached by the
constraint's text (a client sends the same schema again and again). llguidance is imported on first
use: this module is imported by workers whose engine has no use for it (vLLM, TensorRT-LLM).
"""

from __future__ import annotations

import functools
import json

from lmi_core.engine import StructuredOutput


def llguidance_grammar(constraint: StructuredOutput) -> str:
    """The llguidance grammar of ``constraint``; ValueError for a spec that is not even parseable."""
    return _grammar(constraint.kind, constraint.spec, constraint.compact_json)


@functools.lru_cache(maxsize=256)
def _grammar(kind: str, spec: str, compact_json: bool) -> str:
    from llguidance import LLMatcher

    if kind == "json":
        # whitespace_flexible=False: separators exactly "," and ":" (RFC 8259 JSON either way).
        return str(
            LLMatcher.grammar_from_json_schema(spec, defaults={"whitespace_flexible": not compact_json})
        )
    if kind == "regex":
        return str(LLMatcher.grammar_from_regex(spec))
    if kind == "choice":
        choices = json.loads(spec)
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise ValueError("choice must be a non-empty list of strings")
        # JSON string literals are Lark string literals (llguidance's own grammar_from does the same).
        return str(LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices)))
    if kind == "grammar":
        from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark  # Lark passes; GBNF is translated

        try:
            lark = any_to_lark(spec)
        except GbnfToLarkError as exc:  # neither Lark nor GBNF ("x"): was a 500 on every route
            raise ValueError(f"not a GBNF grammar: {exc}") from None
        return str(LLMatcher.grammar_from_lark(lark))
    raise ValueError(f"unknown constraint kind {kind!r}")


def grammar_error(constraint: StructuredOutput) -> str | None:
    """The compiler's message if ``constraint`` does not compile, else None."""
    return _error(constraint.kind, constraint.spec, constraint.compact_json)


@functools.lru_cache(maxsize=1024)
def _error(kind: str, spec: str, compact_json: bool) -> str | None:
    from llguidance import LLMatcher

    try:
        grammar = _grammar(kind, spec, compact_json)
    except (ValueError, TypeError) as exc:
        return str(exc)
    message = str(LLMatcher.validate_grammar(grammar))
    return message or None
