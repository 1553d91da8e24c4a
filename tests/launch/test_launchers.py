"""The ``mpirun`` command line of MPI mode, on one host and across hosts (no process is started)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest

from lmi_core.config import ModelConfig, build_model_config
from lmi_core.launch import launchers
from lmi_core.launch_spec import RankPlace, WorkerSlot

SLOT = WorkerSlot(worker_id=1, socket_base="/run/lmi/m-w1", devices=("2", "3"), threads=4)


def mpi_config(tp: int = 2, **properties: str) -> ModelConfig:
    props = {"option.model_id": "/models/m", "option.tensor_parallel_degree": str(tp), **properties}
    config = build_model_config(props, name="m", environ={})
    config.mode = "mpi"
    return config


def placed(*hosts: str) -> WorkerSlot:
    """``SLOT`` with its ranks placed on ``hosts`` (rank r on ``hosts[r]``), as ``ModelServer.plan`` does."""
    ranks = tuple(RankPlace(r, host, hosts[:r].count(host), (), 4) for r, host in enumerate(hosts))
    return dataclasses.replace(SLOT, devices=(), ranks=ranks)


def after(argv: list[str], flag: str) -> list[str]:
    """Every value that follows ``flag`` in ``argv``."""
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


def test_single_host_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", "/cache/hf")
    monkeypatch.setenv("UNRELATED", "x")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    spec = launchers.mpi_worker(mpi_config(), SLOT)
    argv = spec.argv
    assert Path(argv[0]).name == "mpirun"
    assert after(argv, "-np") == ["2"] and after(argv, "--bind-to") == ["none"]
    assert after(argv, "--mca") == ["btl"] and "^ofi" in argv
    assert {"--tag-output", "--oversubscribe"} <= set(argv)
    assert "--host" not in argv and "--hostfile" not in argv
    forwarded = set(after(argv, "-x"))
    assert {
        "CUDA_VISIBLE_DEVICES",
        "MASTER_ADDR",
        "MASTER_PORT",
        "PYTHONPATH",
        "OMP_NUM_THREADS",
        "HF_HOME",
    } <= forwarded
    assert "UNRELATED" not in forwarded
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "2,3" and spec.env["OMP_NUM_THREADS"] == "4"
    assert spec.env["MASTER_ADDR"] == "127.0.0.1" and spec.env["MASTER_PORT"].isdigit()
    worker = [
        sys.executable,
        "-m",
        "lmi_core.worker",
        "--socket",
        SLOT.socket_base,
        "--parent-pid",
        str(os.getpid()),
    ]
    assert argv[-len(worker) :] == worker
    assert spec.rank_addresses == ["unix:/run/lmi/m-w1.0", "unix:/run/lmi/m-w1.1"]
    assert spec.mode == "mpi" and spec.label == "m/w1"


@pytest.mark.parametrize(("euid", "flag"), [(0, True), (1000, False)])
def test_allow_run_as_root_only_as_root(monkeypatch: pytest.MonkeyPatch, euid: int, flag: bool) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    assert ("--allow-run-as-root" in launchers.mpi_worker(mpi_config(), SLOT).argv) is flag


def test_master_addr_from_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    assert launchers.mpi_worker(mpi_config(), SLOT).env["MASTER_ADDR"] == "10.0.0.7"


def test_host_list_gives_tcp_ranks_in_slot_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    config = mpi_config(4, **{"option.mpi_hosts": "node1:2,node2:2"})
    spec = launchers.mpi_worker(config, placed("node1", "node1", "node2", "node2"))
    argv = spec.argv
    assert after(argv, "--host") == ["node1:2,node2:2"] and after(argv, "--map-by") == ["slot"]
    (tcp,) = after(argv, "--tcp")
    host, port = tcp.split(":")
    assert host == "0.0.0.0" and "--parent-pid" not in argv  # the server's pid means nothing remotely
    base = int(port)
    assert spec.rank_addresses == [
        f"tcp:node1:{base}",
        f"tcp:node1:{base + 1}",
        f"tcp:node2:{base + 2}",
        f"tcp:node2:{base + 3}",
    ]
    assert spec.env["MASTER_ADDR"] == "node1"  # rank 0's host runs the rendezvous


def test_hostfile_goes_to_mpirun_and_ranks_to_their_placed_hosts(tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=1\nb slots=4\n")
    config = mpi_config(4, **{"option.mpi_hostfile": str(hostfile)})
    hostfile.unlink()  # placed at plan time: a start reads the list no more
    spec = launchers.mpi_worker(config, placed("a", "b", "b", "b"))
    assert after(spec.argv, "--hostfile") == [str(hostfile)] and after(spec.argv, "--map-by") == ["slot"]
    assert [address.split(":")[1] for address in spec.rank_addresses] == ["a", "b", "b", "b"]


def test_a_multi_host_slot_without_placed_ranks_is_refused() -> None:
    with pytest.raises(ValueError, match="needs its ranks placed"):
        launchers.mpi_worker(mpi_config(2, **{"option.mpi_hosts": "a:1,b:1"}), SLOT)


def test_python_mode_ignores_mpi_hosts() -> None:
    config = mpi_config(2, **{"option.mpi_hosts": "a:1"})
    config.mode = "python"
    (spec,) = launchers.launch_workers(config, [SLOT])
    assert spec.mode == "python" and "mpirun" not in spec.argv[0]


def test_free_ports_are_consecutive_and_free() -> None:
    base = launchers.free_ports(4)
    assert all(launchers.port_free("127.0.0.1", base + i) for i in range(4))


def test_interface_variables_reach_remote_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without GLOO_SOCKET_IFNAME a rank whose host name resolves to 127.0.1.1 binds gloo to loopback.
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth0")
    argv = launchers.mpi_worker(mpi_config(2, **{"option.mpi_hosts": "a:1,b:1"}), placed("a", "b")).argv
    assert {"GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"} <= set(after(argv, "-x"))


def test_ranks_placed_on_other_hosts_get_their_own_hosts_devices_and_threads() -> None:
    ranks = (RankPlace(0, "a", 0, ("0", "1"), None), RankPlace(1, "a", 1, ("0", "1"), None))
    slot = WorkerSlot(0, "/run/lmi/m-w0", ("a:0", "a:1"), None, ranks)
    spec = launchers.mpi_worker(mpi_config(2, **{"option.mpi_hosts": "a:2"}), slot)
    assert spec.env["CUDA_VISIBLE_DEVICES"] == ""  # not the server's host:index bookkeeping ids
    assert json.loads(spec.env["LMI_RANK_ENV"]) == [{"CUDA_VISIBLE_DEVICES": "0,1"}] * 2
    assert "LMI_RANK_ENV" in after(spec.argv, "-x")
    shim = spec.argv.index("lmi_core.launch.placement")
    assert spec.argv[shim + 1 : shim + 4] == [sys.executable, "-m", "lmi_core.worker"]


def test_free_ports_are_drawn_below_the_ephemeral_range() -> None:
    """Binding port 0 gives an ephemeral port, which any outgoing connection may take before the rank
    binds it (a MASTER_PORT was lost so: EADDRINUSE); a drawn port is below that range."""
    start = launchers.ephemeral_start()
    for _ in range(50):
        base = launchers.free_ports(4)
        assert base >= launchers.LOWEST_PORT and base + 3 < start


def test_free_ports_skip_a_taken_port(monkeypatch: pytest.MonkeyPatch) -> None:
    draws = iter([20000, 30000])
    monkeypatch.setattr(launchers.random, "randrange", lambda a, b: next(draws))
    monkeypatch.setattr(launchers, "port_free", lambda host, port: port != 20001)
    assert launchers.free_ports(2) == 30000
