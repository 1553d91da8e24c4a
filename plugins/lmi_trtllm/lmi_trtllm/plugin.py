"""The lmi hook implementations of the TensorRT-LLM backend (entry point ``trtllm`` in group ``lmi``).

Server-side hooks never import TensorRT-LLM; worker-side hooks act only on ``backend == "trtllm"``
and on engines this plugin built, so they coexist with other backends' hooks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from lmi_core import hookimpl
from lmi_core.backends import BackendSpec
from lmi_core.engine import EngineStats, GenerationEvent, GenerationRequest, WorkerContext
from lmi_trtllm.engine import FollowerEngine, TrtllmEngine, load
from lmi_trtllm.options import BACKEND, check_config, tensorrt_llm_importable

if TYPE_CHECKING:
    from lmi_core.config import ModelConfig

# Between vllm (10) and hf (90), as DJL's auto order: vllm, trtllm, hf.
AUTO_PRIORITY = 20
# Without TensorRT-LLM the backend stays selectable by name but is auto's last choice (and
# validate_config refuses it there): naming it explicitly must still reach the install message.
AUTO_PRIORITY_NOT_INSTALLED = 10_000


@hookimpl
def register_backends() -> list[BackendSpec]:
    """The ``trtllm`` backend (``option.rolling_batch=trtllm`` or ``option.backend=trtllm``)."""
    return [
        BackendSpec(
            name=BACKEND,
            default_mode="mpi",
            rolling_batch=(BACKEND,),
            auto_priority=AUTO_PRIORITY if tensorrt_llm_importable() else AUTO_PRIORITY_NOT_INSTALLED,
            description="TensorRT-LLM's LLM API across an MPI job (pip install tensorrt-llm, docs/trtllm.md)",
        )
    ]


@hookimpl
def resolve_mode(config: ModelConfig) -> str | None:
    """TensorRT-LLM runs one process per GPU rank: lmi's MPI mode starts them."""
    return "mpi" if config.backend == BACKEND else None


@hookimpl
def validate_config(config: ModelConfig) -> None:
    """Check selection, parallelism and ``option.*`` keys for the trtllm backend; raise ``ConfigError``."""
    if config.backend == BACKEND:
        check_config(config)


@hookimpl
def load_engine(context: WorkerContext) -> TrtllmEngine | FollowerEngine | None:
    """Build this rank's part of the engine (runs in a worker thread; blocks until ready)."""
    return load(context) if context.backend == BACKEND else None


@hookimpl
def handle_request(engine: Any, request: GenerationRequest) -> AsyncIterator[GenerationEvent] | None:
    """Stream ``request`` on rank 0; finish at once on the other ranks."""
    if not isinstance(engine, (TrtllmEngine, FollowerEngine)):
        return None
    return engine.generate(request)


@hookimpl
def engine_stats(engine: Any) -> EngineStats | None:
    """Request and token counters; raises when the engine (or this rank's worker loop) has stopped."""
    if not isinstance(engine, (TrtllmEngine, FollowerEngine)):
        return None
    return engine.stats()


@hookimpl
def shutdown_engine(engine: Any) -> None:
    """Shut TensorRT-LLM down (``LLM.shutdown`` on rank 0)."""
    if isinstance(engine, (TrtllmEngine, FollowerEngine)):
        engine.shutdown()
