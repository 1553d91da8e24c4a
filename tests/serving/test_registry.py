"""One entry per model and one derivation of its health (``registry``), and how ``ModelServer`` keeps
its entries through registration, failure and removal. No worker process: ``register`` starts none,
and the failures here happen while registering (on a fake GPU inventory).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lmi_core.config import ServerConfig
from lmi_core.errors import ConfigError, ModelNotFoundError, ModelNotReadyError, ServiceError
from lmi_core.serving.pool import ModelStatus
from lmi_core.serving.registry import Health, ModelState, WorkerCounts, health_of
from lmi_core.serving.server import ModelServer
from lmi_core.serving.supervisor import WorkerState
from tests.http.fakes import pool, worker
from tests.serving.test_server import fake_gpus, model


def test_a_retiring_worker_is_never_ready() -> None:
    snapshot = pool("a", worker(0), worker(1, retiring=True), min_workers=2)
    health = health_of(ModelState.LOADED, None, snapshot)
    assert health == Health(ModelStatus.READY, WorkerCounts(ready=1, total=2, minimum=2), None)
    assert health.below_minimum
    both = pool("a", worker(0), worker(1), min_workers=2)
    assert not health_of(ModelState.LOADED, None, both).below_minimum


def test_a_loading_model_is_pending_even_with_a_ready_worker() -> None:
    health = health_of(ModelState.LOADING, None, pool("a", worker(0), min_workers=2))
    assert health.status is ModelStatus.PENDING and not health.below_minimum


def test_a_failed_pool_reports_its_last_failure_and_a_recovered_one_none() -> None:
    failed = pool("a", worker(0, WorkerState.FAILED), status=ModelStatus.FAILED, last_failure="oom")
    assert health_of(ModelState.LOADED, None, failed).error == "oom"
    assert health_of(ModelState.LOADED, None, pool("a", worker(0), last_failure="oom")).error is None


def test_a_model_without_a_pool_is_pending_or_failed_and_has_no_worker_counts() -> None:
    assert health_of(ModelState.REGISTERED, None, None) == Health(ModelStatus.PENDING, None, None)
    assert health_of(ModelState.FAILED, "bad", None) == Health(ModelStatus.FAILED, None, "bad")


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ModelServer]:
    server = ModelServer(ServerConfig(runtime_dir=str(tmp_path)))
    server._gpus = fake_gpus(2)
    yield server
    await server.shutdown()


TOO_WIDE = {"option__tensor_parallel_degree": "4"}  # 2 GPUs: registration fails while planning


async def test_a_startup_model_is_listed_and_pending_until_loaded_and_a_request_may_load_it_first(
    server: ModelServer,
) -> None:
    startup = model("s")
    server.expect([startup])
    assert server.names() == ["s"]
    assert server.health("s") == Health(ModelStatus.PENDING, None, None)
    described = server.describe("s")
    assert described.loaded_at_startup and described.pool is None
    assert described.residency.state is ModelState.REGISTERED and not described.residency.on_demand
    assert server.get("s").name == "s"  # a request would load it rather than wait for the loader
    with pytest.raises(ModelNotReadyError, match="not loaded"):
        await server.scale("s", 1, 1)
    with pytest.raises(ServiceError, match="already registered"):
        await server.load(model("s"))  # its name is held for the startup config
    await server.unload("s")  # unregistered before the loader got to it
    assert server.names() == []
    await server.load_startup("s")  # the loader finds it gone: nothing to load
    assert server.names() == []


async def test_a_startup_model_that_fails_to_register_is_listed_failed_until_removed(
    server: ModelServer,
) -> None:
    """A runtime registration that is refused leaves nothing (the caller got the error:
    ``test_server.test_a_refused_registration_leaves_nothing_behind``); a startup model stays."""
    wide = model("wide", **TOO_WIDE)
    server.expect([wide])
    with pytest.raises(ConfigError):
        await server.load_startup("wide")
    assert server.names() == ["wide"]
    health = server.health("wide")
    assert health.status is ModelStatus.FAILED and health.workers is None
    assert health.error is not None and "tensor_parallel_degree" in health.error
    assert server.describe("wide").loaded_at_startup
    with pytest.raises(ModelNotFoundError):
        server.get("wide")
    with pytest.raises(ModelNotReadyError, match="failed to load"):
        await server.scale("wide", 1, 1)
    await server.unload("wide")
    assert server.names() == []


async def test_a_failure_the_caller_hears_of_is_forgotten(server: ModelServer) -> None:
    with pytest.raises(ConfigError):
        await server.load(model("wide", **TOO_WIDE), keep_failed=False)
    assert server.names() == []
    startup = model("s", **TOO_WIDE)
    server.expect([startup])
    with pytest.raises(ConfigError):
        await server.load_startup("s")
    assert server.health("s").status is ModelStatus.FAILED and server.describe("s").loaded_at_startup


async def test_a_duplicate_that_fails_leaves_the_registered_model_alone(server: ModelServer) -> None:
    await server.register(model("a"))
    with pytest.raises(ServiceError, match="already registered"):
        await server.load(model("a"))
    assert server.health("a").status is ModelStatus.PENDING  # still loading, not FAILED
    assert [p.name for p in server.served()] == ["a"] and server.default("model").name == "a"
