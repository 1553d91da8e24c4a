"""The lmi hook implementations of the TensorRT-LLM backend (entry point ``trtllm`` in group ``lmi``).

Server-side hooks never import TensorRT-LLM; ``load_engine`` acts only on ``backend == "trtllm"``, and
the engines it returns are ``lmi_core.Engine``s that lmi-core's built-in worker hooks drive.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmi_core import BackendSpec, WorkerContext, hookimpl
from lmi_core.option_values import importable
from lmi_trtllm.engine import FollowerEngine, TrtllmEngine, load
from lmi_trtllm.options import BACKEND, check_config

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
            default_mode="mpi",  # one process per GPU rank: lmi's MPI mode starts them
            rolling_batch=(BACKEND,),
            auto_priority=AUTO_PRIORITY if importable("tensorrt_llm") else AUTO_PRIORITY_NOT_INSTALLED,
            description="TensorRT-LLM's LLM API across an MPI job (pip install tensorrt-llm, docs/trtllm.md)",
        )
    ]


@hookimpl
def validate_config(config: ModelConfig) -> None:
    """Check selection, parallelism and ``option.*`` keys for the trtllm backend; raise ``ConfigError``."""
    if config.backend == BACKEND:
        check_config(config)


@hookimpl
def load_engine(context: WorkerContext) -> TrtllmEngine | FollowerEngine | None:
    """Build this rank's part of the engine (runs in a worker thread; blocks until ready)."""
    return load(context) if context.backend == BACKEND else None
