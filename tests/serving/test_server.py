"""ModelServer: device planning across models on a fake GPU inventory, registration and scaling.

``register`` claims a model's name and devices without starting workers, so no GPU and no process
is needed: ``ModelServer._gpus`` is pre-set to a fake inventory.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from lmi_core.config import ModelConfig, ServerConfig, build_model_config
from lmi_core.errors import ConfigError, ModelNotFoundError, ModelNotReadyError, ServiceError
from lmi_core.http.app import create_app
from lmi_core.launch import hosts, preflight
from lmi_core.launch.devices import Gpu, omp_threads
from lmi_core.launch.hosts import JobHosts
from lmi_core.launch.placement import HostInventory
from lmi_core.launch_spec import WorkerSlot
from lmi_core.serving.server import ModelServer


def fake_gpus(n: int) -> list[Gpu]:
    return [Gpu(i, f"GPU-{i}", "NVIDIA H100", 80 << 30, 79 << 30) for i in range(n)]


def model(name: str, **properties: str) -> ModelConfig:
    props = {"option.model_id": f"/models/{name}", "option.rolling_batch": "disable", **properties}
    return build_model_config({k.replace("__", "."): v for k, v in props.items()}, name=name, environ={})


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ModelServer]:
    server = ModelServer(ServerConfig(runtime_dir=str(tmp_path)))
    server._gpus = fake_gpus(8)
    yield server
    await server.shutdown()


def slices(server: ModelServer, name: str) -> list[tuple[str, ...]]:
    snapshot = server.describe(name).pool
    assert snapshot is not None
    return list(snapshot.groups)


async def test_models_get_disjoint_gpus_unless_they_name_them(server: ModelServer) -> None:
    await server.register(model("a", option__tensor_parallel_degree="4", maxWorkers="1"))
    await server.register(model("b", option__tensor_parallel_degree="2"))
    assert slices(server, "a") == [("0", "1", "2", "3")]
    assert slices(server, "b") == [("4", "5"), ("6", "7")]  # what a left, not 0..3 again
    with pytest.raises(ConfigError, match=r"0,1,2,3,4,5,6,7 used by other models"):
        await server.register(model("c"))
    await server.register(model("c", load_on_devices="0;1", option__tensor_parallel_degree="2"))
    assert slices(server, "c") == [("0", "1")]  # shared on purpose


async def test_unloading_a_model_frees_its_gpus(server: ModelServer) -> None:
    await server.register(model("a", option__tensor_parallel_degree="max"))
    assert slices(server, "a") == [tuple(str(i) for i in range(8))]
    await server.unload("a")
    await server.register(model("b", option__tensor_parallel_degree="4"))
    assert slices(server, "b") == [("0", "1", "2", "3"), ("4", "5", "6", "7")]


async def test_concurrent_registrations_cannot_share_a_gpu() -> None:
    server = ModelServer(ServerConfig())  # GPUs not discovered yet: both plans await the inventory
    gpus = asyncio.get_running_loop().create_future()

    async def discover() -> list[Gpu]:
        return await gpus

    server.gpus = discover  # type: ignore[method-assign]
    tp4 = {"option__tensor_parallel_degree": "4", "maxWorkers": "1"}
    first = asyncio.ensure_future(server.register(model("a", **tp4)))
    second = asyncio.ensure_future(server.register(model("b", **tp4)))
    await asyncio.sleep(0)
    gpus.set_result(fake_gpus(8))
    await asyncio.gather(first, second)
    assert set(slices(server, "a")[0]).isdisjoint(slices(server, "b")[0])
    await server.shutdown()


async def test_a_name_is_registered_once(server: ModelServer) -> None:
    await server.register(model("a"))
    with pytest.raises(ServiceError, match="already registered") as raised:
        await server.register(model("a"))
    assert raised.value.status == 409


@pytest.mark.parametrize("wait", [True, False])
async def test_a_refused_registration_leaves_nothing_behind(server: ModelServer, wait: bool) -> None:
    """The caller gets the error, so nothing of it may stay: before, a background registration
    (``keep_failed``) left a FAILED entry that held the name (409 for the corrected model)."""
    with pytest.raises(ConfigError, match="no_such_key"):
        await server.load(model("a", option__no_such_key="1"), wait=wait, keep_failed=not wait)
    assert server.names() == []
    await server.register(model("a"))  # the name is free


async def test_a_startup_model_that_cannot_register_stays_listed_as_failed(server: ModelServer) -> None:
    config = model("a", option__no_such_key="1")
    server.expect([config])  # refused: listed FAILED, and the startup loader reports it
    with pytest.raises(ModelNotReadyError, match="no_such_key"):
        await server.load_startup("a")
    assert server.health("a").error is not None and "no_such_key" in server.health("a").error


async def test_scale_replans_within_the_gpus_left(server: ModelServer) -> None:
    await server.register(model("a", option__tensor_parallel_degree="2", minWorkers="1", maxWorkers="1"))
    await server.register(model("b", option__tensor_parallel_degree="2", maxWorkers="2"))
    pool = await server.scale("a", None, 2, wait=False)
    assert (pool.min_workers, pool.max_workers) == (1, 2)
    assert slices(server, "a") == [("0", "1"), ("6", "7")]  # its own, then the one b left
    with pytest.raises(ConfigError, match="maxWorkers=3: expected at most 2"):
        await server.scale("a", None, 3, wait=False)
    pool = await server.scale("a", 2, None, wait=False)
    assert (pool.min_workers, pool.max_workers) == (2, 2)
    pool = await server.scale("a", None, 1, wait=False)
    assert (pool.min_workers, pool.max_workers) == (1, 1)  # an omitted min follows max down
    config = server.get("a").config  # the bounds its next load uses, should it be unloaded
    assert (config.min_workers, config.max_workers) == (1, 1)
    with pytest.raises(ModelNotFoundError):
        await server.scale("nope", 1, 1)


async def test_describe_lists_one_worker_group_per_gpu_slice(server: ModelServer) -> None:
    await server.register(model("b", option__tensor_parallel_degree="2", minWorkers="1", maxWorkers="2"))
    transport = httpx.ASGITransport(app=create_app(ServerConfig(), server=server))
    async with httpx.AsyncClient(transport=transport, base_url="http://lmi") as client:
        [workflow] = (await client.get("/models/b")).json()
        listed = (await client.get("/models")).json()
    [described] = workflow["models"]
    assert described["status"] == "PENDING" and listed["models"][0]["status"] == "PENDING"
    keys = ("device", "devices", "minWorkers", "maxWorkers")
    groups = [tuple(g[k] for k in keys) for g in described["workerGroups"]]
    assert groups == [
        ({"deviceType": "gpu", "deviceId": "0"}, ["0", "1"], 1, 1),  # filled first: kept by minWorkers
        ({"deviceType": "gpu", "deviceId": "2"}, ["2", "3"], 0, 1),
    ]


async def test_cpu_threads_split_among_workers_unless_omp_num_threads_is_set(
    server: ModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server._gpus = []
    monkeypatch.setattr("lmi_core.launch.devices.cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    plan = await server.plan(model("a", minWorkers="1", maxWorkers="4"))
    assert plan.on_cpu and plan.threads_per_worker == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert (await server.plan(model("a", maxWorkers="4"))).threads_per_worker == 3
    with pytest.raises(ConfigError, match="OMP_NUM_THREADS"):
        omp_threads({"OMP_NUM_THREADS": "many"})


# -- multi-host MPI models: the host list is read once per plan ------------------------------------


def multi_host(name: str, **properties: str) -> ModelConfig:
    config = model(name, option__mpi_mode="true", option__tensor_parallel_degree="2", **properties)
    config.mode = "mpi"
    return config


async def test_a_multi_host_model_reads_its_hostfile_once_for_its_load_and_starts(
    server: ModelServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    reads: list[str] = []

    def parse_hostfile(path: str) -> list[str]:
        reads.append(path)
        return read_hostfile(path)

    async def probed(config: ModelConfig, job: JobHosts) -> dict[str, HostInventory]:
        return {host: HostInventory(gpus=1, cpus=8) for host, _ in job.used()}

    read_hostfile = hosts.parse_hostfile
    monkeypatch.setattr(hosts, "parse_hostfile", parse_hostfile)
    monkeypatch.setattr(preflight, "run", probed)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=1\nb slots=1\n")
    entry = await server.register(multi_host("m", option__mpi_hostfile=str(hostfile)))
    assert entry.pool is not None
    (group,) = entry.pool.groups
    slot = WorkerSlot(0, f"{tmp_path}/m-w0", group.devices, None, group.ranks)
    for _ in range(2):  # a worker's first start and its restart
        (spec,) = server.pm.hook.launch_workers(config=entry.config, allocation=[slot])
        assert [address.split(":")[1] for address in spec.rank_addresses] == ["a", "b"]
    assert reads == [str(hostfile)]


async def test_a_bad_host_list_is_refused_at_registration(tmp_path: Path) -> None:
    (tmp_path / "serving.properties").write_text(
        "option.model_id=/models/m\noption.rolling_batch=disable\noption.mpi_mode=true\n"
        "option.tensor_parallel_degree=2\noption.mpi_hosts=a:two\n"
    )
    server = ModelServer(ServerConfig(runtime_dir=str(tmp_path)))
    transport = httpx.ASGITransport(app=create_app(ServerConfig(), server=server))
    async with httpx.AsyncClient(transport=transport, base_url="http://lmi") as client:
        response = await client.post("/models", params={"url": str(tmp_path), "model_name": "m"})
    assert response.status_code == 400, response.text
    assert "option.mpi_hosts='a:two': expected HOST[:SLOTS]" in response.text
    assert server.names() == []
    await server.shutdown()


async def test_concurrent_multi_host_registrations_cannot_share_a_gpu(
    server: ModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def probed(config: ModelConfig, job: JobHosts) -> dict[str, HostInventory]:
        await asyncio.sleep(0)  # both preflights are in flight before either model is registered
        return {host: HostInventory(gpus=1, cpus=8) for host, _ in job.used()}

    monkeypatch.setattr(preflight, "run", probed)
    first = asyncio.ensure_future(server.register(multi_host("a", option__mpi_hosts="x:1,y:1")))
    second = asyncio.ensure_future(server.register(multi_host("b", option__mpi_hosts="x:1,y:1")))
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert not isinstance(results[0], BaseException)
    assert isinstance(results[1], ConfigError) and "x:0 are taken" in str(results[1])
