"""A vLLM engine whose engine-core process dies: stats raise (the worker reports it unhealthy)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest

from lmi_core.engine import GenerationRequest, SamplingParams
from lmi_core.errors import EngineError

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]  # the engine fixture's loop


def engine_core_pids() -> list[int]:
    """vLLM's engine-core processes started by this test process."""
    import psutil  # a vLLM dependency

    pids = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "EngineCore" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.Error:  # gone or a zombie meanwhile
            continue
    return pids


async def test_killed_engine_core_makes_stats_raise_and_requests_fail(pm: Any, engine: Any) -> None:
    pm.hook.engine_stats(engine=engine)  # healthy
    pids = engine_core_pids()
    assert pids, "vLLM's engine core runs in its own process"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        try:
            pm.hook.engine_stats(engine=engine)
        except EngineError as exc:
            assert "dead" in str(exc)
            break
        assert time.monotonic() < deadline, "engine_stats never noticed the dead engine core"
        await asyncio.sleep(0.2)
    request = GenerationRequest(request_id="dead", prompt="hello", params=SamplingParams(max_new_tokens=2))
    with pytest.raises(EngineError):
        async for _ in pm.hook.handle_request(engine=engine, request=request):
            pass
