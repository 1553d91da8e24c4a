"""What the HTTP handlers share: the server config, the models, optional features."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from lmi_core.config import ModelConfig, ServerConfig
from lmi_core.engine import GenerationEvent, GenerationRequest
from lmi_core.pool import WorkerPool
from lmi_core.routing import RouteHint
from lmi_core.server import ModelServer

NativeChat = Callable[[Request, WorkerPool, dict[str, Any]], Awaitable[Response]]
Instrument = Callable[[WorkerPool, GenerationRequest, str, RouteHint | None], AsyncIterator[GenerationEvent]]


def _plain(
    pool: WorkerPool, request: GenerationRequest, route: str, hint: RouteHint | None
) -> AsyncIterator[GenerationEvent]:
    return pool.generate(request, hint)


@dataclass
class AppState:
    config: ServerConfig
    server: ModelServer
    startup_models: list[ModelConfig] = field(default_factory=list)
    # A chat request on the native API (a body with ``messages``), answered by the OpenAI layer.
    native_chat: NativeChat | None = None
    # Wraps every generation (metrics); by default runs it as is.
    instrument: Instrument = _plain
