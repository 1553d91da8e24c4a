"""Backend selection from option.backend / option.rolling_batch, and mode resolution."""

from __future__ import annotations

import pytest

from lmi_core import hookimpl
from lmi_core.backends import BackendSpec, resolve_model, select_backend
from lmi_core.config import build_model_config
from lmi_core.errors import ConfigError
from lmi_core.plugins import new_plugin_manager


class FakeBackends:
    @hookimpl
    def register_backends(self) -> list[BackendSpec]:
        return [
            BackendSpec(name="fast", rolling_batch=("fast",), auto_priority=1, default_mode="mpi"),
            BackendSpec(name="slow", rolling_batch=("disable",), auto_priority=50),
        ]


@pytest.fixture
def pm():
    manager = new_plugin_manager(load_entry_points=False)
    manager.register(FakeBackends())
    return manager


def test_auto_picks_the_preferred_installed_backend(pm) -> None:
    assert select_backend(pm, None, None).name == "fast"
    assert select_backend(pm, None, "auto").name == "fast"
    assert select_backend(pm, None, "disable").name == "slow"
    assert select_backend(pm, "slow", "fast").name == "slow"  # option.backend wins


def test_unknown_backend_lists_the_installed_ones(pm) -> None:
    with pytest.raises(ConfigError) as info:
        select_backend(pm, "vllm-gpu", None)
    assert info.value.key == "option.backend"
    assert "fast" in str(info.value) and "slow" in str(info.value)
    with pytest.raises(ConfigError, match=r"option.rolling_batch.*disable, fast"):
        select_backend(pm, None, "trtllm")


@pytest.mark.parametrize(
    ("properties", "mode"),
    [
        ({}, "mpi"),  # the backend's default
        ({"option.mpi_mode": "false"}, "python"),  # explicit option wins
        ({"option.backend": "slow"}, "python"),
        ({"option.backend": "slow", "engine": "MPI"}, "mpi"),
        ({"option.backend": "slow", "engine": "MPI", "option.mpi_mode": "false"}, "python"),
    ],
)
def test_mode_resolution(pm, properties: dict[str, str], mode: str) -> None:
    config = resolve_model(build_model_config({"option.model_id": "/m", **properties}, environ={}), pm)
    assert config.mode == mode


def test_hf_defaults_to_python_mode() -> None:
    config = build_model_config({"option.model_id": "/m", "option.rolling_batch": "disable"}, environ={})
    config = resolve_model(config, new_plugin_manager())
    assert (config.backend, config.mode) == ("hf", "python")


def test_hf_rejects_unknown_options_naming_them() -> None:
    config = build_model_config(
        {"option.model_id": "/m", "option.backend": "hf", "option.max_modle_len": "9"}, environ={}
    )
    with pytest.raises(ConfigError, match=r"option\.max_modle_len"):
        resolve_model(config, new_plugin_manager())


def test_list_backends_names_the_distribution_of_each(pm) -> None:
    from lmi_core.backends import list_backends

    listed = {b.spec.name: b for b in list_backends(pm)}
    assert set(listed) == {"fast", "slow", "handler"}  # handler: built in, for handle() models
    assert listed["fast"].spec.default_mode == "mpi"
    assert listed["fast"].distribution is None  # registered by hand, not by an installed package


def test_lmi_backends_lists_the_installed_plugins() -> None:
    import json
    import subprocess
    import sys

    run = [sys.executable, "-m", "lmi_core.cli", "backends"]
    table = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert table.splitlines()[0].split() == ["backend", "default_mode", "rolling_batch", "distribution"]
    rows = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True, check=True).stdout)
    hf = next(r for r in rows if r["backend"] == "hf")
    assert hf["default_mode"] == "python"
    assert hf["distribution"].startswith("lmi-hf ")
    assert "transformers" in hf["description"]
    assert "hf " in table and "lmi-hf" in table


def test_an_unknown_reasoning_parser_fails_the_load_naming_the_option() -> None:
    config = build_model_config({"option.model_id": "/m", "option.reasoning_parser": "qwen"}, environ={})
    with pytest.raises(ConfigError, match=r"option\.reasoning_parser='qwen'.*qwen3"):
        resolve_model(config, new_plugin_manager())
    config = build_model_config({"option.model_id": "/m", "option.reasoning_parser": "qwen3"}, environ={})
    assert resolve_model(config, new_plugin_manager()).options["reasoning_parser"] == "qwen3"
