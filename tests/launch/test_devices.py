"""GPU discovery and the worker/device allocation plan, over many inventories (no GPU needed)."""

from __future__ import annotations

import logging
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from lmi_core.errors import ConfigError
from lmi_core.launch import devices
from lmi_core.launch.devices import (
    AllocationPlan,
    DeviceGroup,
    Gpu,
    describe,
    discover_gpus,
    plan_allocation,
    query_nvml,
    visible_ids,
)

GIB = 1024**3


def make_gpus(n: int) -> list[Gpu]:
    return [Gpu(i, f"GPU-{i:x}{i:x}{i:x}-uuid-{i}", "NVIDIA H100", 80 * GIB, 79 * GIB) for i in range(n)]


def fake_query(n: int) -> Callable[[], list[Gpu]]:
    return lambda: make_gpus(n)


def ids(n: int) -> list[str]:
    return [str(i) for i in range(n)]


def group_devices(plan: AllocationPlan) -> list[tuple[str, ...]]:
    return [g.devices for g in plan.groups]


# --- NVML -------------------------------------------------------------------------------------------


def test_query_nvml_matches_what_nvml_reports_here() -> None:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        assert query_nvml() == []  # no driver / library on this host: CPU mode
        return
    try:
        count = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    gpus = query_nvml()
    assert [g.index for g in gpus] == list(range(count))
    assert all(g.uuid.startswith(("GPU-", "MIG-")) and g.total_memory >= g.free_memory for g in gpus)


def make_fake_pynvml(fail: str | None, calls: list[str]) -> types.ModuleType:
    """A stand-in ``pynvml`` with two GPUs; the function named ``fail`` raises ``NVMLError``."""
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def api(name: str, result: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object) -> object:
            calls.append(name)
            if name == fail:
                raise NVMLError(name)
            return result(*args)

        return call

    mod.NVMLError = NVMLError  # type: ignore[attr-defined]
    results: dict[str, Callable[..., object]] = {
        "nvmlInit": lambda: None,
        "nvmlShutdown": lambda: None,
        "nvmlDeviceGetCount": lambda: 2,
        "nvmlDeviceGetHandleByIndex": lambda i: i,
        "nvmlDeviceGetUUID": lambda h: f"GPU-{h}",
        "nvmlDeviceGetName": lambda h: "Fake GPU",
        "nvmlDeviceGetMemoryInfo": lambda h: types.SimpleNamespace(total=8 * GIB, free=(h + 1) * GIB),
    }
    for name, result in results.items():
        setattr(mod, name, api(name, result))
    return mod


def test_query_nvml_reads_every_device_and_shuts_down(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "pynvml", make_fake_pynvml(None, calls))
    assert query_nvml() == [
        Gpu(0, "GPU-0", "Fake GPU", 8 * GIB, 1 * GIB),
        Gpu(1, "GPU-1", "Fake GPU", 8 * GIB, 2 * GIB),
    ]
    assert calls[0] == "nvmlInit" and calls[-1] == "nvmlShutdown"


@pytest.mark.parametrize(
    "fail",
    ["nvmlInit", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetUUID",
     "nvmlDeviceGetMemoryInfo"],
)  # fmt: skip
def test_query_nvml_any_nvml_error_means_no_gpu(monkeypatch: pytest.MonkeyPatch, fail: str) -> None:
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "pynvml", make_fake_pynvml(fail, calls))
    assert query_nvml() == []
    # NVML is shut down whenever it was initialised.
    assert calls[-1] == ("nvmlInit" if fail == "nvmlInit" else "nvmlShutdown")


def test_query_nvml_keeps_what_it_read_when_only_shutdown_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", make_fake_pynvml("nvmlShutdown", []))
    assert [g.uuid for g in query_nvml()] == ["GPU-0", "GPU-1"]


def test_query_nvml_without_pynvml_means_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes ``import pynvml`` raise ImportError
    assert query_nvml() == []


