"""Prompt log-probs (OpenAI ``echo`` with ``logprobs``, vLLM ``prompt_logprobs``) from prefill logits."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmi_core.engine import PromptLogprob


def prompt_logprobs(
    logits: torch.Tensor, ids: list[int], top_n: int, decode: Callable[[int], str]
) -> list[PromptLogprob]:
    """Each prompt token's log-prob given the tokens before it, its rank and ``top_n`` alternatives.

    ``logits``: the [T, V] prefill logits of one left-padded row; its last ``len(ids)`` positions are
    the prompt's, and position ``j`` predicts token ``j + 1``. The first token has nothing before it:
    no log-prob (None, as vLLM and OpenAI give).
    """
    rows = logits[logits.shape[0] - len(ids) : -1].float()
    log_probs = torch.log_softmax(rows, dim=-1)  # [len(ids) - 1, V]
    targets = torch.tensor(ids[1:], dtype=torch.long, device=log_probs.device)
    own = log_probs.gather(1, targets[:, None])[:, 0]
    # Rank 1 = most likely; ties count in the token's favour, as vLLM's rank does.
    ranks = (log_probs > own[:, None]).sum(dim=1) + 1
    top_values, top_ids = (
        torch.topk(log_probs, top_n, dim=1) if top_n > 0 else (torch.empty(0), torch.empty(0))
    )
    out: list[PromptLogprob] = [(ids[0], decode(ids[0]), None, 0, [])]
    own_list, rank_list = own.tolist(), ranks.tolist()
    for j, token in enumerate(ids[1:]):
        top = []
        if top_n > 0:
            top = [
                (int(i), decode(int(i)), float(v))
                for i, v in zip(top_ids[j].tolist(), top_values[j].tolist(), strict=True)
            ]
        out.append((token, decode(token), float(own_list[j]), int(rank_list[j]), top))
    return out
