"""Constrained decoding in the HF engine, in process: per-row masks, EOS only where the grammar ends,
compile errors, and tools through the chat template."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from lmi_core.engine import (
    Finished,
    GenerationRequest,
    SamplingParams,
    StructuredOutput,
    Token,
    WorkerContext,
)
from lmi_core.errors import BadRequestError
from lmi_hf.engine import HFEngine
from lmi_hf.grammar import TokenConstraint
from lmi_hf.loading import load_model

PHONE = StructuredOutput("regex", r"[0-9]{3}-[0-9]{2}")
SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}, "s": {"enum": ["x", "y"]}},
    "required": ["n", "s"],
    "additionalProperties": False,
}
TOOL_TEMPLATE = (
    "{% for tool in tools or [] %}<tool>{{ tool.function.name }}</tool>\n{% endfor %}"
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content or '' }}"
    "{% for call in m.tool_calls or [] %}"
    "[call {{ call.function.name }} {{ call.function.arguments | tojson }}]"
    "{% endfor %}{% if m.tool_call_id %}[for {{ m.tool_call_id }}]{% endif %}</s>\n{% endfor %}"
    "<|assistant|>\n"
)


@pytest.fixture(scope="module")
def engine(demo_model: Path) -> Iterator[HFEngine]:
    context = WorkerContext(
        model_id=str(demo_model), model_dir=str(demo_model), backend="hf", options={}, max_batch_size=8
    )
    engine = HFEngine(context, *load_model(context))
    yield engine
    engine.shutdown()


async def run(engine: HFEngine, rid: str, **fields: Any) -> tuple[str, Finished]:
    params = fields.pop("params")
    request = GenerationRequest(rid, params=params, **fields)
    texts: list[str] = []
    async for event in engine.generate(request):
        if isinstance(event, Token):
            texts.append(event.text)
        else:
            return "".join(texts), event
    raise AssertionError("no Finished")


async def test_masks_are_per_row_in_a_mixed_batch(engine: HFEngine) -> None:
    free = SamplingParams(max_new_tokens=24, ignore_eos=True)
    alone, _ = await run(engine, "free-alone", prompt="hello world", params=free)
    constrained = SamplingParams(max_new_tokens=100, structured=StructuredOutput("json", json.dumps(SCHEMA)))
    results = await asyncio.gather(
        run(engine, "free-mixed", prompt="hello world", params=free),
        *(run(engine, f"c{i}", prompt=f"record {i}", params=constrained) for i in range(4)),
        run(
            engine,
            "regex",
            prompt="phone",
            params=SamplingParams(max_new_tokens=40, structured=PHONE),
        ),
    )
    assert results[0][0] == alone  # the free row is untouched by its neighbours' masks
    for text, finished in results[1:5]:
        assert finished.finish_reason == "eos_token"
        jsonschema.validate(json.loads(text), SCHEMA)
    assert re.fullmatch(PHONE.spec, results[5][0])


def test_eos_is_allowed_exactly_where_the_grammar_can_end(engine: HFEngine) -> None:
    constraint = engine.grammars.compile(StructuredOutput("regex", "[0-9]{3}"))
    vocab = engine.model.get_output_embeddings().out_features
    for step in range(4):
        allowed = {int(i) for i in torch.nonzero(engine.grammars.allowed([constraint])[0])}
        assert engine.grammars.allowed([constraint]).shape == (1, vocab)
        if step < 3:
            assert allowed and not allowed & engine.eos_ids
            token = min(allowed)
            assert re.fullmatch("[0-9]+", engine.tokenizer.decode([token]))
            constraint.accept(token, engine.tokenizer.decode([token]))
        else:
            assert allowed == engine.eos_ids  # complete: nothing but the end


async def test_ignore_eos_still_ends_where_the_grammar_ends(engine: HFEngine) -> None:
    params = SamplingParams(
        max_new_tokens=50, ignore_eos=True, structured=StructuredOutput("choice", '["yes", "no"]')
    )
    text, finished = await run(engine, "choice", prompt="answer", params=params)
    assert text in ("yes", "no") and finished.finish_reason == "eos_token"


async def test_a_grammar_that_does_not_compile_is_a_bad_request(engine: HFEngine) -> None:
    params = SamplingParams(structured=StructuredOutput("grammar", "start: missing_rule"))
    with pytest.raises(BadRequestError, match="missing_rule"):
        await run(engine, "bad", prompt="x", params=params)


async def test_tools_and_tool_messages_go_through_the_chat_template(engine: HFEngine) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_7",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_7", "content": "sunny"},
    ]
    original = engine.tokenizer.chat_template
    engine.tokenizer.chat_template = TOOL_TEMPLATE
    try:
        _, finished = await run(
            engine, "tools", messages=messages, tools=tools, params=SamplingParams(max_new_tokens=2)
        )
    finally:
        engine.tokenizer.chat_template = original
    assert "<tool>get_weather</tool>" in finished.prompt
    assert '[call get_weather {"city": "Oslo"}]' in finished.prompt and "[for call_7]" in finished.prompt


class _Matcher:
    """A stand-in llguidance matcher that records the tokens the grammar consumed."""

    def __init__(self) -> None:
        self.consumed: list[int] = []

    def consume_token(self, token: int) -> None:
        self.consumed.append(token)

    def is_error(self) -> bool:
        return False


@pytest.mark.parametrize("pieces", [["</think>"], ["</th", "ink>"], list("</think>"), ["a</", "think>"]])
def test_a_deferred_grammar_starts_after_its_marker_however_the_text_is_cut(pieces: list[str]) -> None:
    matcher = _Matcher()
    constraint = TokenConstraint(matcher, starts_after="</think>")
    for token, text in enumerate(["I think ", "<", *pieces]):
        assert not constraint.active
        constraint.accept(token, text)
    assert constraint.active and matcher.consumed == []  # the token that completes it is not the grammar's
    constraint.accept(99, "{")
    assert matcher.consumed == [99]


async def test_a_grammar_after_the_thinking_leaves_the_thinking_free(engine: HFEngine) -> None:
    # The marker is a word the regex does not allow, forced as the first token: it is sampled (the
    # grammar waits), then the answer after it matches the regex.
    marker = " fox"
    (token,) = engine.tokenizer.encode(marker, add_special_tokens=False)
    regex = StructuredOutput("regex", "[0-9]{3}", starts_after=marker)
    params = SamplingParams(max_new_tokens=40, structured=regex, logit_bias=[(token, 100.0)])
    text, finished = await run(engine, "deferred", prompt="think first", params=params)
    assert text.startswith(marker) and re.fullmatch("[0-9]{3}", text[len(marker) :]), text
    assert finished.finish_reason == "eos_token"
    # Constrained from the first token, the same bias cannot place the word.
    params.structured = StructuredOutput("regex", "[0-9]{3}")
    text, _ = await run(engine, "at-once", prompt="think first", params=params)
    assert re.fullmatch("[0-9]{3}", text), text


async def test_a_grammar_whose_marker_never_comes_leaves_the_output_free(engine: HFEngine) -> None:
    free = SamplingParams(max_new_tokens=12, ignore_eos=True)
    waiting = SamplingParams(
        max_new_tokens=12, ignore_eos=True, structured=StructuredOutput("regex", "[0-9]", starts_after="§§")
    )
    alone, _ = await run(engine, "free", prompt="hello world", params=free)
    text, finished = await run(engine, "waiting", prompt="hello world", params=waiting)
    assert text == alone and finished.finish_reason == "length"