# --- discover_gpus ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cvd", "expected"),
    [
        (None, [0, 1, 2, 3, 4, 5, 6, 7]),
        ("0,2,3,7", [0, 2, 3, 7]),
        ("7, 3", [7, 3]),  # CUDA order is the variable's order
        ("GPU-555-uuid-5,GPU-111-uuid-1", [5, 1]),  # full UUIDs
        ("GPU-66,gpu-22", [6, 2]),  # unique UUID prefixes, any case
        ("4,GPU-000", [4, 0]),  # mixed
    ],
)
def test_discover_gpus_honours_outer_cuda_visible_devices(cvd: str | None, expected: list[int]) -> None:
    environ = {} if cvd is None else {"CUDA_VISIBLE_DEVICES": cvd}
    assert [g.index for g in discover_gpus(environ, fake_query(8))] == expected


@pytest.mark.parametrize(
    ("cvd", "n", "reason"),
    [
        ("", 8, "CUDA_VISIBLE_DEVICES=''"),
        ("-1", 8, "CUDA_VISIBLE_DEVICES='-1'"),
        (None, 0, "NVML"),
        ("0,1", 0, "NVML"),  # nothing to check the variable against: CPU, not an error
    ],
)
def test_discover_gpus_logs_one_cpu_line(
    caplog: pytest.LogCaptureFixture, cvd: str | None, n: int, reason: str
) -> None:
    environ = {} if cvd is None else {"CUDA_VISIBLE_DEVICES": cvd}
    with caplog.at_level(logging.INFO, logger="lmi_core.launch.devices"):
        assert discover_gpus(environ, fake_query(n)) == []
    [record] = [r for r in caplog.records if r.name == "lmi_core.launch.devices"]
    assert record.levelno == logging.INFO
    assert record.getMessage().startswith("no GPU found (") and record.getMessage().endswith(
        "); running on CPU"
    )
    assert reason in record.getMessage()


def test_discover_gpus_without_nvml_here_runs_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert discover_gpus({}) == []


def test_discover_gpus_with_gpus_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="lmi_core.launch.devices"):
        assert len(discover_gpus({}, fake_query(2))) == 2
    assert not caplog.records


@pytest.mark.parametrize(
    ("cvd", "words"),
    [
        ("0,8", ["'8' names no GPU", "0,1,2,3,4,5,6,7"]),
        ("0,-1", ["'-1' names no GPU"]),
        ("GPU-999", ["'GPU-999' names no GPU"]),
        ("GPU-", ["'GPU-' is ambiguous"]),
        ("deadbeef", ["'deadbeef' names no GPU"]),
        ("0,0", ["each GPU at most once"]),
        ("1,GPU-111", ["each GPU at most once"]),
    ],
)
def test_discover_gpus_rejects_entries_naming_no_gpu(cvd: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        discover_gpus({"CUDA_VISIBLE_DEVICES": cvd}, fake_query(8))
    assert exc.value.key == "CUDA_VISIBLE_DEVICES" and exc.value.value == cvd
    assert all(w in str(exc.value) for w in words)


@pytest.mark.parametrize(
    ("cvd", "expected"),
    [
        (None, ["2", "5"]),
        ("2,5", ["2", "5"]),
        ("GPU-222,GPU-555", ["GPU-222-uuid-2", "GPU-555-uuid-5"]),  # full UUIDs, even from prefixes
    ],
)
def test_visible_ids_use_the_outer_variables_terms(cvd: str | None, expected: list[str]) -> None:
    environ = {} if cvd is None else {"CUDA_VISIBLE_DEVICES": cvd}
    gpus = [g for g in make_gpus(8) if g.index in (2, 5)]
    assert visible_ids(gpus, environ) == expected


def test_describe() -> None:
    assert describe([]) == "no GPU: running on CPU"
    assert describe(make_gpus(1)) == "1 GPU: 0: NVIDIA H100 (80.0 GiB, 79.0 GiB free)"
    line = describe(make_gpus(3)[1:])
    assert line.startswith("2 GPUs: 1: NVIDIA H100") and "; 2: NVIDIA H100" in line and "\n" not in line


# --- plan_allocation on GPUs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("devs", "tp", "pp", "groups", "tp_resolved"),
    [
        (ids(1), 1, 1, [("0",)], 1),
        (ids(3), 1, 1, [("0",), ("1",), ("2",)], 1),
        (ids(3), 2, 1, [("0", "1")], 2),  # the third GPU stays idle
        (ids(3), "max", 1, [("0", "1", "2")], 3),
        (ids(4), 2, 1, [("0", "1"), ("2", "3")], 2),
        (ids(4), 4, 1, [("0", "1", "2", "3")], 4),
        (ids(8), 2, 1, [("0", "1"), ("2", "3"), ("4", "5"), ("6", "7")], 2),
        (ids(8), 4, 1, [("0", "1", "2", "3"), ("4", "5", "6", "7")], 4),
        (ids(8), 8, 1, [tuple(ids(8))], 8),
        (ids(8), "max", 1, [tuple(ids(8))], 8),
        (ids(8), 2, 2, [("0", "1", "2", "3"), ("4", "5", "6", "7")], 2),
        (ids(8), "max", 2, [tuple(ids(8))], 4),
        (ids(3), "max", 2, [("0", "1")], 1),
        (["0", "2", "3", "7"], 2, 1, [("0", "2"), ("3", "7")], 2),  # DJL's outer-variable example
        (["7", "3"], 1, 1, [("7",), ("3",)], 1),
    ],
)
def test_plan_fills_the_gpus(
    devs: list[str], tp: int | str, pp: int, groups: list[tuple[str, ...]], tp_resolved: int
) -> None:
    plan = plan_allocation(devs, tp, pp)
    assert group_devices(plan) == groups
    assert [g.worker_id for g in plan.groups] == list(range(len(groups)))
    assert plan.min_workers == plan.max_workers == len(groups)
    assert plan.tensor_parallel_degree == tp_resolved and plan.world_size == tp_resolved * pp
    assert not plan.on_cpu and plan.threads_per_worker is None


