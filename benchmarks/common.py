"""Helpers shared by the benchmarks: start a real server, stream requests, summarize latencies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from lmi_core.launch.launchers import free_ports

ROOT = Path(__file__).resolve().parent.parent


def model_dir(base: Path, name: str, source: Path | None, properties: dict[str, str]) -> Path:
    """A model directory: ``source``'s files linked in, plus the given serving.properties."""
    directory = base / name
    directory.mkdir(parents=True, exist_ok=True)
    if source is not None:
        for item in source.iterdir():
            if item.name != "serving.properties" and not (directory / item.name).exists():
                (directory / item.name).symlink_to(item)
    (directory / "serving.properties").write_text("".join(f"{k}={v}\n" for k, v in properties.items()))
    return directory


def lmi_command(directory: Path, name: str) -> list[str]:
    """``lmi serve`` of ``directory`` under the model name ``name``, with this interpreter."""
    return [sys.executable, "-m", "lmi_core", "serve", "--model-dir", str(directory), "--model-name", name]


class Server:
    """A server in a subprocess; ``ready_seconds`` is the time from spawn to ``ready_path`` answering 200.

    ``command`` defaults to ``lmi serve --model-dir DIRECTORY``; any command taking ``--port`` works (the
    port is appended), such as vLLM's own OpenAI server with ``ready_path="/health"``.
    """

    def __init__(
        self,
        directory: Path | None,
        env: dict[str, str] | None = None,
        *,
        command: list[str] | None = None,
        ready_path: str = "/ping",
        timeout: float = 180.0,
        cwd: Path = ROOT,
    ) -> None:
        self.port = free_ports()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115  # open for the process's lifetime
            prefix="lmi-bench-", suffix=".log", delete=False
        )
        # This checkout first; the caller's PYTHONPATH (a worktree's plugins) after it.
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **(env or {})}
        if command is None:
            command = [sys.executable, "-m", "lmi_core", "serve", "--model-dir", str(directory)]
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [*command, "--port", str(self.port)],
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            # A group of its own (one killpg ends it) in the client's session, as from a user's shell:
            # with sched_autogroup_enabled=1 a new session is a scheduling group of its own.
            process_group=0,
            cwd=cwd,  # python -m imports from here first
        )
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited; log: {self.log.name}")
            try:
                if httpx.get(f"{self.url}{ready_path}", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(f"server not ready; log: {self.log.name}")
        self.ready_seconds = time.monotonic() - started

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        # Whatever the server left behind in its process group (an engine process) must not load the next run.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class StreamResult:
    ttft: float
    total: float
    tokens: int
    gaps: list[float] = field(default_factory=list)
    worker: str | None = None  # lmi's x-lmi-worker: which worker served it
    text: str = ""  # the text streamed (stream_openai)


StreamFn = Callable[[httpx.AsyncClient, str, str, int], Awaitable[StreamResult]]


class ArrivalClock:
    """Times the arrivals of one stream: the first (TTFT) and the gaps between the next ones."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first = 0.0
        self.arrivals = 0
        self.gaps: list[float] = []
        self._last = self.started

    def tick(self) -> None:
        now = time.perf_counter()
        self.arrivals += 1
        if self.arrivals == 1:
            self.first = now - self.started
        else:
            self.gaps.append(now - self._last)
        self._last = now

    def result(self, tokens: int, worker: str | None = None, text: str = "") -> StreamResult:
        return StreamResult(self.first, time.perf_counter() - self.started, tokens, self.gaps, worker, text)


async def stream_lmi(client: httpx.AsyncClient, url: str, prompt: str, max_new_tokens: int) -> StreamResult:
    """One streamed LMI request; time to first token and per-token gaps."""
    body = {
        "inputs": prompt,
        "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos_token": True},
        "stream": True,
    }
    clock = ArrivalClock()
    async with client.stream("POST", f"{url}/invocations", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line and "token" in json.loads(line):
                clock.tick()
    return clock.result(clock.arrivals)


async def stream_openai(
    client: httpx.AsyncClient,
    url: str,
    prompt: str,
    max_new_tokens: int,
    model: str = "demo",
    headers: dict[str, str] | None = None,
) -> StreamResult:
    """One streamed OpenAI ``/v1/completions`` request (server-sent events), greedy, EOS ignored;
    an ``httpx.HTTPStatusError`` when the server refuses it.

    A chunk carrying text (or an unfinished choice) is a token arrival (its text may be empty: a byte
    piece); the token count is the server's ``usage``, since a server may put the last token and the
    finish into one chunk.
    """
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_new_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    clock, tokens, pieces = ArrivalClock(), 0, []
    async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as response:
        response.raise_for_status()
        worker = response.headers.get("x-lmi-worker")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            choice = chunk["choices"][0] if chunk.get("choices") else None
            if choice is None or not (choice["text"] or choice["finish_reason"] is None):
                continue
            pieces.append(choice["text"])
            clock.tick()
    return clock.result(tokens, worker, "".join(pieces))


async def run_concurrent(
    url: str, prompts: list[str], concurrency: int, max_new_tokens: int, stream: StreamFn = stream_lmi
) -> tuple[float, list[StreamResult]]:
    """Send every prompt with at most ``concurrency`` in flight; return wall time and results."""
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:

        async def one(prompt: str) -> StreamResult:
            async with limit:
                return await stream(client, url, prompt, max_new_tokens)

        started = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in prompts))
        return time.perf_counter() - started, list(results)


def process_cpu(root: int) -> dict[int, tuple[str, float]]:
    """pid -> (name, CPU seconds so far) of ``root`` and its live descendants, from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    table: dict[int, tuple[int, str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), name, (int(fields[11]) + int(fields[12])) / tick)
    found = {root} if root in table else set()
    frontier = list(found)
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _, _) in table.items() if ppid == parent and pid not in found]
        found.update(children)
        frontier.extend(children)
    return {pid: table[pid][1:] for pid in found}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def heartbeat_summary(url: str) -> str:
    """How promptly lmi's workers answered health-check pings so far (``lmi_worker_heartbeat_seconds``):
    the count, the mean, and the slowest bucket reached; a busy worker loop shows here first."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[float, float] = {}
    count = total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        if family.name != "lmi_worker_heartbeat_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
            elif sample.name.endswith("_sum"):
                total += sample.value
    if not count:
        return "no heartbeat observed"
    slowest = min(bound for bound, seen in buckets.items() if seen >= count)
    within = {bound: buckets[bound] / count for bound in (0.005, 0.05) if bound in buckets}
    shares = ", ".join(f"{share:.1%} within {bound * 1000:g} ms" for bound, share in within.items())
    mean = total / count * 1000
    return f"{count:.0f} pings, mean {mean:.2f} ms, {shares}, all within {slowest * 1000:g} ms"
