"""Worker process groups: the command line is logged, and teardown reaches every process of the session."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time

import pytest

from lmi_core.launch_spec import LaunchSpec
from lmi_core.process import WorkerProcess, session_members

# A leader that starts a child in a process group of its own, as Open MPI does with each ssh client.
SPAWN = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], process_group=0)
print(child.pid, flush=True)
time.sleep(300)
"""


async def test_kill_reaches_children_in_other_process_groups() -> None:
    spec = LaunchSpec(argv=[sys.executable, "-c", SPAWN], env=dict(os.environ), rank_addresses=[])
    lines: list[str] = []
    process = WorkerProcess(spec, on_line=lines.append)
    await process.start()
    deadline = time.monotonic() + 30
    while not lines and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    child = int(lines[0])
    try:
        assert process.pid is not None and os.getpgid(child) != os.getpgid(process.pid)
        assert child in session_members(process.pid)
        process.kill()
        # Bounded: with the child alive, asyncio may wait on the pipe it holds open.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(process.wait(), timeout=20)
        deadline = time.monotonic() + 10
        while child in session_members(process.pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert child not in session_members(process.pid)  # killpg alone leaves it running
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


async def test_the_command_line_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    argv = [sys.executable, "-c", "print('hi there')"]
    spec = LaunchSpec(argv=argv, env=dict(os.environ), rank_addresses=[])
    process = WorkerProcess(spec)
    with caplog.at_level(logging.INFO, logger="lmi_core.process"):
        await process.start()
        await process.wait()
    assert f"starting: {sys.executable} -c 'print('\"'\"'hi there'\"'\"')'" in caplog.text
