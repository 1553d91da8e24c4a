"""Tool-call parsers: the same calls and content whether the model text comes one character, one token
(the demo tokenizer's pieces) or all at once; and the parser registry with a plugin's parser."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lmi_core import hookimpl
from lmi_core.http.tool_parsers import (
    BUILTIN_PARSERS,
    NamedCallParser,
    Parsed,
    ToolParser,
    join_calls,
    parser_registry,
)
from lmi_core.plugins import new_plugin_manager

WEATHER = '{"city": "Paris", "units": ["C", {"note": "}] \\" ;<tool_call>"}], "days": 3}'

CASES: dict[str, list[tuple[str, str, list[tuple[str, str]]]]] = {
    # parser: [(model text, expected content, expected (name, arguments) calls)]
    "hermes": [
        (
            f'Let me check.<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>\n'
            '<tool_call>{"arguments": {"q": 1}, "name": "search"}</tool_call> Done <tool',
            "Let me check.\n Done <tool",
            [("get_weather", WEATHER), ("search", '{"q": 1}')],
        ),
        ("No tools needed: 1 < 2 and <b>bold</b>.", "No tools needed: 1 < 2 and <b>bold</b>.", []),
        ('<tool_call>{"name": "ping"}</tool_call>', "", [("ping", "{}")]),
    ],
    "llama3_json": [
        (
            f'<|python_tag|>{{"name": "get_weather", "parameters": {WEATHER}}};'
            ' {"name": "f", "parameters": {}}',
            "",
            [("get_weather", WEATHER), ("f", "{}")],
        ),
        (' {"name": "g", "parameters": {"x": null, "y": -1.5e3}}', "", [("g", '{"x": null, "y": -1.5e3}')]),
        ("  Plain answer {not a call}", "  Plain answer {not a call}", []),
    ],
    "mistral": [
        (
            f'Sure [TOOL_CALLS] [{{"name": "get_weather", "arguments": {WEATHER}}},'
            ' {"name": "n", "arguments": 7}]',
            "Sure ",
            [("get_weather", WEATHER), ("n", "7")],
        ),
        ("[TOOL no calls here", "[TOOL no calls here", []),
    ],
    "pythonic": [
        (
            '[get_weather(city="Paris", days=3), search(q=[1, 2], exact=True), noop()]',
            "",
            [
                ("get_weather", '{"city": "Paris", "days": 3}'),
                ("search", '{"q": [1, 2], "exact": true}'),
                ("noop", "{}"),
            ],
        ),
        ('[f(a="]")] and then', "", [("f", '{"a": "]"}')]),
        ("Just text [with brackets]", "Just text [with brackets]", []),
        ("[1, 2, 3]", "[1, 2, 3]", []),
    ],
    "json_array": [
        (
            f'[{{"name":"get_weather","parameters":{WEATHER}}},{{"name":"f","parameters":{{"a":"\\u00e9"}}}}]',
            "",
            [("get_weather", WEATHER), ("f", '{"a":"\\u00e9"}')],
        )
    ],
}


def demo_tokens(text: str, tokenizer: Any) -> list[str]:
    """``text`` cut where the demo tokenizer cuts it (each piece decoded on its own)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, start = [], ""
    for i in range(1, len(ids) + 1):
        decoded = tokenizer.decode(ids[:i])
        pieces.append(decoded[len(start) :])
        start = decoded
    return pieces


def chunkings(text: str, tokenizer: Any) -> Iterator[tuple[str, list[str]]]:
    yield "whole", [text]
    yield "chars", list(text)
    tokens = demo_tokens(text, tokenizer)
    if "".join(tokens) == text:  # the demo vocabulary round-trips this text
        yield "tokens", tokens
    rng = random.Random(len(text))
    for trial in range(3):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 5))) if len(text) > 1 else []
        bounds = [0, *cuts, len(text)]
        yield f"random{trial}", [text[a:b] for a, b in itertools.pairwise(bounds)]


def run(parser: ToolParser, pieces: list[str]) -> tuple[str, list[tuple[str, str]], Parsed]:
    parsed = Parsed()
    for piece in pieces:
        parsed.extend(parser.feed(piece))
    parsed.extend(parser.finish())
    return parsed.content, [(c.name, c.arguments) for c in join_calls(parsed.calls)], parsed


@pytest.fixture(scope="module")
def tokenizer(demo_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_model))


@pytest.mark.parametrize(("name", "case"), [(n, c) for n, cases in CASES.items() for c in cases])
def test_every_chunking_gives_the_same_calls_and_content(
    name: str, case: tuple[str, str, list[tuple[str, str]]], tokenizer: Any
) -> None:
    text, content, calls = case
    for how, pieces in chunkings(text, tokenizer):
        got_content, got_calls, parsed = run(BUILTIN_PARSERS[name](), pieces)
        assert (got_content, got_calls) == (content, calls), how
        for _, arguments in got_calls:
            json.loads(arguments)  # every call's arguments are JSON text
        # Each call is announced once (id and name in its first delta only), with increasing indexes.
        headers = [d for d in parsed.calls if d.id is not None]
        assert [d.index for d in headers] == list(range(len(calls)))
        assert all(d.name is None for d in parsed.calls if d.id is None)


def test_named_call_parser_takes_the_whole_output_as_arguments() -> None:
    for pieces in (['{"a": 1}'], list('{"a": 1}')):
        content, calls, _ = run(NamedCallParser("f"), pieces)
        assert content == "" and calls == [("f", '{"a": 1}')]


class _Echo:
    """A third-party parser: every output is one call to ``echo`` with the text as ``{"text": ...}``."""

    def __init__(self) -> None:
        self.text = ""

    def feed(self, text: str) -> Parsed:
        self.text += text
        return Parsed()

    def finish(self) -> Parsed:
        from lmi_core.http.tool_parsers import CallDelta

        return Parsed(calls=[CallDelta(0, "call_echo", "echo", json.dumps({"text": self.text}))])


class _EchoPlugin:
    @hookimpl
    def register_tool_parsers(self) -> dict[str, Callable[[], ToolParser]]:
        return {"echo": _Echo}


class _ShadowPlugin:
    @hookimpl
    def register_tool_parsers(self) -> dict[str, Callable[[], ToolParser]]:
        return {"hermes": _Echo}


def test_a_plugin_adds_a_parser_through_the_hook_but_cannot_replace_a_built_in_one() -> None:
    pm = new_plugin_manager(load_entry_points=False)
    pm.register(_EchoPlugin())
    registry = parser_registry(pm.hook.register_tool_parsers())
    assert set(BUILTIN_PARSERS) < set(registry)
    _, calls, _ = run(registry["echo"](), ["hi ", "there"])
    assert calls == [("echo", '{"text": "hi there"}')]
    pm.register(_ShadowPlugin())
    with pytest.raises(ValueError, match="built in"):
        parser_registry(pm.hook.register_tool_parsers())
