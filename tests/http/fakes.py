"""A fake ``ModelService`` for the ``http/`` tests: snapshots in, rendered responses out, no processes.

Health is derived by the real ``registry.health_of`` from the snapshots a test builds, so the fake
differs from ``ModelServer`` only in where the snapshots come from.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeVar, cast

from starlette.applications import Starlette
from starlette.testclient import TestClient

from lmi_core.config import ModelConfig, ServerConfig
from lmi_core.engine import EngineStats, Finished, GenerationEvent, GenerationRequest, LoraAdapter, Token
from lmi_core.errors import ModelNotFoundError, ServiceError
from lmi_core.http.app import build_app
from lmi_core.http.metrics import Metrics
from lmi_core.http.state import AppState
from lmi_core.operations import (
    Detokenize,
    Embed,
    EmbedResult,
    Operation,
    Score,
    ScoreResult,
    Tokenize,
    TokenizeResult,
)
from lmi_core.pooling import wrong_task
from lmi_core.serving.adapters import adapter_registry
from lmi_core.serving.pool import ModelStatus, PoolSnapshot
from lmi_core.serving.registry import Health, ModelSnapshot, ModelState, Residency, health_of
from lmi_core.serving.routing import Decision, RequestContext
from lmi_core.serving.server import only_model
from lmi_core.serving.supervisor import WorkerSnapshot, WorkerState
from lmi_core.serving.tenants import Tenants
from lmi_core.worker import wire


def worker(
    worker_id: int,
    state: WorkerState = WorkerState.READY,
    *,
    retiring: bool = False,
    devices: tuple[str, ...] = (),
    stats: EngineStats | None = None,
) -> WorkerSnapshot:
    return WorkerSnapshot(
        worker_id=worker_id,
        state=state,
        pids=(1000 + worker_id,),
        devices=devices,
        threads=None if devices else 2,
        in_flight=0,
        restarts=0,
        started_at=1_700_000_000.0,
        last_error=None,
        engine_stats=stats or EngineStats(),
        retiring=retiring,
    )


def pool(
    name: str,
    *workers: WorkerSnapshot,
    status: ModelStatus = ModelStatus.READY,
    min_workers: int = 1,
    max_workers: int = 2,
    groups: tuple[tuple[str, ...], ...] | None = None,
    last_failure: str | None = None,
) -> PoolSnapshot:
    return PoolSnapshot(
        name=name,
        status=status,
        backend="hf",
        mode="python",
        tensor_parallel_degree=1,
        pipeline_parallel_degree=1,
        min_workers=min_workers,
        max_workers=max_workers,
        max_idle_seconds=60.0,
        queue_size=1000,
        queued=0,
        max_rolling_batch_size=32,
        loaded_at=1_700_000_000.0,
        last_failure=last_failure,
        groups=((),) * max_workers if groups is None else groups,
        workers=workers,
    )


T = TypeVar("T")


def model(
    name: str,
    pool_snapshot: PoolSnapshot | None = None,
    state: ModelState = ModelState.LOADED,
    error: str | None = None,
    at_startup: bool = False,
    on_demand: bool = False,
    resident_bytes: int | None = None,
) -> ModelSnapshot:
    health = health_of(state, error, pool_snapshot, on_demand)
    residency = Residency(
        state=state,
        on_demand=on_demand,
        pinned=False,
        in_use=0,
        waiting=0,
        asleep=False,
        resident_bytes=resident_bytes,
        expires_in=None,
        loads=1 if state is ModelState.LOADED else 0,
        last_error=None,
    )
    return ModelSnapshot(name, f"/models/{name}", at_startup, health, pool_snapshot, residency)


class FakeModel:
    """A served model whose every generation yields ``tokens`` (then ``Finished``) or raises ``error``."""

    def __init__(
        self,
        name: str,
        tokens: Sequence[str] = ("Hel", "lo"),
        error: ServiceError | None = None,
        options: dict[str, str] | None = None,
        max_model_len: int | None = None,
        finish: str = "length",
        max_images: int = 0,
    ):
        self.name = name
        self.loaded_at = 1_700_000_000.0
        self.max_model_len = max_model_len  # as its engine would report it
        self.max_images = max_images
        self.config = ModelConfig(name=name, model_id=f"/models/{name}", options=options or {})
        # Real registry, no workers: the changes it would send them are recorded instead.
        self.adapter_changes: list[tuple[str, LoraAdapter]] = []
        self.adapters = adapter_registry(self.config, lambda op, a: self.adapter_changes.append((op, a)))
        self.tokens = tokens
        self.finish = finish  # the engine's finish reason
        self.error = error
        self.requests: list[GenerationRequest] = []
        self.contexts: list[RequestContext | None] = []
        self.operations: list[Operation[Any]] = []
        self.operation_contexts: list[RequestContext | None] = []  # each operation's

    async def generate(
        self, request: GenerationRequest, context: RequestContext | None = None
    ) -> AsyncIterator[GenerationEvent]:
        wire.Req(request.request_id, request).to_frame()  # as the worker socket would: encodable or not sent
        self.requests.append(request)
        self.contexts.append(context)
        if self.config.pooling.task != "text-generation":  # as the pool refuses it
            raise wrong_task(self.name, self.config.pooling.task, "generation")
        if context is not None:  # as the pool does: the worker is known before the first event
            context.served.append(Decision(0, "load"))
        if self.error is not None:
            raise self.error
        for i, text in enumerate(self.tokens):  # as engines do: the first token has the prompt's length
            yield Token(i, text, -0.5, last=i == len(self.tokens) - 1, prompt_tokens=3 if i == 0 else None)
        yield Finished(self.finish, 3, len(self.tokens), request.prompt or "")

    async def perform(self, operation: Operation[T], context: RequestContext | None = None) -> T:
        """Tokenize: one id per character of the prompt (or of the messages' contents); detokenize:
        the characters back; embed: ``[index, length, 0.5, 1]`` per input (cut to ``dimensions``), one
        token per character; score: a pair's score is its second text's length / 100. Records each
        operation; refuses one of another task as the pool does."""
        wire.Op("fake", operation).to_frame()  # as the worker socket would: encodable or not sent
        self.operations.append(operation)
        self.operation_contexts.append(context)
        task = self.config.pooling.task
        if operation.tasks is not None and task not in operation.tasks:
            raise wrong_task(self.name, task, operation.op)
        if self.error is not None:
            raise self.error
        if isinstance(operation, Embed):
            rows = [[float(i), float(len(x)), 0.5, 1.0] for i, x in enumerate(operation.inputs)]
            width = operation.dimensions or 4
            data = struct.pack(f"<{width * len(rows)}f", *(x for row in rows for x in row[:width]))
            return cast(T, EmbedResult(data, width, sum(len(x) for x in operation.inputs)))
        if isinstance(operation, Score):
            scores = [len(b) / 100 for _, b in operation.pairs]
            return cast(T, ScoreResult(scores, sum(len(a) + len(b) for a, b in operation.pairs)))
        if isinstance(operation, Tokenize):
            request = operation.request
            text = request.prompt or "".join(str(m.get("content", "")) for m in request.messages or [])
            strs = list(text) if operation.token_strs else None
            return cast(T, TokenizeResult([ord(c) for c in text], strs))
        assert isinstance(operation, Detokenize)
        return cast(T, "".join(map(chr, operation.ids)))


class FakeModels:
    """``ModelService`` over fixed snapshots; records the management calls it gets."""

    def __init__(self, *snapshots: ModelSnapshot, options: dict[str, dict[str, str]] | None = None) -> None:
        """``options``: a model's ``option.*`` by name (its task, for one)."""
        self.snapshots = {s.name: s for s in snapshots}
        self.served_models = {
            s.name: FakeModel(s.name, options=(options or {}).get(s.name))
            for s in snapshots
            if s.pool is not None
        }
        self.calls: list[tuple[str, Any]] = []

    def names(self) -> list[str]:
        return sorted(self.snapshots)

    def describe(self, name: str) -> ModelSnapshot:
        try:
            return self.snapshots[name]
        except KeyError:
            raise ModelNotFoundError(f"Model or workflow not found: {name}") from None

    def health(self, name: str) -> Health:
        return self.describe(name).health

    def get(self, name: str) -> FakeModel:
        try:
            return self.served_models[name]
        except KeyError:
            raise ModelNotFoundError(f"Model or workflow not found: {name}") from None

    def served(self) -> list[FakeModel]:
        return list(self.served_models.values())

    def default(self, param: str) -> FakeModel:
        return only_model(self.served(), param)

    async def load(self, config: ModelConfig, *, wait: bool = True, keep_failed: bool = True) -> None:
        self.calls.append(("load", (config, wait, keep_failed)))

    async def scale(
        self, name: str, min_workers: int | None, max_workers: int | None, *, wait: bool = True
    ) -> PoolSnapshot:
        self.calls.append(("scale", (name, min_workers, max_workers, wait)))
        snapshot = self.describe(name).pool
        assert snapshot is not None
        lo = snapshot.min_workers if min_workers is None else min_workers
        hi = snapshot.max_workers if max_workers is None else max_workers
        return dataclasses.replace(snapshot, min_workers=lo, max_workers=hi)

    async def unload(self, name: str) -> None:
        self.describe(name)
        self.calls.append(("unload", name))
        del self.snapshots[name]


def app(models: FakeModels, **config: Any) -> Starlette:
    """The real routes, error handlers and middleware over ``models``."""
    metrics = Metrics()
    metrics.collect_from(models)
    server_config = ServerConfig(**config)
    state = AppState(
        server_config, models, instrument=metrics.instrument, tenants=Tenants.from_config(server_config)
    )
    return build_app(state, metrics)


def client(models: FakeModels, **config: Any) -> TestClient:
    return TestClient(app(models, **config), raise_server_exceptions=False)


def named_events(http: TestClient, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The events of a streamed Responses or Messages request, each checked to be named by its type
    (``event: <type>`` then ``data: <json>``)."""
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    found = []
    for block in text.strip().split("\n\n"):
        name, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        found.append(event)
    return found
