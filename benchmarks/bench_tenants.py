"""Tenants under a flood: B's TTFT while A floods, token shares by weight, the server's CPU per token.

One worker (no scale-up) of the synthetic engine at a fixed speed (``option.token_interval``: one token per
interval per request, whatever the batch) with ``--slots`` places; streamed OpenAI completions of
``--tokens`` tokens on average (each drawn from half to one and a half times that: requests of one
length would start and end in lockstep, so a place would free once per request length rather than
every length / places, as under real traffic). Tenant A keeps ``--flood`` streams going (a closed
loop: each sends its next request when one ends; after a 429 it waits the ``Retry-After`` seconds,
as a client should); tenant B sends one request at a time.

Scenarios, each on a fresh server, ``--seconds`` long (the three flood ones ``--rounds`` times,
interleaved):

- **alone**: B only (its TTFT is the reference);
- **fifo**: the flood with no tenants file: A and B are one tenant, so B waits behind A's backlog;
- **fair**: the flood with tenants a and b (weight 1 each, no budget): B's request goes before A's
  backlog, and A, at its share, leaves the last place free for B (``fairness.PlaceShares``);
- **budget**: as fair, with A's ``max_concurrency`` ``--slots`` - 2: A's excess is refused (429)
  and B finds a free place;
- **weights**: A and B both flood (``--flood`` / 2 streams each), weights 2:1, no budget, for
  ``--weights-seconds``: tokens served per tenant.

Printed: B's TTFT p95 of each flood scenario / alone; A's and B's tokens/s; the server process's CPU
per token served, with tenants / without (fair / fifo); the token share ratio A:B under 2:1 weights;
and the fairness machinery alone (queue and service ledger, in process) in microseconds per token,
as a share of the server's CPU per token.

    .venv/bin/python benchmarks/bench_tenants.py [--seconds 20] [--weights-seconds 60] [--flood 32]
                                                 [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Server, model_dir, percentile, process_cpu, stream_openai
from lmi_core.serving.fairness import OUTPUT_COST, FairQueue, PlaceShares
from lmi_core.serving.tenants import key_digest

MODEL = "synthetic"
KEYS = {"a": "bench-key-a", "b": "bench-key-b"}


@dataclass
class Traffic:
    """What one tenant's clients saw."""

    tokens: int = 0
    refused: int = 0
    ttfts: list[float] = field(default_factory=list)
    client_cpu: float = 0.0  # CPU seconds of the tenant's client process


def tenants_file(path: Path, a: str, b: str) -> Path:
    path.write_text(
        "tenants:\n"
        f'  a: {{api_keys: ["{key_digest(KEYS["a"])}"]{a}}}\n'
        f'  b: {{api_keys: ["{key_digest(KEYS["b"])}"]{b}}}\n'
    )
    return path


