"""OS processes of workers: start in their own process group, tag their output, kill the whole tree.

A Python-mode worker runs in its own process group, so that one ``killpg`` reaches every process of
it (vLLM's engine processes included), but in the server's session: with the kernel's default
``sched_autogroup_enabled=1`` (Debian, Ubuntu) every session is a scheduling group of its own, and a
worker in a new session (``setsid``) whose engine busy-waits (vLLM's EngineCore spins on
``sched_yield`` during a step) starved the server's session: clients got each stream all at once at
its end (TTFT 12-20x vLLM's own server on 2 cores; ``docs/benchmarks.md``). An ``mpirun`` job runs
in a session of its own instead: Open MPI moves each ssh client and local rank into a process group
of its own, and only the session still holds them all (``kill``). ``PR_SET_PDEATHSIG``
makes the kernel kill it if the server dies, even by SIGKILL; ranks set it themselves and also watch
the server's pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
from collections.abc import Callable
from pathlib import Path

from lmi_core.launch_spec import LaunchSpec
from lmi_core.worker.rank_server import set_parent_death_signal

logger = logging.getLogger("lmi_core.worker_output")
_log = logging.getLogger(__name__)

# Output lines kept per worker for error messages when a start fails.
TAIL_LINES = 40


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (field 6 of ``/proc/PID/stat``), in any process group."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after ")": state, ppid, pgrp, session
            members.append(int(entry.name))
    return members


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
        _log.info("[%s] starting: %s", self.spec.label, shlex.join(self.spec.argv))
        mpi = self.spec.mode == "mpi"
        self.process = await asyncio.create_subprocess_exec(
            *self.spec.argv,
            env=self.spec.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Python mode: its own group in the server's session (autogroup); MPI: its own session.
            process_group=None if mpi else 0,
            start_new_session=mpi,
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
        """SIGKILL the worker's process group and, for an ``mpirun`` job, its whole session.

        Open MPI moves each ssh client (and each local rank) into a process group of its own, so
        ``killpg`` alone leaves an ``ssh ... prted`` behind when a partition keeps it from noticing
        that mpirun is gone; the job's session holds them all, orphans included. A Python-mode worker
        leads no session (it is in the server's), so ``session_members`` finds nothing for it.
        """
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in session_members(self.process.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        # os.kill, not Popen.kill: Popen.send_signal first polls, which reaps an exited leader with
        # waitpid behind asyncio's child watcher, which then logs "Unknown child process pid N" and
        # reports 255 instead of the real status (-9 for a SIGKILL). Not once reaped (the pid is free).
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)

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
