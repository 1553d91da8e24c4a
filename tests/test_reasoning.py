"""Reasoning parsers: the thinking and the answer of DeepSeek-R1's and Qwen3's real output formats, the
same whatever the cut of the text (property-tested: one character, one token, a tag split across two
deltas, all at once); the thinking switches in chat_template_kwargs; the plugin registry and the
option's check."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmi_core import hookimpl
from lmi_core.config import build_model_config
from lmi_core.errors import ConfigError
from lmi_core.plugins import new_plugin_manager
from lmi_core.reasoning import (
    BUILTIN_PARSERS,
    ReasoningParser,
    ReasoningParserFactory,
    Split,
    ThinkBlockParser,
    model_parser,
    parser_registry,
)

# (model output, reasoning, content), after each model's chat template.
R1_CASES = [
    # DeepSeek-R1's template ends the prompt with "<think>\n": the output starts inside the thinking.
    (
        "Okay, 2 + 2: add them.\nSo 4.\n</think>\n\nThe answer is **4**.",
        "Okay, 2 + 2: add them.\nSo 4.\n",
        "\n\nThe answer is **4**.",
    ),
    # Older R1 checkpoints write the opening tag themselves: dropped.
    ("<think>\nHmm.\n</think>\n\nHi!", "\nHmm.\n", "\n\nHi!"),
    ("  \n<think>x</think>y", "x", "y"),
    # Cut off inside the thinking (max_tokens): no answer.
    ("Let me think about </thi", "Let me think about </thi", ""),
    # Only the first end tag ends the thinking; tags in the answer are answer text.
    ("a < b and </ b> </think>c </think> <think>", "a < b and </ b> ", "c </think> <think>"),
    ("</think>", "", ""),
    ("", "", ""),
    ("<thinking is not the tag>ok</think>done", "<thinking is not the tag>ok", "done"),
]
QWEN3_CASES = [
    # Qwen3 (hybrid, thinking on) writes <think> itself; the answer follows "\n\n".
    (
        "<think>\nThe user greets me. I should reply.\n</think>\n\nHello! How can I help?",
        "\nThe user greets me. I should reply.\n",
        "\n\nHello! How can I help?",
    ),
    # Qwen3-Thinking-2507 / Qwen3.5 templates open <think> in the prompt: only the end is written.
    ("Reasoning here.</think>\n\nAnswer.", "Reasoning here.", "\n\nAnswer."),
    ("<think>\n\n</think>\n\nShort answer.", "\n\n", "\n\nShort answer."),
]
CASES = [("deepseek_r1", *case) for case in R1_CASES] + [("qwen3", *case) for case in QWEN3_CASES]


def parse(parser: ReasoningParser, pieces: list[str]) -> tuple[str, str, list[Split]]:
    splits = [parser.feed(piece) for piece in pieces] + [parser.finish()]
    return "".join(s.reasoning for s in splits), "".join(s.content for s in splits), splits


def cuts(text: str) -> st.SearchStrategy[list[str]]:
    """``text`` cut at any set of positions (empty pieces too: a token that decodes to nothing)."""
    positions = st.lists(st.integers(0, len(text)), max_size=12).map(sorted)
    return positions.map(
        lambda points: [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    )


@pytest.mark.parametrize("whole", [True, False], ids=["whole output", "one character per delta"])
@pytest.mark.parametrize(("name", "text", "reasoning", "content"), CASES)
def test_the_real_formats(name: str, text: str, reasoning: str, content: str, whole: bool) -> None:
    parser = BUILTIN_PARSERS[name]({})
    assert parser is not None
    assert parse(parser, [text] if whole else list(text))[:2] == (reasoning, content)


@given(st.data())
def test_every_cut_of_the_text_gives_the_same_thinking_and_answer(data: st.DataObject) -> None:
    name, text, reasoning, content = data.draw(st.sampled_from(CASES))
    pieces = data.draw(cuts(text))
    parser = BUILTIN_PARSERS[name]({})
    assert parser is not None
    got_reasoning, got_content, splits = parse(parser, pieces)
    assert (got_reasoning, got_content) == (reasoning, content), pieces
    # The thinking comes first: once a piece of answer is out, no more thinking follows.
    answered = [bool(s.content) for s in splits]
    if True in answered:
        assert not any(s.reasoning for s in splits[answered.index(True) + 1 :])


def reference(text: str) -> tuple[str, str]:
    """What ``ThinkBlockParser`` means, on the whole text: a leading ``<think>`` (after whitespace)
    dropped, the thinking up to the first ``</think>``, the answer after it."""
    lead = text.lstrip()
    body = lead[len("<think>") :] if lead.startswith("<think>") else text
    reasoning, _, content = body.partition("</think>")
    return reasoning, content


@given(st.text(alphabet="<>/thinkab \n", max_size=40), st.data())
def test_any_text_parses_as_the_whole_text_means_however_it_is_cut(text: str, data: st.DataObject) -> None:
    assert parse(ThinkBlockParser(), data.draw(cuts(text)))[:2] == reference(text)


@pytest.mark.parametrize(
    ("name", "kwargs", "thinks"),
    [
        ("qwen3", {}, True),
        ("qwen3", {"enable_thinking": True}, True),
        ("qwen3", {"enable_thinking": False}, False),
        ("deepseek_r1", {"enable_thinking": False}, True),  # R1 always thinks
        ("deepseek_v3", {}, False),
        ("deepseek_v3", {"thinking": True}, True),
        ("deepseek_v3", {"enable_thinking": True}, True),
    ],
)
def test_the_thinking_switch_lives_in_chat_template_kwargs(
    name: str, kwargs: dict[str, Any], thinks: bool
) -> None:
    parser = BUILTIN_PARSERS[name](kwargs)
    assert (parser is not None) == thinks
    if parser is not None:
        assert parser.end == "</think>"


class _Harmony:
    """A third-party format: thinking in ``<|analysis|>...<|final|>``."""

    end = "<|final|>"

    def __init__(self) -> None:
        self._inner = ThinkBlockParser("<|analysis|>", "<|final|>")

    def feed(self, text: str) -> Split:
        return self._inner.feed(text)

    def finish(self) -> Split:
        return self._inner.finish()


class _HarmonyPlugin:
    @hookimpl
    def register_reasoning_parsers(self) -> dict[str, ReasoningParserFactory]:
        return {"harmony_like": lambda kwargs: _Harmony()}


class _ShadowPlugin:
    @hookimpl
    def register_reasoning_parsers(self) -> dict[str, ReasoningParserFactory]:
        return {"qwen3": lambda kwargs: _Harmony()}


def test_a_plugin_adds_a_parser_through_the_hook_but_cannot_replace_a_built_in_one() -> None:
    pm = new_plugin_manager(load_entry_points=False)
    pm.register(_HarmonyPlugin())
    registry = parser_registry(pm.hook.register_reasoning_parsers())
    assert set(BUILTIN_PARSERS) < set(registry)
    factory = model_parser({"reasoning_parser": "harmony_like"}, registry)
    assert factory is not None
    parser = factory({})
    assert parser is not None and parse(parser, list("<|analysis|>hm<|final|>ok"))[:2] == ("hm", "ok")
    pm.register(_ShadowPlugin())
    with pytest.raises(ValueError, match="built in"):
        parser_registry(pm.hook.register_reasoning_parsers())


def test_the_option_names_a_known_parser_or_is_a_config_error() -> None:
    registry: Mapping[str, ReasoningParserFactory] = parser_registry([])
    assert model_parser({}, registry) is None
    assert model_parser({"reasoning_parser": "qwen3"}, registry) is BUILTIN_PARSERS["qwen3"]
    with pytest.raises(ConfigError, match=r"option\.reasoning_parser.*deepseek_r1, deepseek_v3, qwen3"):
        model_parser({"reasoning_parser": "qwen"}, registry)


def test_default_chat_template_kwargs_must_be_a_json_object() -> None:
    config = build_model_config(
        {"option.default_chat_template_kwargs": '{"enable_thinking": false}'}, model_dir="/m"
    )
    assert config.options["default_chat_template_kwargs"] == '{"enable_thinking": false}'
    for bad in ("{enable_thinking: false}", "[1]", "true"):
        with pytest.raises(ConfigError, match=r"option\.default_chat_template_kwargs.*a JSON object"):
            build_model_config({"option.default_chat_template_kwargs": bad}, model_dir="/m")
