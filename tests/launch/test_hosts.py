"""The host list of a multi-host MPI job: ``option.mpi_hosts`` and ``option.mpi_hostfile``, read once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lmi_core.config import ModelConfig, build_model_config
from lmi_core.errors import ConfigError
from lmi_core.launch.hosts import JobHosts, host_slots, job_hosts, parse_hosts, used_hosts


def config(tp: str = "2", pp: str = "1", **properties: str) -> ModelConfig:
    props = {"option.model_id": "/models/m", "option.tensor_parallel_degree": tp, **properties}
    return build_model_config({"option.pipeline_parallel_degree": pp, **props}, name="m", environ={})


def test_repeated_host_names_are_slots() -> None:
    assert parse_hosts("a,a,b") == ["a", "a", "b"]
    assert parse_hosts(" a:2 , b ") == ["a", "a", "b"]


def test_a_repeated_host_name_is_merged_like_open_mpi_does() -> None:
    assert host_slots(parse_hosts("a,b,a")) == [("a", 2), ("b", 1)]


def test_used_hosts_stop_at_the_world_size() -> None:
    assert used_hosts([("a", 2), ("b", 2), ("c", 2)], 3) == [("a", 2), ("b", 1)]


def test_hostfile_slots(tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\na slots=1\n\nb slots=4 max_slots=8  # big node\n")
    job = job_hosts(config("4", **{"option.mpi_hostfile": str(hostfile)}))
    assert job == JobHosts("option.mpi_hostfile", str(hostfile), (("a", 1), ("b", 4)), ("a", "b", "b", "b"))
    assert job.world_size == 4 and job.used() == [("a", 1), ("b", 3)]


def test_the_hostfile_wins_over_the_host_list(tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("f slots=2\n")
    job = job_hosts(config(**{"option.mpi_hostfile": str(hostfile), "option.mpi_hosts": "h:2"}))
    assert job is not None and job.key == "option.mpi_hostfile" and job.ranks == ("f", "f")


def test_ranks_fill_the_hosts_in_first_listed_order() -> None:
    job = job_hosts(config(**{"option.mpi_hosts": "a,b,a"}))
    assert job is not None and job.hosts == (("a", 2), ("b", 1)) and job.ranks == ("a", "a")


def test_tp_max_takes_every_slot_in_whole_pipeline_stages() -> None:
    job = job_hosts(config("max", "2", **{"option.mpi_hosts": "a:3,b:2"}))
    assert job is not None and job.ranks == ("a", "a", "a", "b")


def test_no_host_list_means_every_rank_runs_here() -> None:
    assert job_hosts(config()) is None


@pytest.mark.parametrize(
    ("properties", "key", "detail"),
    [
        ({"option.mpi_hosts": "a:1"}, "option.mpi_hosts", "at least 2 slots (tp x pp ranks); it lists 1"),
        ({"option.mpi_hosts": "a:two"}, "option.mpi_hosts", "HOST[:SLOTS]"),
        ({"option.mpi_hosts": ":2"}, "option.mpi_hosts", "HOST[:SLOTS]"),
        ({"option.mpi_hostfile": "/nonexistent/hosts"}, "option.mpi_hostfile", "a readable hostfile"),
    ],
)
def test_bad_host_settings_are_config_errors(properties: dict[str, str], key: str, detail: str) -> None:
    with pytest.raises(ConfigError) as info:
        job_hosts(config(**properties))
    assert info.value.key == key and detail in str(info.value)


def test_hostfile_lines_need_a_slot_count(tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a\n")
    with pytest.raises(ConfigError, match="'HOST slots=N' lines"):
        job_hosts(config("1", **{"option.mpi_hostfile": str(hostfile)}))


def test_lmi_serve_refuses_a_bad_host_list_before_binding_its_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmi_core.cli import main

    properties = "option.model_id=/models/m\noption.rolling_batch=disable\noption.mpi_mode=true\n"
    (tmp_path / "serving.properties").write_text(properties + "option.mpi_hosts=a:two\n")
    assert main(["serve", "--model-dir", str(tmp_path), "--port", "1"]) == 2  # port 1: never bound
    expected = "option.mpi_hosts='a:two': expected HOST[:SLOTS][,HOST[:SLOTS]...] such as node1:4,node2:4"
    assert capsys.readouterr().err.strip() == f"lmi: error: invalid configuration {expected}"


def test_the_rank_side_of_placement_stays_on_the_standard_library() -> None:
    # placement runs on every rank (python -m lmi_core.launch.placement) and imports this module.
    show = "import sys, lmi_core.launch.placement; print(' '.join(sorted(sys.modules)))"
    modules = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True, check=True).stdout
    assert "lmi_core.launch.hosts" in modules.split()
    assert not {"pydantic", "lmi_core.config", "pynvml"} & set(modules.split())
