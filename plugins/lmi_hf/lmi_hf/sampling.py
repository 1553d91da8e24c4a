"""Next-token selection for one sequence: greedy, or temperature / top-k / top-p sampling."""

from __future__ import annotations

import torch

from lmi_core.engine import SamplingParams


def make_generator(seed: int) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


def select_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[int, float, torch.Tensor]:
    """Pick the next token from one row of logits; return (id, its log-prob, all log-probs).

    The reported log-prob is that of the model's own distribution (before temperature and
    filtering), as vLLM reports by default.
    """
    logits = logits.float()
    log_probs = torch.log_softmax(logits, dim=-1)
    if params.greedy:
        token = int(torch.argmax(logits))
        return token, float(log_probs[token]), log_probs
    scores = logits / params.temperature
    if params.top_k > 0 and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= params.top_p
        drop[0] = False
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Sample on CPU with the sequence's own generator: reproducible per seed, whatever the batch.
    token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
    return token, float(log_probs[token]), log_probs
