"""OS processes of workers: start in their own process group, tag their output, kill the whole tree.

A worker (a Python process or an ``mpirun`` job and its ranks) runs in its own process group, so that
one ``killpg`` reaches every process of it, but in the server's session: with the kernel's default
``sched_autogroup_enabled=1`` (Debian, Ubuntu) every session is a scheduling group of its own, and a
worker in a new session (``setsid``) whose engine busy-waits (vLLM's EngineCore spins on
``sched_yield`` during a step) starved the server's session: clients got each stream all at once at
its end (TTFT 12-20x vLLM's own server on 2 cores; ``docs/benchmarks.md``). ``PR_SET_PDEATHSIG``
makes the kernel kill it if the server dies, even by SIGKILL; ranks set it themselves and also watch
the server's pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable

from lmi_core.launch_spec import LaunchSpec
from lmi_core.worker import set_parent_death_signal

logger = logging.getLogger("lmi_core.worker_output")

# Output lines kept per worker for error messages when a start fails.
TAIL_LINES = 40


class WorkerProcess:
    """One started worker process group and its output."""

    def __init__(self, spec: LaunchSpec, on_line: Callable[[str], None] | None = None) -> None:
        self.spec = spec
        self.process: asyncio.subprocess.Process | None = None
        self.tail: list[str] = []
        self._on_line = on_line
        self._pumps: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process else None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *self.spec.argv,
            env=self.spec.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            process_group=0,  # its own group, the server's session (autogroup): see above
            preexec_fn=set_parent_death_signal,
        )
        assert self.process.stdout is not None
        self._pumps.append(asyncio.get_running_loop().create_task(self._pump(self.process.stdout)))

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await stream.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue  # an overlong line: drop it, keep reading
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip()
            self.tail = [*self.tail, line][-TAIL_LINES:]
            logger.info("[%s pid %s] %s", self.spec.label, self.pid, line)
            if self._on_line is not None:
                self._on_line(line)

    async def wait(self) -> int:
        assert self.process is not None
        code = await self.process.wait()
        # Drain the output so the last lines (the traceback of a crash) reach the log.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._pumps), timeout=2.0)
        return code

    def kill(self) -> None:
        """SIGKILL the whole process group: the worker, mpirun and every rank it started."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    async def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the group, then SIGKILL what is left after ``grace`` seconds; reap it."""
        if self.process is None or self.process.returncode is not None:
            self.kill()  # the leader is gone but ranks may not be
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout=grace)
        except asyncio.TimeoutError:
            pass
        self.kill()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.process.wait(), timeout=5.0)
