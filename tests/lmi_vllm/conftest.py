"""Fixtures of the vLLM backend tests: a tiny demo model and one AsyncLLM per test module.

Tests marked ``vllm`` need vLLM (``scripts/setup-vllm.sh /work/vllm-venv``); elsewhere they are
skipped, and the pure tests of ``lmi_vllm`` still run from the source tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

REPO = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("lmi_vllm") is None:  # not installed: test the source tree
    sys.path.insert(0, str(REPO / "plugins" / "lmi_vllm"))

# The regular package only: this directory, named vllm too, is a namespace package where tests/ is on
# sys.path.
_spec = importlib.util.find_spec("vllm")
HAVE_VLLM = _spec is not None and _spec.origin is not None

# Small and fast: the KV cache in GiB, and a context that leaves room for long generations.
MAX_MODEL_LEN = 512


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vllm: needs vLLM installed (scripts/setup-vllm.sh)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAVE_VLLM:
        return
    skip = pytest.mark.skip(reason="vLLM is not installed (scripts/setup-vllm.sh VENV)")
    for item in items:
        # The marker itself: "vllm" is also in every item's keywords here (this directory's name).
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vllm_env() -> Iterator[Path]:
    """Offline, 1 GiB of KV cache, vLLM's sockets and temp files in a private short directory."""
    base = Path(tempfile.mkdtemp(prefix="lmi-vllm-"))
    saved = {
        k: os.environ.get(k)
        for k in ("HF_HUB_OFFLINE", "VLLM_CPU_KVCACHE_SPACE", "VLLM_RPC_BASE_PATH", "TMPDIR")
    }
    os.environ.update(
        HF_HUB_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_RPC_BASE_PATH=str(base),
        TMPDIR=str(base),
    )
    tempfile.tempdir = None  # gettempdir() caches; make it read TMPDIR again
    try:
        yield base
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        tempfile.tempdir = None
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_model(vllm_env: Path) -> Path:
    """The lmi demo model (tiny random Llama, head size 32, BPE tokenizer with a chat template)."""
    from lmi_core.demo_model import build_demo_model

    path = vllm_env / "demo"
    build_demo_model(path)
    return path


@pytest.fixture(scope="session")
def pm() -> Any:
    """A plugin manager with only the core's built-ins and this plugin (no other backends)."""
    import lmi_vllm.plugin
    from lmi_core.plugins import new_plugin_manager

    manager = new_plugin_manager(load_entry_points=False)
    manager.register(lmi_vllm.plugin, name="vllm")
    return manager


@pytest.fixture(scope="session")
def max_model_len() -> int:
    return MAX_MODEL_LEN


@pytest.fixture(scope="session")
def worker_context(demo_model: Path) -> Callable[..., Any]:
    """``worker_context(**options)``: the WorkerContext a server would send for the demo model."""
    from lmi_core.engine import WorkerContext

    def make(**options: str) -> Any:
        return WorkerContext(
            model_id=str(demo_model),
            model_dir=str(demo_model),
            backend="vllm",
            options={"max_model_len": str(MAX_MODEL_LEN), **options},
            dtype="float32",
            device="cpu",
            max_batch_size=8,
        )

    return make


@contextlib.asynccontextmanager
async def started_engine(pm: Any, context: Any) -> AsyncIterator[Any]:
    """An engine loaded as a worker loads it: ``load_engine`` in a thread, ``start_engine`` on this
    loop (the engine then lives on it: a module's tests share one loop, ``loop_scope="module"``)."""
    loaded = await asyncio.to_thread(pm.hook.load_engine, context=context)
    try:
        started = pm.hook.start_engine(engine=loaded)
        if started is not None:
            await started
        yield loaded
    finally:
        pm.hook.shutdown_engine(engine=loaded)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(pm: Any, worker_context: Callable[..., Any]) -> AsyncIterator[Any]:
    """One loaded vLLM engine per module (loading takes 16-35 s on CPU)."""
    async with started_engine(pm, worker_context()) as loaded:
        yield loaded
