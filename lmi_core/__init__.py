"""lmi-core: a large-model inference server that runs engines as supervised worker processes.

This package re-exports the plugin API (``__all__``): the hooks' marker, the engine contract and its
protocols, the events, stats and errors. Beside it, the backend kit is public too: modules a plugin
imports by name for the work every backend repeats. Importing either stays light (standard library and
pluggy: no pydantic, no HTTP stack), because worker processes, which may run in another virtual
environment than the server, import them too.

The folders say which process a module runs in (``docs/architecture.md`` has the module map):

    lmi_core/           the app shell (cli, config, djl_options, demo_model, demo_encoder,
                        demo_vision, plugins), the plugin API (hookspecs, engine, operations,
                        pooling, errors, backends, launch_spec, reasoning; names in ``__all__``) and
                        the backend kit (option_values, request_checks, request_counts, prompts,
                        grammars, custom_code, telemetry, otel)
    lmi_core/http/      the server process's HTTP side: routes, protocols, rendering, errors, metrics
    lmi_core/serving/   the server process's models: server, registry, pool, dispatch, supervisor,
                        connection, routing; no HTTP
    lmi_core/launch/    starting workers: launchers, processes, devices, hosts, placement, preflight
    lmi_core/worker/    the worker process (``python -m lmi_core.worker``): rank_server, wire,
                        engine_hooks; standard library, msgpack and pluggy only

Imports go down that list (http -> serving -> launch -> worker -> the top-level API and kit), never
back up, and never in a circle (``tests/test_layout.py``).
"""

from __future__ import annotations

from lmi_core.backends import BackendSpec
from lmi_core.engine import (
    AdapterEngine,
    Engine,
    EngineStats,
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    LoopEngine,
    LoraAdapter,
    PromptLogprob,
    SamplingParams,
    StructuredOutput,
    Token,
    WorkerContext,
)
from lmi_core.errors import (
    BadRequestError,
    ConfigError,
    EngineError,
    EngineFailedError,
    EngineOutOfMemoryError,
    ServiceError,
)
from lmi_core.hookspecs import hookimpl
from lmi_core.request_counts import RequestCounts

__all__ = [
    "AdapterEngine",
    "BackendSpec",
    "BadRequestError",
    "ConfigError",
    "Engine",
    "EngineError",
    "EngineFailedError",
    "EngineOutOfMemoryError",
    "EngineStats",
    "FinishReason",
    "Finished",
    "GenerationEvent",
    "GenerationRequest",
    "LoopEngine",
    "LoraAdapter",
    "PromptLogprob",
    "RequestCounts",
    "SamplingParams",
    "ServiceError",
    "StructuredOutput",
    "Token",
    "WorkerContext",
    "hookimpl",
]
__version__ = "0.1.0"
