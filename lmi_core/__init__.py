"""lmi-core: a large-model inference server that runs engines as supervised worker processes.

This package re-exports the plugin API: every name an engine plugin imports (``__all__``). Importing
it stays light (standard library and pluggy: no pydantic, no HTTP stack), because worker processes,
which may run in another virtual environment than the server, import it too.

The modules, in three groups:

Plugin API (what a backend plugin uses)
    ``hookspecs``       the hooks (``hookimpl``); a backend implements ``register_backends`` and
                        ``load_engine``, and ``validate_config`` where it checks options
    ``engine``          the ``Engine`` protocol, requests, events, stats, ``WorkerContext``; their codecs
    ``request_counts``  ``RequestCounts``: an engine's finished / cancelled counters while relaying events
    ``backends``        ``BackendSpec`` and backend selection
    ``errors``          what an engine raises (``BadRequestError``, ``EngineError``, ...), ``ConfigError``
    ``option_values``   converters for a plugin's ``option.*`` strings

Worker process (standard library, msgpack and pluggy only; enforced by tests/test_worker_imports.py)
    ``worker``          ``python -m lmi_core.worker``: one rank's server, drives the engine through hooks
    ``engine_hooks``    the built-in worker hooks: ``handle_request`` etc. through the ``Engine`` protocol
    ``plugins``         the plugin manager: built-ins, entry points, ``LMI_PLUGINS``/``LMI_EXTRA_PLUGINS``
    ``wire``            length-prefixed msgpack frames
    ``launchers``       the built-in launchers of Python and MPI mode (also loaded by the server)
    ``launch_spec``     what a launcher produces

Server (the HTTP server process)
    ``cli``, ``config``, ``server``, ``pool``, ``adapters`` (a model's LoRA registry), ``supervisor``,
    ``connection``, ``process``, ``devices``, ``demo_model``, and ``http`` (starlette + uvicorn: the
    LMI and OpenAI APIs, management, LoRA adapters, metrics)
"""

from __future__ import annotations

from lmi_core.backends import BackendSpec
from lmi_core.engine import (
    Engine,
    EngineStats,
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
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
    EngineOutOfMemoryError,
    ServiceError,
)
from lmi_core.hookspecs import hookimpl
from lmi_core.request_counts import RequestCounts

__all__ = [
    "BackendSpec",
    "BadRequestError",
    "ConfigError",
    "Engine",
    "EngineError",
    "EngineOutOfMemoryError",
    "EngineStats",
    "FinishReason",
    "Finished",
    "GenerationEvent",
    "GenerationRequest",
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
