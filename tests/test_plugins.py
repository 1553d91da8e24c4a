"""Plugin discovery: built-ins, installed entry points, LMI_PLUGINS and LMI_EXTRA_PLUGINS."""

from __future__ import annotations

import sys
import types

import pytest

from lmi_core import hookimpl
from lmi_core.backends import BackendSpec, installed_backends
from lmi_core.plugins import DEFAULT_PLUGINS, new_plugin_manager


def test_builtin_launchers_and_installed_hf_backend_are_found() -> None:
    pm = new_plugin_manager()
    names = {pm.get_name(p) for p in pm.get_plugins()}
    assert set(DEFAULT_PLUGINS) <= names
    assert "hf" in installed_backends(pm)  # via the lmi entry point of the lmi-hf distribution


def test_lmi_plugins_allow_list_restricts_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMI_PLUGINS", "nothing-installed-by-this-name")
    assert "hf" not in installed_backends(new_plugin_manager())


def test_extra_plugin_module_is_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("lmi_test_extra_plugin")

    @hookimpl
    def register_backends() -> list[BackendSpec]:
        return [BackendSpec(name="third-party", default_mode="mpi")]

    module.register_backends = register_backends  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setenv("LMI_EXTRA_PLUGINS", module.__name__)
    specs = installed_backends(new_plugin_manager())
    assert specs["third-party"].default_mode == "mpi"


def test_an_installed_plugin_named_in_extra_plugins_registers_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import lmi_hf.plugin

    monkeypatch.setenv("LMI_EXTRA_PLUGINS", "lmi_hf.plugin")
    pm = new_plugin_manager()  # lmi_hf is also installed as the entry point "hf"
    assert [p for p in pm.get_plugins() if p is lmi_hf.plugin] == [lmi_hf.plugin]
