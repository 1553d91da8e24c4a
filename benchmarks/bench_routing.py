"""Cache-aware vs cache-blind dispatch over 2 vLLM workers (prefix caching on), one run.

Two workloads, both streamed OpenAI ``/v1/completions`` at a fixed concurrency, greedy, EOS ignored:

- **shared**: ``--tenants`` tenants, each a long shared context plus short distinct questions, the
  tenants' requests interleaved (t0 q0, t1 q0, ..., t0 q1, ...);
- **distinct**: ``--distinct`` prompts of the same length sharing no prefix (routing can only cost
  here; fewer than the shared ones, since every one of them is a full prefill).

Each runs on ``option.routing=least_loaded`` and ``prefix_aware`` with 2 workers, and the shared one
also on a single worker (the hit rate routing should come close to). The hit rate is vLLM's own
(prompt tokens found in its prefix cache / looked up), summed over the workers from lmi's
``lmi_prefix_cache_{hits,queries}_total``. The servers run one after another (two vLLM workers each
already share the cores), so load from other work on the machine skews them unevenly: read the
ratios with the load average printed at the end.

The demo model is built larger than the tests' (hidden 256, 4 layers, 4k context) so that a prefill
of a tenant's context costs real time, as it does on real models.

    .venv-vllm/bin/python benchmarks/bench_routing.py [--tenants 8] [--questions 16] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, Server, StreamResult, lmi_command, model_dir, percentile, stream_openai
from lmi_core.demo_model import build_demo_model

MODEL = "demo"
WORDS = (
    *("account", "balance", "contract", "delivery", "estimate", "figure", "growth", "holiday"),
    *("invoice", "journey", "kernel", "ledger", "market", "number", "order", "payment", "quarter"),
    *("refund", "schedule", "ticket", "update", "vendor", "warranty", "yield", "zone"),
)
# metric -> table heading
METRICS = {
    "hit_rate": "prefix-cache hit rate",
    "ttft_p50": "TTFT p50 (ms)",
    "ttft_p90": "TTFT p90 (ms)",
    "tok_s": "output tokens/s",
    "rejected": "503s",
    "spread": "workers per tenant",
}


@dataclass(frozen=True)
class Setup:
    name: str
    workers: int
    routing: str


SETUPS = (
    Setup("one worker", 1, "prefix_aware"),
    Setup("least_loaded", 2, "least_loaded"),
    Setup("prefix_aware", 2, "prefix_aware"),
)


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def shared_prompts(tenants: int, questions: int, context_words: int) -> list[tuple[str, str]]:
    """(tenant, prompt): each tenant's context and a distinct question, tenants interleaved."""
    rng = random.Random(0)
    contexts = [f"Tenant {t} policy: {text(rng, context_words)}" for t in range(tenants)]
    return [
        (str(t), f"{contexts[t]}\nQuestion {q}: {text(rng, 6)}?")
        for q in range(questions)
        for t in range(tenants)
    ]


def distinct_prompts(count: int, context_words: int) -> list[tuple[str, str]]:
    rng = random.Random(1)
    return [(str(i), f"{text(rng, context_words)}\nQuestion: {text(rng, 6)}?") for i in range(count)]


def prefix_cache(url: str) -> tuple[float, float]:
    """(hits, queries) summed over the workers, from /metrics."""
    sums = {"hits": 0.0, "queries": 0.0}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        for kind in sums:
            if line.startswith(f"lmi_prefix_cache_{kind}_total{{"):
                sums[kind] += float(line.rsplit(" ", 1)[1])
    return sums["hits"], sums["queries"]


async def run(
    url: str, prompts: list[tuple[str, str]], concurrency: int, tokens: int
) -> tuple[float, list[tuple[str, StreamResult]], int]:
    """Every prompt, at most ``concurrency`` in flight: wall time, (tenant, result) pairs, 503 count."""
    limit = asyncio.Semaphore(concurrency)
    rejected = 0
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=concurrency + 4)) as client:

        async def one(tenant: str, prompt: str) -> tuple[str, StreamResult] | None:
            nonlocal rejected
            async with limit:
                try:
                    return tenant, await stream_openai(client, url, prompt, tokens, MODEL)
                except httpx.HTTPStatusError as exc:
                    if exc.response.status_code != 503:
                        raise
                    rejected += 1
                    return None

        started = time.perf_counter()
        results = await asyncio.gather(*(one(t, p) for t, p in prompts))
        return time.perf_counter() - started, [r for r in results if r is not None], rejected


