"""The worker-side request checks every engine applies once the prompt is tokenized."""

from __future__ import annotations

import pytest

from lmi_core.engine import GenerationRequest, SamplingParams
from lmi_core.errors import BadRequestError
from lmi_core.request_checks import (
    check_logit_bias,
    check_token_ids,
    refuse_unsupported,
    token_budget,
    truncate_prompt,
)


def test_token_budget_clamps_unless_strict_and_names_the_numbers() -> None:
    assert token_budget(10, 64, SamplingParams(max_new_tokens=100)) == 54
    assert token_budget(10, 64, SamplingParams(max_new_tokens=0, strict_max_tokens=True)) == 0
    with pytest.raises(BadRequestError, match=r"64 tokens.*110 \(10 in the prompt, 100") as info:
        token_budget(10, 64, SamplingParams(max_new_tokens=100, strict_max_tokens=True))
    assert info.value.param == "max_tokens"
    with pytest.raises(BadRequestError) as info:
        token_budget(64, 64, SamplingParams())
    assert info.value.param == "inputs"


def test_token_ids_and_logit_bias_must_index_the_vocabulary() -> None:
    check_token_ids([0, 5, 9], 10)
    with pytest.raises(BadRequestError, match=r"token id 10 at prompt\[2\].*size 10"):
        check_token_ids([0, 5, 10], 10)
    with pytest.raises(BadRequestError, match=r"-1 at prompt\[0\]"):
        check_token_ids([-1], 10)
    with pytest.raises(BadRequestError, match=r"12.*size 10") as info:
        check_logit_bias(SamplingParams(logit_bias=[(3, 1.0), (12, -1.0)]), 10)
    assert info.value.param == "logit_bias"


def test_truncate_keeps_the_last_tokens() -> None:
    assert truncate_prompt([1, 2, 3, 4], SamplingParams(truncate=2)) == [3, 4]
    assert truncate_prompt([1, 2], SamplingParams(truncate=5)) == [1, 2]
    assert truncate_prompt([1, 2], SamplingParams()) == [1, 2]


def test_unsupported_fields_are_refused_only_away_from_neutral() -> None:
    refuse_unsupported(SamplingParams(), ["typical_p", "logit_bias"], "x")
    with pytest.raises(BadRequestError, match="typical_p is not supported by the x backend") as info:
        refuse_unsupported(SamplingParams(typical_p=0.5), ["logit_bias", "typical_p"], "x")
    assert info.value.param == "typical_p"


def test_new_request_fields_cross_the_wire() -> None:
    params = SamplingParams(logit_bias=[(3, 1.5)], stop_token_ids=[2], prompt_logprobs=1, truncate=4)
    request = GenerationRequest("r", prompt_ids=[1, 2, 3], params=params)
    # msgpack turns tuples into lists: from_wire gives the pairs back.
    wire = request.to_wire()
    wire["params"]["logit_bias"] = [list(p) for p in wire["params"]["logit_bias"]]
    assert GenerationRequest.from_wire(wire) == request
