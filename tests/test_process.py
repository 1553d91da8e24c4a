"""A worker runs in its own process group inside the server's session, and one kill reaches its tree."""

from __future__ import annotations

import asyncio
import os
import sys
import time

from lmi_core.launch_spec import LaunchSpec
from lmi_core.process import WorkerProcess

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