async def traffic(url: str, streams: dict[str, int], seconds: float, tokens: int) -> dict[str, Traffic]:
    """``streams[tenant]`` closed-loop streams per tenant for ``seconds``."""
    seen = {tenant: Traffic() for tenant in streams}
    end = time.monotonic() + seconds
    lengths = random.Random(0)

    async def loop(client: httpx.AsyncClient, tenant: str) -> None:
        while time.monotonic() < end:
            try:
                length = lengths.randint(max(1, tokens // 2), max(1, tokens * 3 // 2))
                result = await stream_openai(client, url, "Hello", length, MODEL)
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 429:
                    raise
                seen[tenant].refused += 1
                await asyncio.sleep(float(exc.response.headers.get("retry-after", "1")))
                continue
            seen[tenant].tokens += result.tokens
            seen[tenant].ttfts.append(result.ttft)

    clients = {
        tenant: httpx.AsyncClient(
            timeout=600,
            headers={"Authorization": f"Bearer {KEYS[tenant]}"},
            limits=httpx.Limits(max_connections=count + 4),
        )
        for tenant, count in streams.items()
    }
    try:
        await asyncio.gather(
            *(loop(clients[tenant], tenant) for tenant, count in streams.items() for _ in range(count))
        )
    finally:
        for client in clients.values():
            await client.aclose()
    return seen


def tenant_traffic(url: str, tenant: str, count: int, seconds: float, tokens: int) -> tuple[Traffic, float]:
    """One tenant's ``count`` streams, in this process: what they saw, and the CPU seconds it took."""
    started = time.process_time()
    seen = asyncio.run(traffic(url, {tenant: count}, seconds, tokens))[tenant]
    return seen, time.process_time() - started


def clients(
    url: str, streams: dict[str, int], seconds: float, tokens: int
) -> tuple[dict[str, Traffic], dict[str, float]]:
    """Each tenant's streams from a client process of its own, as tenants are: A's 32 streams on B's
    event loop delayed B's first chunks (B's TTFT p95 read 3.2x alone where its own process reads
    less). Returns the traffic and each client's CPU seconds."""
    with ProcessPoolExecutor(len(streams)) as pool:
        futures = {t: pool.submit(tenant_traffic, url, t, n, seconds, tokens) for t, n in streams.items()}
        results = {tenant: future.result() for tenant, future in futures.items()}
    return {t: seen for t, (seen, _) in results.items()}, {t: cpu for t, (_, cpu) in results.items()}


def scenario(
    root: Path, name: str, tenants: Path | None, streams: dict[str, int], args: argparse.Namespace
) -> tuple[dict[str, Traffic], float, float]:
    """One server: (per tenant traffic, wall seconds, the server process's CPU seconds)."""
    properties = {
        "option.model_id": MODEL,
        "option.served_model_name": MODEL,
        "option.backend": "synthetic",
        "option.token_interval": str(args.interval),
        "option.max_rolling_batch_size": str(args.slots),
        "minWorkers": "1",
        "maxWorkers": "1",  # no scale-up: the flood must contend for the places
        "job_queue_size": "10000",
    }
    env = {"LMI_EXTRA_PLUGINS": "benchmarks.synthetic_engine"}
    if tenants is not None:
        env["SERVING_TENANTS_FILE"] = str(tenants)
    seconds = args.weights_seconds if name == "weights" else args.seconds
    with Server(model_dir(root, f"{MODEL}-{name}", None, properties), env) as server:
        asyncio.run(traffic(server.url, {t: 1 for t in streams}, 1.0, args.tokens))  # warm up
        before = process_cpu(server.proc.pid)[server.proc.pid][1]
        started = time.monotonic()
        seen, client_cpu = clients(server.url, streams, seconds, args.tokens)
        wall = time.monotonic() - started
        cpu = process_cpu(server.proc.pid)[server.proc.pid][1] - before
    for tenant, used in client_cpu.items():
        seen[tenant].client_cpu = used
    return seen, wall, cpu


def machinery_us_per_token(tokens: int, requests: int = 20_000) -> float:
    """The fairness machinery's own CPU time per token, in process: per request a push, a peek, a
    take and the place shares' bookkeeping at the reserve (two tenants backlogged, its costliest
    path), per token one service charge. CPU time, as the server's is measured: wall time on a
    shared machine counts other processes' slices."""
    queue: FairQueue[int] = FairQueue()
    shares = PlaceShares()
    now = 0.0
    started = time.process_time()
    for i in range(requests):
        tenant = "ab"[i % 2]
        shares.came(tenant, 1.0 + i % 2, now)
        queue.push(i, tenant, 1.0 + i % 2, cost=4.0)
        entry = queue.peek(now)
        if entry is not None and shares.may_take(entry.tenant, 1, 8, now):
            queue.take(entry, now)
            shares.took(entry.tenant)
        for _ in range(tokens):
            queue.charge(tenant, OUTPUT_COST, now)
        shares.released(tenant, now)
        now += 0.001
    return (time.process_time() - started) / (requests * tokens) * 1e6


@dataclass
class Totals:
    """One scenario's traffic over its rounds."""

    seen: dict[str, Traffic] = field(default_factory=dict)
    wall: float = 0.0
    cpu: float = 0.0  # the server process's CPU seconds

    def add(self, seen: dict[str, Traffic], wall: float, cpu: float) -> None:
        for tenant, traffic in seen.items():
            total = self.seen.setdefault(tenant, Traffic())
            total.tokens += traffic.tokens
            total.refused += traffic.refused
            total.ttfts += traffic.ttfts
            total.client_cpu += traffic.client_cpu
        self.wall += wall
        self.cpu += cpu

    @property
    def cpu_per_token(self) -> float:
        return self.cpu / max(1, sum(t.tokens for t in self.seen.values()))


def run(root: Path, args: argparse.Namespace) -> dict[str, float]:
    """Every scenario; the figures as ratios (and the raw values they come from). The flood
    scenarios run ``args.rounds`` times, interleaved, so that a shared machine's load drifts alike
    over all of them."""
    flood = {"a": args.flood, "b": 1}
    plain = tenants_file(root / "plain.yaml", "", "")
    budget = tenants_file(root / "budget.yaml", f", max_concurrency: {max(1, args.slots - 2)}", "")
    weighted = tenants_file(root / "weighted.yaml", ", weight: 2", ", weight: 1")
    alone, _, _ = scenario(root, "alone", plain, {"b": 1}, args)
    results = {name: Totals() for name in ("fifo", "fair", "budget")}
    for round_ in range(args.rounds):
        for name, tenants in (("fifo", None), ("fair", plain), ("budget", budget)):
            results[name].add(*scenario(root, f"{name}{round_}", tenants, flood, args))
    shares, _, _ = scenario(root, "weights", weighted, {"a": args.flood // 2, "b": args.flood // 2}, args)
    reference = percentile(alone["b"].ttfts, 0.95)
    figures: dict[str, float] = {"b_alone_ttft_p95_ms": reference * 1000}
    for name, totals in results.items():
        seen = totals.seen
        figures[f"{name}_b_ttft_p95_ratio"] = percentile(seen["b"].ttfts, 0.95) / reference
        figures[f"{name}_a_tok_s"] = seen["a"].tokens / totals.wall
        figures[f"{name}_b_tok_s"] = seen["b"].tokens / totals.wall
        figures[f"{name}_a_refused"] = seen["a"].refused
        figures[f"{name}_b_refused"] = seen["b"].refused
        figures[f"{name}_cpu_us_per_token"] = totals.cpu_per_token * 1e6
        # Share of one core each client process used: well under 1, the client is not the bottleneck.
        figures[f"{name}_a_client_core"] = seen["a"].client_cpu / totals.wall
        figures[f"{name}_b_client_core"] = seen["b"].client_cpu / totals.wall
    figures["cpu_per_token_ratio"] = results["fair"].cpu_per_token / results["fifo"].cpu_per_token
    figures["weights_token_ratio"] = shares["a"].tokens / max(1, shares["b"].tokens)
    figures["machinery_us_per_token"] = machinery_us_per_token(args.tokens)
    figures["machinery_share"] = figures["machinery_us_per_token"] / figures["fair_cpu_us_per_token"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="each flood scenario")
    parser.add_argument("--weights-seconds", type=float, default=60.0, help="the 2:1 weights scenario")
    parser.add_argument("--flood", type=int, default=32, help="A's concurrent streams")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each flood scenario, interleaved")
    parser.add_argument("--slots", type=int, default=8, help="option.max_rolling_batch_size")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per request, on average")
    parser.add_argument("--interval", type=float, default=0.01, help="seconds per token of each request")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lmi-bench-tenants-") as tmp:
        figures = run(Path(tmp), args)
    for name, value in figures.items():
        print(f"{name:32s} {value:12.3f}")
    with contextlib.suppress(OSError):
        print(f"load average: {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()
