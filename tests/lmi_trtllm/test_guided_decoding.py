"""Output constraints as TensorRT-LLM guided decoding (pure conversion: TensorRT-LLM cannot run here)."""

from __future__ import annotations

import json
import re

import pytest

from lmi_core.engine import SamplingParams, StructuredOutput
from lmi_core.errors import BadRequestError, ConfigError
from lmi_core.grammars import grammar_error
from lmi_trtllm.convert import guided_decoding_kwargs, sampling_kwargs
from lmi_trtllm.options import parse_options

CHOICES = ["yes", "no (really)", "a.b*c", "ünï"]


@pytest.mark.parametrize(
    ("constraint", "expected"),
    [
        (StructuredOutput("json", '{"type": "object"}'), {"json": '{"type": "object"}'}),
        (StructuredOutput("regex", "[0-9]+"), {"regex": "[0-9]+"}),
        (StructuredOutput("grammar", 'root ::= "a"'), {"grammar": 'root ::= "a"'}),
    ],
)
def test_constraints_map_to_guided_decoding_params(
    constraint: StructuredOutput, expected: dict[str, str]
) -> None:
    assert guided_decoding_kwargs(constraint) == expected
    assert sampling_kwargs(SamplingParams(structured=constraint))["guided_decoding"] == expected


def test_a_choice_becomes_a_regex_matching_exactly_the_choices() -> None:
    regex = guided_decoding_kwargs(StructuredOutput("choice", json.dumps(CHOICES)))["regex"]
    assert all(re.fullmatch(regex, choice) for choice in CHOICES)
    assert not any(re.fullmatch(regex, other) for other in ["yes!", "no", "aXb*c", "a.bbc", ""])
    assert grammar_error(StructuredOutput("regex", regex)) is None  # and llguidance compiles it


def test_unconstrained_requests_have_no_guided_decoding() -> None:
    assert "guided_decoding" not in sampling_kwargs(SamplingParams())


def test_guided_decoding_backend_option() -> None:
    assert parse_options({"guided_decoding_backend": "xgrammar"}).llm_args == {
        "guided_decoding_backend": "xgrammar"
    }
    with pytest.raises(ConfigError, match="llguidance or xgrammar"):
        parse_options({"guided_decoding_backend": "outlines"})


def test_a_constraint_after_the_thinking_is_refused() -> None:
    # TensorRT-LLM's guided decoding starts at the first token: it would constrain the thinking.
    constraint = StructuredOutput("json", '{"type": "object"}', starts_after="</think>")
    with pytest.raises(BadRequestError, match="after the thinking"):
        sampling_kwargs(SamplingParams(structured=constraint))
