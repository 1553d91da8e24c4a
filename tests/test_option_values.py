"""The backend kit's ``option_values``: what a plugin asks before it imports its engine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lmi_core.option_values import importable


def test_importable_finds_a_package_without_importing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "lmi_test_engine").mkdir()
    (tmp_path / "lmi_test_engine" / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (tmp_path / "lmi_test_namespace").mkdir()  # a directory of that name (tests/lmi_vllm), not the package
    monkeypatch.syspath_prepend(str(tmp_path))
    assert importable("lmi_test_engine") and "lmi_test_engine" not in sys.modules
    assert not importable("lmi_test_namespace")
    assert not importable("lmi_test_not_installed")
