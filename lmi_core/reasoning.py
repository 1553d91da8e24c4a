"""Reasoning parsers: a reasoning model's output text in, its thinking and its answer apart.

Invariant: as with the tool-call parsers, what a parser returns depends only on the concatenation of
what it was fed, never on how the text was cut (one character, one token, a tag split across two
deltas, all at once): the reasoning pieces joined and the content pieces joined equal what parsing
the whole text at once gives. Text that may be the start of a tag is held back until it is not.

A parser is chosen per model (``option.reasoning_parser``) and made per request by a factory that
gets the request's ``chat_template_kwargs`` (the model's ``option.default_chat_template_kwargs`` with
the request's over them), because that is where a model's thinking switch lives. The factory returns
None when that request's output has no thinking (Qwen3 with ``enable_thinking`` false: its template
closes an empty block in the prompt): the output is all answer and the server does no work per token.

Built in, after the formats vLLM's parsers of the same names read:

``deepseek_r1``  the output begins inside the thinking (DeepSeek-R1's template opens ``<think>`` in the
                 prompt; older R1 checkpoints write it themselves, and a leading one is dropped);
                 the thinking ends at the first ``</think>``; an output cut off before it is all
                 thinking.
``qwen3``        the same format (Qwen3 writes ``<think>`` itself; Qwen3-Thinking-2507 and Qwen3.5
                 templates open it in the prompt) unless ``enable_thinking`` is false.
``deepseek_v3``  DeepSeek-V3.1/V3.2: the same format when ``thinking`` (or ``enable_thinking``) is
                 true; its template thinks only when asked, so by default the output is all answer.

A plugin adds more with the ``register_reasoning_parsers`` hook. The text helpers every streaming
parser needs (``partial_suffix``, ``merge_parsers``) are here too, below the tool-call parsers that
share them. Standard library only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from lmi_core.errors import ConfigError

OPTION = "reasoning_parser"
F = TypeVar("F")


@dataclass
class Split:
    """What one feed produced: thinking text and answer text (either may be empty)."""

    reasoning: str = ""
    content: str = ""


class ReasoningParser(Protocol):
    """One output's parser: fed the output text as it comes, it says which part is thinking."""

    # The text that ends the thinking: a constraint on the output (structured output, a tool_choice
    # that forces a call) applies to what follows it, so the thinking stays free.
    end: str

    def feed(self, text: str) -> Split: ...

    def finish(self) -> Split: ...  # the end of the output: whatever was held back


# A request's parser from its chat_template_kwargs; None: that request's output has no thinking.
ReasoningParserFactory = Callable[[Mapping[str, Any]], ReasoningParser | None]


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``marker`` (held back: the
    next delta may complete the marker). Only where the marker's first character occurs: most deltas
    have none (0.7 instead of 2.1 µs for a one-word delta, measured on the shared 2-core machine)."""
    at = text.find(marker[0], max(0, len(text) - len(marker) + 1))
    while at >= 0:
        if marker.startswith(text[at:]):
            return len(text) - at
        at = text.find(marker[0], at + 1)
    return 0


class ThinkBlockParser:
    """An output that begins inside the thinking, which ends at the first ``end``: everything before it
    is reasoning, everything after it the answer. A ``start`` tag at the very beginning (after
    whitespace) is dropped: a model whose template opens the block in the prompt does not write it, a
    model whose template does not writes it first."""

    def __init__(self, start: str = "<think>", end: str = "</think>") -> None:
        self.start = start
        self.end = end
        self._head: str | None = ""  # the output's beginning while it may be the start tag; None: decided
        self._held = ""  # the end of the thinking so far that may begin ``end``
        self._answering = False

    def feed(self, text: str) -> Split:
        if self._answering:  # after the thinking: the common case, no work
            return Split(content=text)
        if self._head is not None:
            self._head += text
            lead = self._head.lstrip()
            if len(lead) < len(self.start) and self.start.startswith(lead):
                return Split()  # still whitespace, or a prefix of the start tag
            text = lead[len(self.start) :] if lead.startswith(self.start) else self._head
            self._head = None
        return self._think(text)

    def _think(self, text: str) -> Split:
        buffer = self._held + text
        at = buffer.find(self.end)
        if at >= 0:
            self._held, self._answering = "", True
            return Split(reasoning=buffer[:at], content=buffer[at + len(self.end) :])
        cut = len(buffer) - partial_suffix(buffer, self.end)
        self._held = buffer[cut:]
        return Split(reasoning=buffer[:cut])

    def finish(self) -> Split:
        """The held text is thinking: an output cut off inside the thinking has no answer."""
        held = (self._head or "") + self._held
        self._head, self._held = None, ""
        return Split(reasoning=held)


def _switch(default: bool, *names: str) -> ReasoningParserFactory:
    """A ``<think>`` parser for requests whose ``chat_template_kwargs`` turn the thinking on (any of
    ``names`` true; ``default`` when none is given); none for the others (their template closes the
    thinking in the prompt, or opens none)."""

    def factory(kwargs: Mapping[str, Any]) -> ReasoningParser | None:
        given = [bool(kwargs[name]) for name in names if name in kwargs]
        return ThinkBlockParser() if (any(given) if given else default) else None

    return factory


BUILTIN_PARSERS: dict[str, ReasoningParserFactory] = {
    "deepseek_r1": lambda kwargs: ThinkBlockParser(),
    "qwen3": _switch(True, "enable_thinking"),
    # vLLM's deepseek_v3 reads both switches (DeepSeek's templates name it thinking).
    "deepseek_v3": _switch(False, "thinking", "enable_thinking"),
}


def merge_parsers(
    kind: str, builtin: Mapping[str, F], plugin_parsers: Iterable[Mapping[str, F]]
) -> dict[str, F]:
    """``builtin`` parsers and those plugins register (a ``register_*_parsers`` hook's results); a
    plugin may not replace a built-in one (a ``ValueError`` naming ``kind`` and the name)."""
    registry = dict(builtin)
    for parsers in plugin_parsers:
        for name, factory in parsers.items():
            if name in builtin:
                raise ValueError(f"{kind} {name!r} is built in; a plugin cannot replace it")
            registry[name] = factory
    return registry


def parser_registry(
    plugin_parsers: Iterable[Mapping[str, ReasoningParserFactory]],
) -> dict[str, ReasoningParserFactory]:
    """The built-in parsers and those plugins register (``register_reasoning_parsers``)."""
    return merge_parsers("reasoning parser", BUILTIN_PARSERS, plugin_parsers)


def model_parser(
    options: Mapping[str, Any], registry: Mapping[str, ReasoningParserFactory]
) -> ReasoningParserFactory | None:
    """The factory ``option.reasoning_parser`` names (None when unset); a ``ConfigError`` naming the
    key for a name no parser has."""
    name = options.get(OPTION)
    if name is None:
        return None
    try:
        return registry[str(name)]
    except KeyError:
        raise ConfigError(f"option.{OPTION}", name, f"one of {', '.join(sorted(registry))}") from None
