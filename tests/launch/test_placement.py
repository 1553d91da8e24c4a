"""Per-host allocation of a multi-host MPI job: each rank's host, GPUs and threads are its own host's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmi_core.config import ModelConfig, ServerConfig, build_model_config
from lmi_core.errors import ConfigError
from lmi_core.launch import preflight
from lmi_core.launch.devices import Gpu
from lmi_core.launch.hosts import JobHosts, host_slots, job_hosts, parse_hosts
from lmi_core.launch.placement import HostInventory, place_ranks, plan_across_hosts, rank_env
from lmi_core.launch_spec import RankPlace
from lmi_core.serving.server import ModelServer

GPU4, GPU8 = HostInventory(gpus=4, cpus=64), HostInventory(gpus=8, cpus=96)
CPU16, CPU2 = HostInventory(gpus=0, cpus=16), HostInventory(gpus=0, cpus=2)


def test_the_documented_example_fits_on_two_four_gpu_hosts_whatever_the_server_has() -> None:
    # TP 8 over node1:4,node2:4: the server's own inventory (4 GPUs, or none) plays no part.
    places = place_ranks([("node1", 4), ("node2", 4)], 8, {"node1": GPU4, "node2": GPU4})
    assert [(p.host, p.local_rank) for p in places] == [("node1", i) for i in range(4)] + [
        ("node2", i) for i in range(4)
    ]
    assert all(p.devices == ("0", "1", "2", "3") and p.threads is None for p in places)
    assert [d for p in places for d in p.device_ids] == [f"node{n}:{i}" for n in (1, 2) for i in range(4)]


def test_cpu_hosts_split_their_own_cores_among_their_own_ranks() -> None:
    places = place_ranks([("big", 3), ("small", 1)], 4, {"big": CPU16, "small": CPU2})
    assert [(p.host, p.threads, p.devices) for p in places] == [("big", 5, ())] * 3 + [("small", 2, ())]
    assert places[0].env() == {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "5"}


def test_the_users_omp_num_threads_wins() -> None:
    places = place_ranks([("a", 2)], 2, {"a": CPU16}, omp_threads=3)
    assert {p.threads for p in places} == {3}


@pytest.mark.parametrize(
    ("hosts", "world", "ranks_per_host"),
    [
        ([("a", 1), ("b", 1)], 2, {"a": 1, "b": 1}),
        ([("a", 4), ("b", 4)], 6, {"a": 4, "b": 2}),  # the last host partly used
        ([("a", 2), ("b", 2), ("c", 2)], 2, {"a": 2}),  # later hosts unused
        ([("a", 8)], 3, {"a": 3}),
        ([("a", 1), ("b", 3), ("c", 4)], 8, {"a": 1, "b": 3, "c": 4}),
    ],
)
def test_ranks_fill_each_hosts_slots_in_list_order(
    hosts: list[tuple[str, int]], world: int, ranks_per_host: dict[str, int]
) -> None:
    inventory = {h: GPU8 for h, _ in hosts}
    places = place_ranks(hosts, world, inventory)
    assert [p.rank for p in places] == list(range(world))
    counted = {h: sum(p.host == h for p in places) for h, _ in hosts if any(p.host == h for p in places)}
    assert counted == ranks_per_host
    for place in places:  # a host's ranks see that host's first n GPUs and each takes its local rank
        n = ranks_per_host[place.host]
        assert place.devices == tuple(str(i) for i in range(n)) and place.local_rank < n


def test_a_repeated_host_name_is_merged_like_open_mpi_does() -> None:
    places = place_ranks(host_slots(parse_hosts("a,b,a")), 3, {"a": CPU2, "b": CPU2})
    assert [p.host for p in places] == ["a", "a", "b"]


@pytest.mark.parametrize(
    ("hosts", "world", "inventory", "detail"),
    [
        ([("a", 1)], 2, {"a": GPU4}, "at least 2 slots"),
        ([("a", 6)], 6, {"a": GPU4}, "at most 4 slots on a (4 GPUs there)"),
        ([("a", 1), ("b", 1)], 2, {"a": GPU4, "b": CPU16}, "all have GPUs or all have none (a GPU, b CPU)"),
        ([("a", 1), ("b", 1)], 2, {"a": GPU4}, "none for b"),
    ],
)
def test_impossible_placements_name_the_host(
    hosts: list[tuple[str, int]], world: int, inventory: dict[str, HostInventory], detail: str
) -> None:
    with pytest.raises(ConfigError) as info:
        place_ranks(hosts, world, inventory)
    assert info.value.key == "option.mpi_hosts" and detail in str(info.value)


def test_gpus_another_model_holds_are_refused() -> None:
    with pytest.raises(ConfigError, match="b:0 are taken"):
        place_ranks([("a", 1), ("b", 1)], 2, {"a": GPU4, "b": GPU4}, taken={"b:0"})


def test_each_rank_applies_its_own_entry_before_the_worker_starts() -> None:
    places = (RankPlace(0, "a", 0, ("0", "1"), None), RankPlace(1, "b", 0, (), 7))
    show = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ.get('OMP_NUM_THREADS'))"
    for rank, expected in [(0, "0,1 None"), (1, " 7")]:
        env = {**os.environ, "LMI_RANK_ENV": rank_env(places), "OMPI_COMM_WORLD_RANK": str(rank)}
        env.pop("OMP_NUM_THREADS", None)
        argv = [sys.executable, "-m", "lmi_core.launch.placement", sys.executable, "-c", show]
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=True).stdout
        assert out.rstrip("\n") == expected
    assert json.loads(rank_env(places))[1] == {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "7"}


@pytest.mark.parametrize("head_gpus", [4, 0])
async def test_the_server_plans_a_multi_host_job_from_the_hosts_not_from_itself(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, head_gpus: int
) -> None:
    # The documented example: TP 8 over node1:4,node2:4, on a 4-GPU head node and on a CPU-only one.
    async def probed(config: ModelConfig, job: JobHosts) -> dict[str, HostInventory]:
        return {"node1": GPU4, "node2": GPU4}

    monkeypatch.setattr(preflight, "run", probed)
    server = ModelServer(ServerConfig(runtime_dir=str(tmp_path)))
    server._gpus = [Gpu(i, f"GPU-{i}", "NVIDIA H100", 80 << 30, 79 << 30) for i in range(head_gpus)]
    properties = {"option.tensor_parallel_degree": "8", "option.mpi_hosts": "node1:4,node2:4"}
    config = build_model_config({"option.model_id": "/models/m", **properties}, name="m", environ={})
    config.mode = "mpi"
    plan = await server.plan(config)
    (group,) = plan.groups
    assert plan.world_size == 8 and not plan.on_cpu and plan.threads_per_worker is None
    assert [p.env() for p in group.ranks] == [{"CUDA_VISIBLE_DEVICES": "0,1,2,3"}] * 8
    assert group.devices == tuple(f"node{n}:{i}" for n in (1, 2) for i in range(4))


async def test_remote_cpu_hosts_get_their_own_thread_counts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    async def probed(config: ModelConfig, job: JobHosts) -> dict[str, HostInventory]:
        return {"a": HostInventory(0, 8), "b": HostInventory(0, 32)}

    monkeypatch.setattr(preflight, "run", probed)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    server = ModelServer(ServerConfig(runtime_dir=str(tmp_path)))
    server._gpus = []
    properties = {"option.tensor_parallel_degree": "4", "option.mpi_hosts": "a:2,b:2"}
    config = build_model_config({"option.model_id": "/models/m", **properties}, name="m", environ={})
    config.mode = "mpi"
    plan = await server.plan(config)
    assert plan.on_cpu and [p.threads for p in plan.groups[0].ranks] == [4, 4, 16, 16]


def test_a_host_list_is_one_worker() -> None:
    properties = {"option.tensor_parallel_degree": "2", "option.mpi_hosts": "a:1,b:1", "maxWorkers": "2"}
    config = build_model_config({"option.model_id": "/models/m", **properties}, name="m", environ={})
    job = job_hosts(config)
    assert job is not None
    with pytest.raises(ConfigError, match=r"at most 1 \(one mpirun job spans every listed host\)"):
        plan_across_hosts(config, job, {"a": GPU4, "b": GPU4}, (), None)
    config.max_workers = None
    plan = plan_across_hosts(config, job, {"a": GPU4, "b": GPU4}, (), None)
    assert (plan.min_workers, plan.max_workers, plan.tensor_parallel_degree) == (1, 1, 2)
    assert plan.groups[0].devices == ("a:0", "b:0")
