"""lmi-core: a large-model inference server that runs engines as supervised worker processes.

This package re-exports the plugin API (``__all__``): the hooks' marker, the engine contract and its
protocols, the events, stats and errors. Beside it, the backend kit is public too: modules a plugin
imports by name for the work every backend repeats. Importing either stays light (standard library and
pluggy: no pydantic, no HTTP stack), because worker processes, which may run in another virtual
environment than the server, import them too.

The modules, in three groups:

Plugin API (what a backend plugin uses; its names are in ``__all__``)
    ``hookspecs``       the hooks (``hookimpl``); a backend implements ``register_backends`` and
                        ``load_engine``, and ``validate_config`` where it checks options
    ``engine``          the ``Engine``, ``LoopEngine`` and ``AdapterEngine`` protocols, requests,
                        events, stats, ``WorkerContext``, ``LoraAdapter``; their codecs
    ``backends``        ``BackendSpec`` and backend selection
    ``errors``          what an engine raises (``BadRequestError``, ``EngineError``, ...), ``ConfigError``

Backend kit (public: imported by module, ``from lmi_core.request_checks import token_budget``)
    ``option_values``   converters for a plugin's ``option.*`` strings, LoRA settings, ``importable``
    ``request_checks``  the checks every engine applies to a tokenized request (400s naming the field)
    ``request_counts``  ``RequestCounts``: an engine's finished / cancelled counters while relaying events
    ``grammars``        a ``StructuredOutput`` as llguidance grammar text (imports llguidance on first use)

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
