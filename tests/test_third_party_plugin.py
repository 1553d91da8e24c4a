"""A third-party engine plugin needs nothing but ``pip install`` to be found and served."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lmi_echo"


def test_pip_installed_plugin_serves_requests(
    tmp_path: Path, start_server: Callable[..., ServerProcess], model_dir: Callable[..., Path]
) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(EXAMPLE),
        ],
        check=True,
        capture_output=True,
    )
    directory = model_dir(
        "echo", option__model_id="none", option__backend="echo", option__echo_prefix="you said:"
    )
    env = {"PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    server = start_server("--model-dir", str(directory), env=env)
    response = httpx.post(f"{server.url}/invocations", json={"inputs": "hello plugin world"})
    assert response.json() == {"generated_text": "you said: hello plugin world"}
