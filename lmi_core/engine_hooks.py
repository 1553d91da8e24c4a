"""The built-in worker hooks: run requests, read stats and shut down through the ``Engine`` protocol.

Registered ``trylast`` in ``DEFAULT_PLUGINS`` (datasette's pattern), so every engine that
``load_engine`` returns is driven by these three hooks unless a plugin implements one itself: a
plugin's ``handle_request`` or ``engine_stats`` that returns a value wins (both are ``firstresult``);
every ``shutdown_engine`` runs, a plugin's before this one. A backend plugin therefore needs only
``register_backends`` and ``load_engine``. Standard library and pluggy only (worker side).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from lmi_core.engine import Engine, EngineStats, GenerationEvent, GenerationRequest
from lmi_core.hookspecs import hookimpl


@hookimpl(trylast=True)
def handle_request(engine: Engine, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
    return engine.generate(request)


@hookimpl(trylast=True)
def engine_stats(engine: Engine) -> EngineStats:
    return engine.stats()


@hookimpl(trylast=True)
def shutdown_engine(engine: Engine) -> None:
    engine.shutdown()