def test_plan_with_outer_uuids_end_to_end() -> None:
    environ = {"CUDA_VISIBLE_DEVICES": "GPU-777,GPU-333,GPU-222,GPU-000"}
    gpus = discover_gpus(environ, fake_query(8))
    plan = plan_allocation(visible_ids(gpus, environ), 2)
    assert plan.groups == (
        DeviceGroup(0, ("GPU-777-uuid-7", "GPU-333-uuid-3")),
        DeviceGroup(1, ("GPU-222-uuid-2", "GPU-000-uuid-0")),
    )


@pytest.mark.parametrize(
    ("devs", "tp", "pp", "key", "value", "words"),
    [
        (ids(3), 4, 1, "option.tensor_parallel_degree", 4,
         ["expected at most 3", "3 GPUs cannot hold tensor_parallel_degree=4", "usable GPUs: 0,1,2"]),
        (ids(1), 2, 1, "option.tensor_parallel_degree", 2,
         ["at most 1", "1 GPUs cannot hold tensor_parallel_degree=2"]),
        (ids(8), 8, 2, "option.tensor_parallel_degree", 8,
         ["at most 4 with pipeline_parallel_degree=2",
          "cannot hold tensor_parallel_degree=8 x pipeline_parallel_degree=2"]),
        (["0", "2", "3"], 2, 2, "option.tensor_parallel_degree", 2, ["at most 1", "usable GPUs: 0,2,3"]),
        (ids(3), 1, 4, "option.pipeline_parallel_degree", 4,
         ["at most 3", "3 GPUs cannot hold pipeline_parallel_degree=4"]),
        (ids(3), "max", 4, "option.pipeline_parallel_degree", 4, ["at most 3"]),
        (ids(4), 0, 1, "option.tensor_parallel_degree", 0, ["a positive integer or 'max'"]),
        (ids(4), "auto", 1, "option.tensor_parallel_degree", "auto", ["a positive integer or 'max'"]),
        (ids(4), True, 1, "option.tensor_parallel_degree", True, ["a positive integer or 'max'"]),
        (ids(4), 1, 0, "option.pipeline_parallel_degree", 0, ["a positive integer"]),
        ([], 1, 0, "option.pipeline_parallel_degree", 0, ["a positive integer"]),
    ],
)  # fmt: skip
def test_plan_rejects_what_the_gpus_cannot_hold(
    devs: list[str], tp: int | str, pp: int, key: str, value: object, words: list[str]
) -> None:
    with pytest.raises(ConfigError) as exc:
        plan_allocation(devs, tp, pp)
    assert (exc.value.key, exc.value.value) == (key, value)
    assert all(w in str(exc.value) for w in words), str(exc.value)


