"""The TensorRT-LLM releases lmi_trtllm accepts, and the load-time refusal of any other, with fake
``tensorrt_llm`` packages (a directory on ``sys.path``, with or without distribution metadata): the
version is read from metadata or ``version.py``, never by importing TensorRT-LLM."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lmi_core.engine import WorkerContext
from lmi_core.errors import EngineError
from lmi_core.option_values import importable
from lmi_trtllm import versions
from lmi_trtllm.engine import load, require_tensorrt_llm

ROOT = Path(__file__).resolve().parents[2]

# The fakes shadow the package, not a real installation's distribution metadata.
no_real_tensorrt_llm = pytest.mark.skipif(
    importable("tensorrt_llm"), reason="a real TensorRT-LLM is installed"
)


@pytest.mark.parametrize(
    ("version", "accepted"),
    [
        ("1.2.1", True),
        ("1.2.3", True),
        ("1.2.1.post1", True),
        ("1.2.1+cu130", True),
        ("1.2.2rc1", True),  # a pre-release of a supported release
        ("1.2.1rc1", False),  # older than 1.2.1
        ("1.2.1.dev0", False),
        ("1.2.0", False),
        ("1.1.0", False),
        ("0.21.0", False),
        ("1.3.0rc1", False),  # <1.3 leaves out 1.3's pre-releases too
        ("1.3", False),
        ("2.0.0", False),
        ("unknown", False),
    ],
)
def test_supported_releases(version: str, accepted: bool) -> None:
    assert versions.supported(version) is accepted


def test_the_extra_states_the_supported_range() -> None:
    pyproject = (ROOT / "plugins" / "lmi_trtllm" / "pyproject.toml").read_text()
    assert f'\ntrtllm = ["tensorrt-llm{versions.SUPPORTED}"]\n' in pyproject
    assert versions.supported(versions.MANIFEST_RELEASE)


def fake_tensorrt_llm(root: Path, version: str | None, metadata: str | None = None) -> None:
    """An importable ``tensorrt_llm`` under ``root``: ``version.py`` saying ``version`` (None: none),
    and distribution metadata saying ``metadata`` (None: none)."""
    package = root / "tensorrt_llm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('a fake TensorRT-LLM: never imported')\n")
    if version is not None:
        (package / "version.py").write_text(f'__version__ = "{version}"\n')
    if metadata is not None:
        info = root / f"tensorrt_llm-{metadata}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tensorrt-llm\nVersion: {metadata}\n")


@pytest.fixture
def context() -> WorkerContext:
    return WorkerContext(model_id="/models/m", model_dir=None, backend="trtllm", options={}, device="cuda")


@no_real_tensorrt_llm
def test_an_old_release_fails_the_load_naming_the_installed_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, context: WorkerContext
) -> None:
    fake_tensorrt_llm(tmp_path, "1.1.0")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert versions.installed_version() == "1.1.0"
    with pytest.raises(
        EngineError, match=r"supports tensorrt-llm>=1\.2\.1,<1\.3 .* has tensorrt-llm 1\.1\.0"
    ):
        load(context)


@no_real_tensorrt_llm
def test_distribution_metadata_comes_before_version_py(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, context: WorkerContext
) -> None:
    fake_tensorrt_llm(tmp_path, "1.2.1", metadata="1.4.0rc1")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EngineError, match=r"has tensorrt-llm 1\.4\.0rc1: install a supported release"):
        load(context)


@no_real_tensorrt_llm
def test_a_supported_release_passes_the_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_tensorrt_llm(tmp_path, "1.2.1")
    monkeypatch.syspath_prepend(str(tmp_path))
    require_tensorrt_llm()


@no_real_tensorrt_llm
def test_an_unknown_version_is_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake_tensorrt_llm(tmp_path, None)
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="lmi_trtllm.engine"):
        require_tensorrt_llm()
    assert "cannot tell which TensorRT-LLM is installed" in caplog.text
