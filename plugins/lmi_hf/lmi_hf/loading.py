"""Loading a model and its tokenizer for a worker, on its device: CPU, one GPU, several GPUs, or one
tensor-parallel shard. Returns plain transformers objects; ``HFEngine`` serves a causal LM,
``HFPoolingEngine`` an encoder, a decoder's base model or a cross-encoder.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from lmi_core.engine import WorkerContext

logger = logging.getLogger(__name__)


def load_model(context: WorkerContext, tensor_parallel: bool = False) -> tuple[Any, Any]:
    """Load tokenizer and model for ``context`` on its device (CPU, one GPU, or several GPUs).

    ``tensor_parallel``: this process is one rank of an initialized ``torch.distributed`` group and
    loads only its shard (the model's own ``tp_plan``).
    """
    from transformers import AutoModelForCausalLM

    return load_with(AutoModelForCausalLM, context, tensor_parallel)


def load_with(model_class: Any, context: WorkerContext, tensor_parallel: bool = False) -> tuple[Any, Any]:
    """Load tokenizer and model through ``model_class`` (an ``AutoModel*``), as ``load_model`` says."""
    from transformers import AutoTokenizer

    options = context.options
    started = time.monotonic()
    trust = context.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(context.model_id, trust_remote_code=trust)
    kwargs: dict[str, Any] = {"trust_remote_code": trust}
    dtype = context.dtype
    if dtype and dtype != "auto":
        kwargs["dtype"] = _DTYPES[dtype]
    elif context.device == "cpu":
        kwargs["dtype"] = torch.float32
    if tensor_parallel:
        from transformers.distributed.configuration_utils import DistributedConfig

        # Places each shard itself (on LOCAL_RANK's GPU): exclusive with device_map.
        kwargs["distributed_config"] = DistributedConfig(tp_plan="auto")
    elif context.device == "cuda" and torch.cuda.is_available():
        kwargs["device_map"] = options.get("device_map") or (
            "auto" if torch.cuda.device_count() > 1 else "cuda"
        )
    if options.get("attn_implementation"):
        kwargs["attn_implementation"] = options["attn_implementation"]
    model = model_class.from_pretrained(context.model_id, **kwargs)
    model.eval()
    logger.info("loaded %s in %.1f s (%s)", context.model_id, time.monotonic() - started, kwargs)
    return model, tokenizer


_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
