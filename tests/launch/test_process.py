"""Worker processes: a Python-mode worker is its own process group in the server's session, an mpirun
job its own session; one kill reaches every process of either; the command line is logged."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time

import pytest

from lmi_core.launch.process import WorkerProcess, session_members
from lmi_core.launch_spec import LaunchSpec

# A leader that starts a child in a process group of its own, as Open MPI does with each ssh client.
SPAWN = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], process_group=0)
print(child.pid, flush=True)
time.sleep(300)
"""


async def test_kill_reaches_children_in_other_process_groups() -> None:
    # An mpirun job: its own session, which holds the children Open MPI moves into other groups.
    spec = LaunchSpec(argv=[sys.executable, "-c", SPAWN], env=dict(os.environ), rank_addresses=[], mode="mpi")
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
    with caplog.at_level(logging.INFO, logger="lmi_core.launch.process"):
        await process.start()
        await process.wait()
    assert f"starting: {sys.executable} -c 'print('\"'\"'hi there'\"'\"')'" in caplog.text


# A parent that starts a child and prints both pids, then both sleep.
TREE = (
    "import os, subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
    "print(os.getpid(), child.pid, flush=True)\n"
    "time.sleep(300)\n"
)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def started_tree() -> tuple[WorkerProcess, int, int]:
    lines: list[str] = []
    worker = WorkerProcess(LaunchSpec([sys.executable, "-c", TREE], dict(os.environ), []), lines.append)
    await worker.start()
    while not lines:
        await asyncio.sleep(0.02)
    parent, child = (int(pid) for pid in lines[0].split())
    return worker, parent, child


def test_worker_is_in_the_servers_session_but_its_own_process_group() -> None:
    async def main() -> None:
        worker, parent, child = await started_tree()
        try:
            # The same session as the server (one autogroup), a group of its own (one killpg).
            assert os.getsid(parent) == os.getsid(0)
            assert os.getpgid(parent) == parent != os.getpgid(0)
            assert os.getpgid(child) == parent
        finally:
            worker.kill()
            await worker.wait()

    asyncio.run(main())


def test_kill_reaches_the_workers_children() -> None:
    async def main() -> None:
        worker, parent, child = await started_tree()
        worker.kill()
        await worker.wait()
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not alive(parent) and not alive(child)

    asyncio.run(main())


def test_stop_reaches_the_workers_children() -> None:
    async def main() -> None:
        worker, _, child = await started_tree()
        await worker.stop(grace=5.0)
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not alive(child)

    asyncio.run(main())
