"""Helpers shared by the benchmarks: start a real server, stream requests, summarize latencies."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


class Server:
    """``lmi serve`` in a subprocess; ``ready_seconds`` is the time from spawn to /ping 200."""

    def __init__(self, directory: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="lmi-bench-", suffix=".log", delete=False)
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmi_core", "serve", "--model-dir", str(directory), "--port", str(self.port)],
            env=full_env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
        )
        deadline = started + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited; log: {self.log.name}")
            try:
                if httpx.get(f"{self.url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        else:
            raise RuntimeError(f"server not ready; log: {self.log.name}")
        self.ready_seconds = time.monotonic() - started

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)

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


async def stream_lmi(client: httpx.AsyncClient, url: str, prompt: str, max_new_tokens: int) -> StreamResult:
    """One streamed LMI request; time to first token and per-token gaps."""
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos_token": True}, "stream": True}
    started = time.perf_counter()
    first, last, tokens, gaps = 0.0, started, 0, []
    async with client.stream("POST", f"{url}/invocations", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line:
                continue
            now = time.perf_counter()
            if "token" in json.loads(line):
                tokens += 1
                if tokens == 1:
                    first = now - started
                else:
                    gaps.append(now - last)
                last = now
    return StreamResult(first, time.perf_counter() - started, tokens, gaps)


async def run_concurrent(url: str, prompts: list[str], concurrency: int, max_new_tokens: int) -> tuple[float, list[StreamResult]]:
    """Send every prompt with at most ``concurrency`` in flight; return wall time and results."""
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:

        async def one(prompt: str) -> StreamResult:
            async with limit:
                return await stream_lmi(client, url, prompt, max_new_tokens)

        started = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in prompts))
        return time.perf_counter() - started, list(results)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
