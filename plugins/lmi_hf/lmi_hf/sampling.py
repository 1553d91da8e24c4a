"""Next-token selection for one sequence: logits processors (penalties, bias, min_tokens), then
greedy, or temperature / top-k / top-p / min-p / typical-p sampling.

The processors follow vLLM's (and OpenAI's) definitions, so that every backend gives one answer:
``repetition_penalty`` divides positive and multiplies negative logits of tokens seen in the prompt or
output; ``frequency_penalty`` and ``presence_penalty`` subtract ``count`` and ``count > 0`` of the output
tokens; ``logit_bias`` is added; ``min_tokens`` masks the stop tokens. A request that sets none of them
pays nothing for them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection

import torch

from lmi_core.engine import SamplingParams


def make_generator(seed: int) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


def position_seed(seed: int, position: int) -> int:
    """The sampler's seed for output token ``position`` of a request seeded with ``seed``.

    One seed per position instead of one generator stream per request: a request resumed at token
    ``k`` on another worker (stream migration) draws exactly what the first worker would have drawn,
    with no need to replay how much randomness the earlier tokens consumed. splitmix64's mixing, so
    neighbouring positions and seeds get unrelated streams; ``manual_seed`` costs about 1 µs.
    """
    z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def needs_processing(params: SamplingParams) -> bool:
    return bool(
        params.repetition_penalty != 1.0
        or params.frequency_penalty
        or params.presence_penalty
        or params.logit_bias
        or params.min_tokens
    )


def process_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    output_counts: Counter[int],
    prompt_ids: Collection[int],
    stop_ids: Collection[int],
) -> torch.Tensor:
    """``logits`` (one row, float) after the penalties, the bias and the min_tokens mask; a new tensor."""
    scores = logits.clone()
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(
            sorted(set(prompt_ids) | set(output_counts)), dtype=torch.long, device=scores.device
        )
        if seen.numel():
            values = scores[seen]
            penalty = params.repetition_penalty
            scores[seen] = torch.where(values > 0, values / penalty, values * penalty)
    if (params.frequency_penalty or params.presence_penalty) and output_counts:
        ids = torch.tensor(list(output_counts), dtype=torch.long, device=scores.device)
        counts = torch.tensor(list(output_counts.values()), dtype=scores.dtype, device=scores.device)
        scores[ids] -= params.frequency_penalty * counts + params.presence_penalty
    for token, bias in params.logit_bias:
        scores[token] += bias
    if params.min_tokens and sum(output_counts.values()) < params.min_tokens and stop_ids:
        scores[torch.tensor(sorted(stop_ids), dtype=torch.long, device=scores.device)] = float("-inf")
    return scores


def _filter(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled ``scores`` with the tokens that top-k, top-p, min-p and typical-p drop at -inf."""
    if params.top_k > 0 and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        drop[0] = False
        scores = scores.scatter(0, order[drop], float("-inf"))
    if params.min_p > 0.0:
        probs = torch.softmax(scores, dim=-1)
        scores = scores.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if params.typical_p < 1.0:
        # HF's TypicalLogitsWarper: keep the tokens whose surprise is closest to the entropy, up to
        # typical_p of the mass (at least one).
        log_probs = torch.log_softmax(scores, dim=-1)
        probs = log_probs.exp()
        entropy = -torch.nansum(probs * log_probs)
        shifted = (-log_probs - entropy).abs()
        order = torch.argsort(shifted)
        cumulative = probs[order].cumsum(dim=-1)
        keep = int((cumulative < params.typical_p).sum()) + 1
        scores = scores.scatter(0, order[keep:], float("-inf"))
    return scores


def select_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    output_counts: Counter[int] | None = None,
    prompt_ids: Collection[int] = (),
    stop_ids: Collection[int] = (),
) -> tuple[int, float, torch.Tensor]:
    """Pick the next token from one row of logits; return (id, its log-prob, all log-probs).

    The reported log-prob is that of the model's own distribution (before penalties, temperature and
    filtering), as vLLM reports by default. ``stop_ids``: the tokens ``min_tokens`` holds back.
    """
    logits = logits.float()
    log_probs = torch.log_softmax(logits, dim=-1)
    scores = logits
    if needs_processing(params):
        scores = process_logits(logits, params, output_counts or Counter(), prompt_ids, stop_ids)
    if params.greedy:
        token = int(torch.argmax(scores))
        return token, float(log_probs[token]), log_probs
    assert generator is not None, "a sampled request has its generator"
    probs = torch.softmax(_filter(scores / params.temperature, params), dim=-1)
    # Sample on CPU with the sequence's own generator: reproducible per seed, whatever the batch.
    token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
    return token, float(log_probs[token]), log_probs
