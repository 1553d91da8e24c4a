"""The hooks of the HF backend. Imports no torch at module level: the server loads this too.

The loaded ``HFEngine`` is an ``lmi_core.Engine``: lmi-core's built-in worker hooks run its requests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmi_core import BackendSpec, WorkerContext, hookimpl
from lmi_core.pooling import pooling_settings

if TYPE_CHECKING:
    from lmi_core.config import ModelConfig
    from lmi_hf.engine import HFEngine
    from lmi_hf.pooling import HFPoolingEngine

NAME = "hf"


@hookimpl
def register_backends() -> list[BackendSpec]:
    return [
        BackendSpec(
            name=NAME,
            default_mode="python",
            rolling_batch=("disable", "hf", "accelerate", "huggingface"),
            auto_priority=90,
            description="HuggingFace transformers + accelerate, continuous batching",
            aliases=("huggingface", "accelerate"),
            resumes_streams=True,
        )
    ]


@hookimpl
def validate_config(config: ModelConfig) -> None:
    if config.backend == NAME:
        from lmi_hf.options import validate_hf_options, validate_parallelism

        validate_hf_options(config.options, config.dtype)
        validate_parallelism(config)


@hookimpl
def load_engine(context: WorkerContext) -> HFEngine | HFPoolingEngine | None:
    if context.backend != NAME:
        return None
    if not pooling_settings(context.options).generates:
        from lmi_hf.pooling import load_pooling_engine

        return load_pooling_engine(context)
    from lmi_hf.engine import HFEngine

    if context.mode == "mpi" and context.world_size > 1:
        from lmi_hf.distributed import load_distributed

        return load_distributed(context)
    from lmi_hf.vision import load_generator

    model, tokenizer, images = load_generator(context)
    return HFEngine(context, model, tokenizer, images=images)
