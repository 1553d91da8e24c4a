"""The hooks of the HF backend. Imports no torch at module level: the server loads this too."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from lmi_core import hookimpl
from lmi_core.backends import BackendSpec
from lmi_core.engine import EngineStats, GenerationEvent, GenerationRequest, WorkerContext

if TYPE_CHECKING:
    from lmi_core.config import ModelConfig
    from lmi_hf.engine import HFEngine

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
        )
    ]


@hookimpl
def resolve_mode(config: ModelConfig) -> str | None:
    return "python" if config.backend == NAME else None


@hookimpl
def validate_config(config: ModelConfig) -> None:
    if config.backend == NAME:
        from lmi_hf.options import validate_hf_options, validate_parallelism

        validate_hf_options(config.options, config.dtype)
        validate_parallelism(config)


@hookimpl
def load_engine(context: WorkerContext) -> HFEngine | None:
    if context.backend != NAME:
        return None
    from lmi_hf.engine import HFEngine, load_model

    if context.mode == "mpi" and context.world_size > 1:
        from lmi_hf.distributed import load_distributed

        return load_distributed(context)
    model, tokenizer = load_model(context)
    return HFEngine(context, model, tokenizer)


def _ours(engine: Any) -> bool:
    # By module, not isinstance: importing lmi_hf.engine would pull torch into other backends' workers.
    return type(engine).__module__.startswith("lmi_hf.")


@hookimpl
def handle_request(engine: Any, request: GenerationRequest) -> AsyncIterator[GenerationEvent] | None:
    return engine.generate(request) if _ours(engine) else None


@hookimpl
def engine_stats(engine: Any) -> EngineStats | None:
    return engine.snapshot() if _ours(engine) else None


@hookimpl
def shutdown_engine(engine: Any) -> None:
    if _ours(engine):
        engine.shutdown()
