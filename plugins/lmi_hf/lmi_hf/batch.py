"""The running batch of a continuous-batching decode loop over a HuggingFace causal LM.

Sequences are left-padded in one KV cache. New sequences are prefilled as a group and merged into
the running batch at a step boundary (their caches left-padded to a common length); finished ones
are dropped from the batch dimension and fully padded columns are trimmed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache


class Batch:
    """KV cache, attention mask and last tokens of the sequences being decoded together."""

    def __init__(self, cache: Any, attention_mask: torch.Tensor, last_tokens: torch.Tensor) -> None:
        self.cache = cache
        self.attention_mask = attention_mask  # [B, T]; 0 marks left padding
        self.last_tokens = last_tokens  # [B]

    @property
    def size(self) -> int:
        return int(self.attention_mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.attention_mask.shape[1])

    def set_last_tokens(self, tokens: list[int]) -> None:
        self.last_tokens = torch.tensor(tokens, dtype=torch.long, device=self.attention_mask.device)

    def merge(self, other: Batch) -> None:
        """Append ``other``'s sequences, left-padding the shorter cache to the longer length."""
        length = max(self.length, other.length)
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, length), _left_pad(theirs.keys, length)])
            mine.values = torch.cat([_left_pad(mine.values, length), _left_pad(theirs.values, length)])
        self.attention_mask = torch.cat(
            [_left_pad(self.attention_mask, length, dim=1), _left_pad(other.attention_mask, length, dim=1)]
        )
        self.last_tokens = torch.cat([self.last_tokens, other.last_tokens])

    def keep(self, indices: list[int]) -> None:
        """Keep only the sequences at ``indices`` and trim columns that are padding everywhere."""
        index = torch.tensor(indices, dtype=torch.long, device=self.attention_mask.device)
        self.attention_mask = self.attention_mask[index]
        self.last_tokens = self.last_tokens[index]
        start = int((self.attention_mask.cumsum(dim=1) == 0).sum(dim=1).min())
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        self.attention_mask = self.attention_mask[:, start:]


def _left_pad(tensor: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - dim - 1) + [missing, 0]
    return F.pad(tensor, pad)


@torch.inference_mode()
def prefill(
    model: Any,
    prompts: list[list[int]],
    device: torch.device,
    all_logits: bool = False,
    adapter_names: list[str] | None = None,
    images: dict[str, Any] | None = None,
) -> tuple[Batch, torch.Tensor]:
    """Run the prompts as one left-padded batch; return the batch and each row's last logits [B, V]
    or, with ``all_logits`` (prompt log-probs), every position's [B, T, V]. ``adapter_names``: each
    row's LoRA adapter for a PEFT model (``lmi_hf.adapters``); None: the model as it is. ``images``:
    an image-text-to-text model's image inputs for these prompts (``pixel_values``...)."""
    length = max(len(p) for p in prompts)
    pad = 0
    input_ids = torch.tensor([[pad] * (length - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=DynamicCache(config=model.config),
        use_cache=True,
        logits_to_keep=0 if all_logits else 1,  # 0: all positions
        **_adapters(adapter_names),
        **(images or {}),
    )
    batch = Batch(out.past_key_values, mask, input_ids[:, -1])
    return batch, out.logits if all_logits else out.logits[:, -1, :]


@torch.inference_mode()
def decode(model: Any, batch: Batch, adapter_names: list[str] | None = None) -> torch.Tensor:
    """One decode step for every sequence in ``batch``; returns the next-token logits [B, V]."""
    ones = torch.ones((batch.size, 1), dtype=batch.attention_mask.dtype, device=batch.attention_mask.device)
    batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=1)
    positions = batch.attention_mask.sum(dim=1, keepdim=True) - 1
    out = model(
        input_ids=batch.last_tokens[:, None],
        attention_mask=batch.attention_mask,
        position_ids=positions,
        past_key_values=batch.cache,
        use_cache=True,
        **_adapters(adapter_names),
    )
    batch.cache = out.past_key_values
    logits: torch.Tensor = out.logits[:, -1, :]
    return logits


def _adapters(names: list[str] | None) -> dict[str, Any]:
    return {} if names is None else {"adapter_names": names}