def measure(
    server: Server, prompts: list[tuple[str, str]], concurrency: int, tokens: int
) -> dict[str, float]:
    hits0, queries0 = prefix_cache(server.url)
    wall, results, rejected = asyncio.run(run(server.url, prompts, concurrency, tokens))
    time.sleep(2.0)  # the engines' counters come with heartbeats (every 0.5 s here)
    hits1, queries1 = prefix_cache(server.url)
    ttfts = [r.ttft * 1000 for _, r in results]
    tenants: dict[str, set[str | None]] = {}
    for tenant, result in results:
        tenants.setdefault(tenant, set()).add(result.worker)
    return {
        "hit_rate": (hits1 - hits0) / max(1.0, queries1 - queries0),
        "ttft_p50": percentile(ttfts, 0.5),
        "ttft_p90": percentile(ttfts, 0.9),
        "tok_s": sum(r.tokens for _, r in results) / wall,
        "rejected": float(rejected),
        "spread": sum(len(w) for w in tenants.values()) / max(1, len(tenants)),
    }


def lmi_server(base: Path, demo: Path, setup: Setup, args: argparse.Namespace) -> Server:
    properties = {
        "option.backend": "vllm",
        "option.enforce_eager": "true",
        "option.enable_prefix_caching": "true",
        "option.max_model_len": str(args.max_model_len),
        "option.max_rolling_batch_size": "16",
        "option.dtype": "float32",
        "minWorkers": str(setup.workers),
        "maxWorkers": str(setup.workers),
        "option.routing": setup.routing,
    }
    directory = model_dir(base, setup.name.replace(" ", "_"), demo, properties)
    env = {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "TORCHDYNAMO_DISABLE": "1",
        "VLLM_RPC_BASE_PATH": str(base),
        "TMPDIR": str(base),
        "SERVING_HEALTH_CHECK_INTERVAL": "0.5",
        # This checkout's plugins, not whichever an editable install points at.
        "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("", "plugins/lmi_vllm", "plugins/lmi_hf")),
    }
    command = lmi_command(directory, MODEL)
    return Server(directory, env, command=command, timeout=900)


def table(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    names = [s.name for s in SETUPS]
    headings = ["workload", "metric", *names, "prefix_aware / least_loaded", "prefix_aware / one worker"]
    lines = ["| " + " | ".join(headings) + " |", "|" + " --- |" * len(headings)]
    for workload, by_setup in rows.items():
        for key, heading in METRICS.items():
            values = [by_setup.get(name, {}).get(key) for name in names]
            cells = ["-" if v is None else f"{v:.4g}" for v in values]
            one, least, prefix = values

            def ratio(a: float | None, b: float | None) -> str:
                return "-" if a is None or not b else f"{a / b:.2f}"

            row = [workload, heading, *cells, ratio(prefix, least), ratio(prefix, one)]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=8)
    # 16: a tenant's first request (a miss on a worker) is then 1/16 of its requests, so TTFT p90
    # reads the requests that could hit, not the unavoidable misses.
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--distinct", type=int, default=32, help="requests of the distinct workload")
    parser.add_argument("--context-words", type=int, default=300, help="words of each tenant's context")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16, help="max_tokens of each request")
    parser.add_argument("--max-model-len", type=int, default=4096)
    names = [s.name for s in SETUPS]
    parser.add_argument("--setups", nargs="+", default=names, choices=names, help="in this order")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="lmi-bench-routing-"))
    demo = build_demo_model(base / "demo-model", hidden_size=256, num_layers=4, max_position_embeddings=4096)
    workloads = {
        "shared": shared_prompts(args.tenants, args.questions, args.context_words),
        "distinct": distinct_prompts(args.distinct, args.context_words),
    }
    print(f"{args}; load average at the start: {os.getloadavg()[0]:.1f}", flush=True)
    rows: dict[str, dict[str, dict[str, float]]] = {name: {} for name in workloads}
    for setup in [next(s for s in SETUPS if s.name == name) for name in args.setups]:
        with lmi_server(base, demo, setup, args) as server:
            print(f"{setup.name}: ready in {server.ready_seconds:.0f} s", flush=True)
            warm = [(str(i), f"warm-up {i}") for i in range(4)]  # lazy initialisation, on every worker
            asyncio.run(run(server.url, warm, 4, 4))
            for name, prompts in workloads.items():
                if name == "distinct" and setup.workers == 1:
                    continue  # the single worker is the reference for the hit rate only
                rows[name][setup.name] = figures = measure(server, prompts, args.concurrency, args.tokens)
                print(f"{setup.name} {name}: { ({k: round(v, 3) for k, v in figures.items()}) }", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(table(rows))


if __name__ == "__main__":
    main()
