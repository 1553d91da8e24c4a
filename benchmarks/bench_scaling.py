"""Requests/s of one CPU worker vs two, on a CPU-bound model: does a second worker double throughput?

Builds a bigger demo model, then starts ``lmi serve`` twice, with ``minWorkers=maxWorkers=1`` and
then ``2``. ``option.max_rolling_batch_size=1`` keeps the engine from batching, so throughput can
only come from more workers. Each run keeps ``--concurrency`` non-streamed requests in flight for
``--duration`` seconds (after a warm-up) and counts those completed.

Threads: each worker gets ``--threads`` OMP threads in both runs (default 1), so the runs compare
workers that have cores of their own: 2 workers need 2 idle cores. ``--threads 0`` lets the server
split the cores instead (1 worker gets them all, 2 workers half each), as a default deployment does.

Usage: python benchmarks/bench_scaling.py [--hidden-size 1024] [--layers 8] [--duration 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Server, model_dir
from lmi_core.demo_model import build_demo_model


async def measure(url: str, body: dict[str, object], concurrency: int, duration: float) -> list[float]:
    """Keep ``concurrency`` requests in flight for ``duration`` s; latencies of those completed in it."""
    latencies: list[float] = []
    stop_at = time.monotonic() + duration

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            sent = time.monotonic()
            (await client.post(f"{url}/invocations", json=body)).raise_for_status()
            if time.monotonic() <= stop_at:
                latencies.append(time.monotonic() - sent)

    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return latencies


def run(base: Path, model: Path, workers: int, args: argparse.Namespace) -> float:
    """Requests/s with ``workers`` workers; prints one line."""
    properties = {"minWorkers": workers, "maxWorkers": workers, "option.max_rolling_batch_size": 1}
    directory = model_dir(base, "bench", model, {k: str(v) for k, v in properties.items()})
    # Empty: the server splits the cores among the workers.
    env = {"OMP_NUM_THREADS": str(args.threads) if args.threads else "", "LMI_LOG_LEVEL": "WARNING"}
    parameters = {"max_new_tokens": args.max_new_tokens, "ignore_eos_token": True}
    body: dict[str, object] = {"inputs": "Hello", "parameters": parameters}
    with Server(directory, env) as server:
        [workflow] = httpx.get(f"{server.url}/models/bench").json()
        [group] = workflow["models"][0]["workerGroups"]
        threads = sorted(w["threads"] for w in group["workers"])
        asyncio.run(measure(server.url, body, args.concurrency, 3.0))  # warm-up: first requests are slow
        latencies = asyncio.run(measure(server.url, body, args.concurrency, args.duration))
    rate: float = len(latencies) / args.duration
    print(
        f"{workers} worker(s), threads {threads}: {len(latencies)} requests in {args.duration:g} s = "
        f"{rate:.2f} req/s (p50 latency {statistics.median(latencies):.2f} s)",
        flush=True,
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4, help="requests kept in flight")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds measured per run")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per worker; 0: the server splits")
    args = parser.parse_args()
    print(f"cores available: {len(os.sched_getaffinity(0))}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lmi-bench-scaling-") as tmp:
        base = Path(tmp)
        model = build_demo_model(
            base / "model", hidden_size=args.hidden_size, num_layers=args.layers, num_heads=8, num_kv_heads=8
        )
        one = run(base, model, 1, args)
        two = run(base, model, 2, args)
    print(f"ratio (2 workers / 1 worker): {two / one:.2f}x")


if __name__ == "__main__":
    main()