@pytest.mark.parametrize(
    ("min_w", "max_w", "expected_min", "expected_max"),
    [
        (None, None, 4, 4),
        (None, 2, 2, 2),
        (1, None, 1, 4),
        (0, None, 0, 4),
        (1, 3, 1, 3),
        (4, 4, 4, 4),
    ],
)
def test_plan_worker_bounds(
    min_w: int | None, max_w: int | None, expected_min: int, expected_max: int
) -> None:
    plan = plan_allocation(ids(8), 2, min_workers=min_w, max_workers=max_w)
    assert (plan.min_workers, plan.max_workers) == (expected_min, expected_max)
    assert group_devices(plan) == [("0", "1"), ("2", "3"), ("4", "5"), ("6", "7")][:expected_max]


@pytest.mark.parametrize(
    ("min_w", "max_w", "key", "value", "words"),
    [
        (None, 5, "maxWorkers", 5, ["at most 4", "8 GPUs / 2 per worker = 4 workers"]),
        (None, 0, "maxWorkers", 0, ["at least 1"]),
        (3, 2, "minWorkers", 3, ["at most maxWorkers (2)"]),
        (5, None, "minWorkers", 5, ["at most maxWorkers (4)"]),
        (-1, None, "minWorkers", -1, ["at least 0"]),
    ],
)
def test_plan_rejects_bad_worker_bounds(
    min_w: int | None, max_w: int | None, key: str, value: int, words: list[str]
) -> None:
    with pytest.raises(ConfigError) as exc:
        plan_allocation(ids(8), 2, min_workers=min_w, max_workers=max_w)
    assert (exc.value.key, exc.value.value) == (key, value)
    assert all(w in str(exc.value) for w in words), str(exc.value)


@pytest.mark.parametrize(
    ("devs", "load_on", "tp", "groups"),
    [
        (ids(4), "0;1", 1, [("0",), ("1",)]),
        (ids(4), "2,3", 2, [("2", "3")]),
        (ids(8), "gpu4;gpu5", 1, [("4",), ("5",)]),  # DJL spelling
        (ids(8), " 6 ; 1 ", 2, [("6", "1")]),  # the listed order is kept
        (["0", "2", "3", "7"], "1;3", 1, [("2",), ("7",)]),  # positions into the visible list
        (ids(4), "*", "max", [("0", "1", "2", "3")]),
        (ids(4), "1;2;3", "max", [("1", "2", "3")]),
    ],
)
def test_plan_load_on_devices(
    devs: list[str], load_on: str, tp: int | str, groups: list[tuple[str, ...]]
) -> None:
    assert group_devices(plan_allocation(devs, tp, load_on_devices=load_on)) == groups


