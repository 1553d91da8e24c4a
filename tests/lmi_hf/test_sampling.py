"""The HF sampler's logits processors and filters, one parameter at a time, on hand-made logits."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from lmi_core.engine import SamplingParams
from lmi_hf.sampling import make_generator, position_seed, process_logits, select_token

LOGITS = torch.tensor([2.0, 1.0, -1.0, 0.5, 0.0])


def greedy(**params: object) -> SamplingParams:
    return SamplingParams(do_sample=False, **params)  # type: ignore[arg-type]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    out = process_logits(LOGITS, greedy(repetition_penalty=2.0), Counter({2: 1}), prompt_ids=[0], stop_ids=())
    assert out.tolist() == [1.0, 1.0, -2.0, 0.5, 0.0]


def test_frequency_and_presence_penalties_use_output_counts_only() -> None:
    params = greedy(frequency_penalty=0.5, presence_penalty=0.25)
    out = process_logits(LOGITS, params, Counter({1: 2, 3: 1}), prompt_ids=[0], stop_ids=())
    assert out.tolist() == [2.0, 1.0 - 1.0 - 0.25, -1.0, 0.5 - 0.5 - 0.25, 0.0]


def test_logit_bias_is_added_and_changes_the_greedy_choice() -> None:
    token, _, _ = select_token(LOGITS, greedy(logit_bias=[(4, 5.0)]), None)
    assert token == 4
    assert select_token(LOGITS, greedy(), None)[0] == 0


def test_reported_logprob_is_the_models_own_not_the_penalised_one() -> None:
    token, log_prob, _ = select_token(LOGITS, greedy(logit_bias=[(4, 5.0)]), None)
    assert token == 4
    assert log_prob == pytest.approx(float(torch.log_softmax(LOGITS, -1)[4]))


def test_min_tokens_masks_the_stop_tokens_until_reached() -> None:
    params = greedy(min_tokens=2)
    assert select_token(LOGITS, params, None, Counter({3: 1}), stop_ids={0})[0] == 1
    assert select_token(LOGITS, params, None, Counter({3: 2}), stop_ids={0})[0] == 0


def test_min_p_drops_unlikely_tokens() -> None:
    # p(0) = 0.53; min_p 0.5 keeps tokens with p >= 0.265: token 0 alone (p(1) = 0.19).
    params = SamplingParams(do_sample=True, min_p=0.5)
    picks = {select_token(LOGITS, params, make_generator(s))[0] for s in range(40)}
    assert picks == {0}
    assert (
        len({select_token(LOGITS, SamplingParams(do_sample=True), make_generator(s))[0] for s in range(40)})
        > 1
    )


def test_typical_p_keeps_the_most_typical_tokens() -> None:
    params = SamplingParams(do_sample=True, typical_p=0.1)
    picks = {select_token(LOGITS, params, make_generator(s))[0] for s in range(40)}
    assert len(picks) == 1


def test_no_processing_when_nothing_is_set() -> None:
    out = process_logits(LOGITS, greedy(), Counter({1: 3}), prompt_ids=[0], stop_ids={0})
    assert out.tolist() == LOGITS.tolist()


def test_position_seeds_differ_by_position_and_seed() -> None:
    seeds = {position_seed(s, p) for s in range(20) for p in range(50)}
    assert len(seeds) == 1000
    assert all(0 <= s < 2**63 for s in seeds)
    assert position_seed(7, 3) == position_seed(7, 3)
