"""The hooks an lmi plugin may implement (pluggy project name ``lmi``).

Server-side hooks run in the HTTP server process; worker-side hooks run inside a worker process.
Built-in behaviour is written as plugins on these same hooks: the launchers of both modes
(``lmi_core.launch.launchers``) and the worker hooks that drive any ``Engine``
(``lmi_core.worker.engine_hooks``, ``trylast``), so a backend plugin implements
``register_backends`` and ``load_engine`` and may override the rest.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from lmi_core.backends import BackendSpec
    from lmi_core.config import ModelConfig
    from lmi_core.engine import (
        Engine,
        EngineStats,
        GenerationEvent,
        GenerationRequest,
        LoraAdapter,
        WorkerContext,
    )
    from lmi_core.launch_spec import LaunchSpec, WorkerSlot
    from lmi_core.operations import Operation

hookspec = pluggy.HookspecMarker("lmi")
hookimpl = pluggy.HookimplMarker("lmi")


# -- server side ---------------------------------------------------------------------------------


@hookspec
def register_backends() -> list[BackendSpec]:
    """Name the engine backends this plugin provides."""


@hookspec(firstresult=True)
def resolve_mode(config: ModelConfig) -> str | None:
    """Return the default operating mode ("python" or "mpi") of the backend that owns ``config``."""


@hookspec
def validate_config(config: ModelConfig) -> None:
    """Check the backend's own options of ``config``; raise ``ConfigError`` naming a bad key."""


@hookspec(firstresult=True)
def launch_workers(config: ModelConfig, allocation: list[WorkerSlot]) -> list[LaunchSpec] | None:
    """Return the command line, environment and rank addresses of each worker in ``allocation``."""


@hookspec
def register_tool_parsers() -> dict[str, Callable[[], Any]]:
    """Name the tool-call parsers (``lmi_core.http.tool_parsers.ToolParser`` factories) this plugin adds."""


@hookspec
def register_reasoning_parsers() -> dict[str, Callable[[Mapping[str, Any]], Any]]:
    """Name the reasoning parsers (``lmi_core.reasoning.ReasoningParserFactory``) this plugin adds."""


# -- worker side ---------------------------------------------------------------------------------


@hookspec(firstresult=True)
def load_engine(context: WorkerContext) -> Engine | None:
    """Load and return the engine for ``context.backend``, or None if the backend is not yours."""


@hookspec(firstresult=True)
def start_engine(engine: Engine) -> Awaitable[None] | None:
    """Return an awaitable that starts ``engine`` on the worker's loop before it reports loaded."""


@hookspec(firstresult=True)
def handle_request(
    engine: Engine, request: GenerationRequest
) -> AsyncGenerator[GenerationEvent, None] | None:
    """Run ``request`` on ``engine`` and return an async generator of its events (built-in: generate)."""


@hookspec(firstresult=True)
def handle_operation(engine: Engine, operation: Operation[Any]) -> Awaitable[Any] | None:
    """Return an awaitable of ``operation``'s result on ``engine`` (built-in: its protocol, or a 501)."""


@hookspec(firstresult=True)
def engine_stats(engine: Engine) -> EngineStats | None:
    """Return the engine's counters; raise if the engine is unhealthy (built-in: ``engine.stats()``)."""


@hookspec(firstresult=True)
def load_adapter(engine: Engine, adapter: LoraAdapter) -> Awaitable[None] | None:
    """Return an awaitable that makes LoRA ``adapter`` resident in ``engine`` (built-in: the engine's own)."""


@hookspec(firstresult=True)
def unload_adapter(engine: Engine, name: str) -> Awaitable[None] | None:
    """Return an awaitable that drops LoRA adapter ``name`` from ``engine`` (built-in: the engine's own)."""


@hookspec
def shutdown_engine(engine: Engine) -> None:
    """Release the engine's resources before the worker exits (built-in, last: ``engine.shutdown()``)."""