@pytest.mark.parametrize(
    ("devs", "load_on", "words"),
    [
        (ids(4), "4", ["positions 0..3 of the 4 visible GPUs"]),
        (ids(4), "0;1;9", ["positions 0..3"]),
        (ids(4), "a", ["positions 0..3"]),
        (ids(4), "-1", ["positions 0..3"]),
        (ids(4), "1;1", ["distinct positions"]),
        (ids(4), "", ["positions 0..3"]),
        ([], "0", ["no GPU is visible"]),
    ],
)
def test_plan_rejects_bad_load_on_devices(devs: list[str], load_on: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        plan_allocation(devs, 1, load_on_devices=load_on)
    assert (exc.value.key, exc.value.value) == ("load_on_devices", load_on)
    assert all(w in str(exc.value) for w in words), str(exc.value)


@pytest.mark.parametrize(
    ("devs", "taken", "tp", "groups"),
    [
        (ids(8), {"0", "1", "2", "3"}, 2, [("4", "5"), ("6", "7")]),
        (ids(8), ["1", "4"], 2, [("0", "2"), ("3", "5"), ("6", "7")]),  # the rest, contiguous
        (ids(8), {"0", "1"}, "max", [("2", "3", "4", "5", "6", "7")]),
        (ids(4), {"9"}, 1, [("0",), ("1",), ("2",), ("3",)]),  # unknown ids change nothing
    ],
)
def test_plan_skips_devices_taken_by_other_models(
    devs: list[str], taken: set[str] | list[str], tp: int | str, groups: list[tuple[str, ...]]
) -> None:
    assert group_devices(plan_allocation(devs, tp, taken=taken)) == groups


def test_plan_explicit_load_on_devices_shares_taken_gpus() -> None:
    plan = plan_allocation(ids(4), 1, load_on_devices="0;1", taken={"0", "1"})
    assert group_devices(plan) == [("0",), ("1",)]


@pytest.mark.parametrize(
    ("taken", "tp", "key", "words"),
    [
        (set(ids(4)), 1, "load_on_devices",
         ["a free GPU", "usable GPUs: none; 0,1,2,3 used by other models"]),
        ({"0", "1", "2"}, 2, "option.tensor_parallel_degree",
         ["at most 1", "usable GPUs: 3; 0,1,2 used by other models"]),
    ],
)  # fmt: skip
def test_plan_reports_gpus_taken_by_other_models(
    taken: set[str], tp: int, key: str, words: list[str]
) -> None:
    with pytest.raises(ConfigError) as exc:
        plan_allocation(ids(4), tp, taken=taken)
    assert exc.value.key == key
    assert all(w in str(exc.value) for w in words), str(exc.value)


# --- plan_allocation on CPU ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tp", "pp", "min_w", "max_w", "cpus", "workers", "threads", "world"),
    [
        (1, 1, None, None, 16, (1, 1), 16, 1),
        (1, 1, None, 4, 16, (4, 4), 4, 1),
        (1, 1, 1, 4, 16, (1, 4), 4, 1),
        (1, 1, 3, None, 16, (3, 3), 5, 1),  # max follows an explicit min
        (2, 2, None, 2, 16, (2, 2), 2, 4),  # every rank is a process: 16 // (2 * 4)
        ("max", 1, None, None, 8, (1, 1), 8, 1),  # "max" means 1 on CPU
        (1, 1, None, 4, 3, (4, 4), 1, 1),  # never below one thread
    ],
)
def test_plan_on_cpu_splits_threads(
    tp: int | str,
    pp: int,
    min_w: int | None,
    max_w: int | None,
    cpus: int,
    workers: tuple[int, int],
    threads: int,
    world: int,
) -> None:
    plan = plan_allocation([], tp, pp, min_workers=min_w, max_workers=max_w, taken={"0"}, cpu_count=cpus)
    assert plan.on_cpu and (plan.min_workers, plan.max_workers) == workers
    assert plan.groups == tuple(DeviceGroup(i, ()) for i in range(workers[1]))
    assert plan.threads_per_worker == threads and plan.world_size == world
    assert plan.tensor_parallel_degree == world // pp


def test_plan_on_cpu_defaults_to_os_cpu_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices.os, "cpu_count", lambda: 12)
    assert plan_allocation([], 1, max_workers=3).threads_per_worker == 4
    monkeypatch.setattr(devices.os, "cpu_count", lambda: None)
    assert plan_allocation([], 1).threads_per_worker == 1


def test_plan_on_cpu_rejects_min_above_max() -> None:
    with pytest.raises(ConfigError, match=r"minWorkers=3: expected at most maxWorkers \(2\)"):
        plan_allocation([], 1, min_workers=3, max_workers=2)


def test_host_memory_and_what_a_process_tree_holds(tmp_path: Path) -> None:
    assert devices.meminfo_total("MemFree: 1 kB\nMemTotal:  2048 kB\n") == 2 * 1024 * 1024
    assert devices.meminfo_total("nothing") is None
    assert devices.host_memory() > 0
    assert devices.pss_bytes("Rss: 10 kB\nPss:  4 kB\n") == 4096 and devices.pss_bytes("") is None
    # A fake /proc: 1 -> 2 -> 3, and 4 apart.
    for pid, ppid, pss in ((1, 0, 100), (2, 1, 10), (3, 2, 1), (4, 0, 1000)):
        entry = tmp_path / str(pid)
        entry.mkdir()
        (entry / "stat").write_text(f"{pid} (python (x)) S {ppid} 0 0")
        (entry / "smaps_rollup").write_text(f"Rss: {pss * 2} kB\nPss: {pss} kB\n")
    (tmp_path / "self").mkdir()
    assert devices.process_tree([2], tmp_path) == {2, 3}
    assert devices.host_bytes([1], tmp_path) == 111 * 1024
    assert devices.host_bytes([os.getpid()]) > 0  # this very process, from the real /proc
    assert devices.gpu_bytes([os.getpid()], {}) == {}  # no GPU listed: nothing to read
