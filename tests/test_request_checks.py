"""The request checks every engine applies around tokenizing a prompt, and the server before it."""

from __future__ import annotations

from typing import Any

import pytest

from lmi_core.engine import GenerationRequest, SamplingParams
from lmi_core.errors import BadRequestError
from lmi_core.request_checks import (
    NORMALIZER_SHRINK,
    check_logit_bias,
    check_prompt_bytes,
    check_token_ids,
    max_token_bytes,
    refuse_unfit_prompt,
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


# -- prompt length before tokenizing ------------------------------------------------------------------

BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def spec(model: dict[str, Any], normalizer: Any = None, pre_tokenizer: Any = BYTE_LEVEL) -> dict[str, Any]:
    """A ``tokenizer.json`` with a vocabulary whose longest piece is 5 bytes, and a 9-byte added token."""
    return {
        "model": model,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "added_tokens": [{"content": "<|user|>"}, {"content": "<|assist|>"}],
    }


LLAMA2_SPACE = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
BPE = {"type": "BPE", "vocab": {"a": 0, "Ġabcd": 1, "<0x0A>": 2}, "byte_fallback": False}


@pytest.mark.parametrize(
    ("tokenizer", "bound"),
    [
        (spec(BPE), 10),  # byte-level BPE (GPT-2, Llama 3, Qwen): "<|assist|>" is the longest
        (spec({**BPE, "byte_fallback": True}, pre_tokenizer=None), 10),  # SentencePiece BPE (Llama 2)
        (
            spec(
                {**BPE, "byte_fallback": True},
                {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, LLAMA2_SPACE]},
                None,
            ),
            10,
        ),
        (spec(BPE, {"type": "NFC"}), 10 * NORMALIZER_SHRINK),  # Qwen 2: NFC may shrink the text
        (spec({"type": "Unigram", "vocab": [["▁abcd", -1.0]], "byte_fallback": True}, None, None), 10),
        (spec({**BPE, "byte_fallback": False}, pre_tokenizer=None), None),  # unknown text: one fused <unk>
        (spec({"type": "WordPiece", "vocab": {"a": 0}}), None),  # a whole unknown word: one [UNK]
        (spec(BPE, pre_tokenizer={"type": "Whitespace"}), None),  # whitespace dropped
        (spec(BPE, pre_tokenizer={"type": "Split", "behavior": "Removed"}), None),
        (spec(BPE, {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}), None),  # T5
        (spec(BPE, {"type": "Precompiled", "precompiled_charsmap": ""}), None),
        (spec(BPE, {"type": "BertNormalizer"}), None),
    ],
)
def test_the_longest_token_in_bytes_only_where_it_bounds_the_token_count(
    tokenizer: dict[str, Any], bound: int | None
) -> None:
    assert max_token_bytes(tokenizer) == bound


def test_a_prompt_is_refused_by_its_size_only_when_it_cannot_fit() -> None:
    check_prompt_bytes("x" * 40, 10, 4, 8, "inputs")  # 40 bytes: at least 4 tokens, and 4 fit
    with pytest.raises(BadRequestError, match=r"at least 5 tokens; at most 4 fit .*context is 8") as info:
        check_prompt_bytes("x" * 41, 10, 4, 8, "messages")
    assert info.value.param == "messages"
    with pytest.raises(BadRequestError, match="at least 5 tokens"):  # 14 characters, 42 bytes
        check_prompt_bytes("é" * 14 + "x" * 14, 10, 4, 8, "inputs")
    check_prompt_bytes("x" * 10**6, None, 4, 8, "inputs")  # no bound known: the engine counts


def test_the_server_counts_token_ids_bounds_text_and_leaves_chat_and_truncate_to_the_engine() -> None:
    huge = "x" * 1000
    with pytest.raises(BadRequestError, match="the prompt has 5 tokens; at most 4 fit"):
        refuse_unfit_prompt(GenerationRequest("r", prompt_ids=[1] * 5), 4, None, 8)
    with pytest.raises(BadRequestError, match="at least 100 tokens"):
        refuse_unfit_prompt(GenerationRequest("r", huge), 4, 10, 8)
    refuse_unfit_prompt(GenerationRequest("r", huge), 4, None, 8)
    refuse_unfit_prompt(GenerationRequest("r", messages=[{"role": "user", "content": huge}]), 4, 10, 8)
    refuse_unfit_prompt(GenerationRequest("r", huge, params=SamplingParams(truncate=2)), 4, 10, 8)
