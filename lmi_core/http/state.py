"""What the HTTP handlers share, and the one view of the server they have.

Handlers reach the models only through ``ModelService`` (``server.ModelServer`` implements it), as
vLLM's API server sees only its ``EngineClient``: they read snapshots and render them, and never
touch pools or workers. A fake implementing the protocol serves the ``http/`` tests without
starting a worker process.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from lmi_core.config import ModelConfig, ServerConfig
from lmi_core.engine import GenerationEvent, GenerationRequest
from lmi_core.http.response_store import ResponseStores
from lmi_core.operations import Operation
from lmi_core.serving.adapters import AdapterRegistry
from lmi_core.serving.pool import PoolSnapshot
from lmi_core.serving.registry import Health, ModelSnapshot
from lmi_core.serving.routing import RequestContext
from lmi_core.serving.tenants import Tenants

T = TypeVar("T")


class ServedModel(Protocol):
    """One model that takes requests (``pool.WorkerPool``)."""

    @property
    def name(self) -> str: ...

    @property
    def loaded_at(self) -> float: ...  # time.time() of its registration

    @property
    def config(self) -> ModelConfig: ...  # the model's configuration (context length, strictness)

    @property
    def adapters(self) -> AdapterRegistry | None: ...  # its LoRA adapters; None without option.enable_lora

    @property
    def max_model_len(self) -> int | None: ...  # its engine's context length; None: not reported (yet)

    @property
    def max_images(self) -> int | None: ...  # images one prompt may hold (0: none); None: not loaded yet

    # ``context``: the HTTP request's session and timeout in, the worker chosen out (before the first event).
    def generate(
        self, request: GenerationRequest, context: RequestContext | None = None
    ) -> AsyncGenerator[GenerationEvent, None]: ...

    # An operation's result (tokenize...), run on one of its workers.
    async def perform(self, operation: Operation[T], context: RequestContext | None = None) -> T: ...


class ModelService(Protocol):
    """The models, as the handlers see them. Unknown names raise ``ModelNotFoundError`` (404)."""

    def names(self) -> list[str]: ...  # every registered model, sorted, whatever its state

    def describe(self, name: str) -> ModelSnapshot: ...

    def health(self, name: str) -> Health: ...

    def get(self, name: str) -> ServedModel: ...  # 404 also for a model without workers (failed)

    def served(self) -> Sequence[ServedModel]: ...  # the models that take requests

    def default(self, param: str) -> ServedModel: ...  # the only served model, else a 400 naming ``param``

    async def load(self, config: ModelConfig, *, wait: bool = True, keep_failed: bool = True) -> None: ...

    async def scale(
        self, name: str, min_workers: int | None, max_workers: int | None, *, wait: bool = True
    ) -> PoolSnapshot: ...

    async def unload(self, name: str) -> None: ...


Instrument = Callable[
    [ServedModel, GenerationRequest, RequestContext | None], AsyncGenerator[GenerationEvent, None]
]


def _plain(
    model: ServedModel, request: GenerationRequest, context: RequestContext | None
) -> AsyncGenerator[GenerationEvent, None]:
    return model.generate(request, context)


@dataclass
class AppState:
    config: ServerConfig
    server: ModelService
    startup_models: list[ModelConfig] = field(default_factory=list)
    # Wraps every generation (metrics); by default runs it as is.
    instrument: Instrument = _plain
    # Who each request is for (API keys, budgets, shares); by default one tenant, no budget.
    tenants: Tenants = field(default_factory=Tenants)
    # The Responses API's stored responses, of the models that keep them (option.responses_store).
    responses: ResponseStores = field(default_factory=ResponseStores)
