"""lmi-core's data parallelism against vLLM's own: N vLLM workers behind lmi-core against
``vllm serve --data-parallel-size N``, the same engine arguments, the same client.

Servers (one at a time, in ``--order``): **lmi prefix_aware** and **lmi least_loaded** (N vLLM
workers, ``option.routing``), and **vLLM DP** (vLLM's OpenAI server with ``--data-parallel-size N``,
whose coordinator balances by load). Every engine: the demo Llama built larger (hidden 256, 4 layers,
4k context), float32, eager, prefix caching on, at most 16 sequences, a KV cache of
``--kv-mib`` MiB (``kv_cache_memory_bytes``: the same bytes for every engine), one OpenMP thread and
no core binding (``VLLM_CPU_OMP_THREADS_BIND=nobind``: vLLM-CPU would bind every engine to the same
cores; unbound, the kernel spreads the N engines over the cores alike for both servers).

Workloads, each a list of streamed ``/v1/completions`` (greedy, EOS ignored, ``--tokens`` out):

- **shared**: ``--tenants`` tenants, each a shared context of ``--context-words`` words plus
  ``--questions`` short distinct questions, the tenants interleaved, ``--concurrency`` in flight, no
  session header (the router finds each tenant's prefix itself);
- **pressure**: the same with contexts of ``--pressure-words`` words: together they exceed one
  engine's KV cache and fit in N of them (the script prints the token counts);
- **sessions**: ``--sessions`` chats of ``--turns`` turns, each turn resending the whole history
  (the earlier questions and the answers the server gave) plus a new question; lmi gets the session
  in ``x-session-id``, vLLM nothing (it has no such header);
- **distinct**: prompts of ``--context-words`` words sharing no prefix;
- **poisson**: short distinct prompts arriving open-loop at ``--rate`` requests/s (exponential gaps).

Figures per workload and server: output tokens/s, TTFT p50/p90/p99, TPOT p50 ((end - first token)
/ (tokens - 1)), goodput (requests/s whose TTFT <= ``--slo-ttft`` ms and TPOT <= ``--slo-tpot`` ms),
the prefix-cache hit rate from the server's own counters (lmi: ``lmi_prefix_cache_*_total``, its
engines'; vLLM: ``vllm:prefix_cache_*_total``), refusals (503/429), and the client's share of a
core (well under 1: the client is not the limit). Then lmi / vLLM ratios (TTFT: vLLM / lmi, so
above 1 is lmi ahead everywhere).

    .venv-vllm/bin/python benchmarks/bench_vs_vllm_dp.py [--workloads shared pressure sessions ...]
        [--order lmi-first | vllm-first | alternate | alternate-vllm-first]
        [--routing prefix_aware least_loaded] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_routing import distinct_prompts, shared_prompts, text
from benchmarks.common import ROOT, Server, StreamResult, lmi_command, model_dir, percentile, stream_openai
from lmi_core.demo_model import build_demo_model

MODEL = "demo"
LMI_SERVERS = {"lmi prefix_aware": "prefix_aware", "lmi least_loaded": "least_loaded"}
VLLM = "vLLM DP"
WORKLOADS = ("shared", "pressure", "sessions", "distinct", "poisson")
# figure -> (heading, True when larger is better)
FIGURES = {
    "tok_s": ("output tok/s", True),
    "ttft_p50": ("TTFT p50 (ms)", False),
    "ttft_p90": ("TTFT p90 (ms)", False),
    "ttft_p99": ("TTFT p99 (ms)", False),
    "tpot_p50": ("TPOT p50 (ms)", False),
    "goodput": ("goodput (req/s)", True),
    "hit_rate": ("prefix-cache hit rate", True),
    "refused": ("503/429", False),
    "client_core": ("client share of a core", False),
}


@dataclass
class Job:
    """One request: its prompt and, for lmi, its session."""

    prompt: str
    session: str | None = None


@dataclass
class Outcome:
    results: list[StreamResult] = field(default_factory=list)
    refused: int = 0


async def complete(
    client: httpx.AsyncClient, url: str, job: Job, tokens: int, outcome: Outcome, send_session: bool
) -> str:
    """One streamed completion; returns its text ("" when refused: a 429 or 503)."""
    headers = {"x-session-id": job.session} if send_session and job.session else None
    try:
        result = await stream_openai(client, url, job.prompt, tokens, MODEL, headers)
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code not in (429, 503):
            raise
        outcome.refused += 1
        return ""
    outcome.results.append(result)
    return result.text


def client_for(concurrency: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=concurrency + 8))


async def closed_loop(url: str, jobs: list[Job], concurrency: int, tokens: int, session: bool) -> Outcome:
    outcome, limit = Outcome(), asyncio.Semaphore(concurrency)
    async with client_for(concurrency) as client:

        async def one(job: Job) -> None:
            async with limit:
                await complete(client, url, job, tokens, outcome, session)

        await asyncio.gather(*(one(job) for job in jobs))
    return outcome


async def conversations(url: str, args: argparse.Namespace, session: bool) -> Outcome:
    """``args.sessions`` chats at once, each turn after the previous answer, resending the history."""
    outcome, rng = Outcome(), random.Random(2)
    openers = [f"Session {s} brief: {text(rng, args.context_words // 2)}" for s in range(args.sessions)]
    questions = [[text(rng, 12) for _ in range(args.turns)] for _ in range(args.sessions)]
    async with client_for(args.sessions) as client:

        async def chat(s: int) -> None:
            history = openers[s]
            for question in questions[s]:
                history += f"\nUser: {question}?\nAssistant:"
                answer = await complete(client, url, Job(history, f"s{s}"), args.tokens, outcome, session)
                history += answer

        await asyncio.gather(*(chat(s) for s in range(args.sessions)))
    return outcome


async def open_loop(url: str, jobs: list[Job], rate: float, tokens: int) -> Outcome:
    """Each job sent at its exponential arrival time, however many are in flight."""
    outcome, rng = Outcome(), random.Random(3)
    async with client_for(len(jobs)) as client:
        started, tasks, at = time.perf_counter(), [], 0.0
        for job in jobs:
            at += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
            tasks.append(asyncio.create_task(complete(client, url, job, tokens, outcome, False)))
        await asyncio.gather(*tasks)
    return outcome


def prefix_cache(url: str, lmi: bool) -> tuple[float, float]:
    """(hits, queries) summed over the server's engines, from its /metrics."""
    names = ("lmi_prefix_cache_hits_total", "lmi_prefix_cache_queries_total")
    if not lmi:
        names = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total")
    sums = [0.0, 0.0]
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        for i, name in enumerate(names):
            if line.startswith((f"{name}{{", f"{name} ")):
                sums[i] += float(line.rsplit(" ", 1)[1])
    return sums[0], sums[1]


def figures(
    outcome: Outcome, wall: float, cpu: float, hits: float, queries: float, args: argparse.Namespace
) -> dict[str, float]:
    results = outcome.results
    ttfts = [r.ttft * 1000 for r in results]
    # ms per output token after the first (None: one token, no TPOT); once per request.
    per_token = [(r.total - r.ttft) * 1000 / (r.tokens - 1) if r.tokens > 1 else None for r in results]
    tpots = [t for t in per_token if t is not None]
    good = sum(
        1
        for ttft, tpot in zip(ttfts, per_token, strict=True)
        if ttft <= args.slo_ttft and (tpot is None or tpot <= args.slo_tpot)
    )
    return {
        "tok_s": sum(r.tokens for r in results) / wall,
        "ttft_p50": percentile(ttfts, 0.5),
        "ttft_p90": percentile(ttfts, 0.9),
        "ttft_p99": percentile(ttfts, 0.99),
        "tpot_p50": percentile(tpots, 0.5) if tpots else 0.0,
        "goodput": good / wall,
        "hit_rate": hits / queries if queries else 0.0,
        "refused": float(outcome.refused),
        "client_core": cpu / wall,
    }


def client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def workload(
    name: str, url: str, args: argparse.Namespace, lmi: bool
) -> Callable[[], Coroutine[None, None, Outcome]]:
    if name in ("shared", "pressure"):
        words = args.context_words if name == "shared" else args.pressure_words
        # No session header: the router must find each tenant's prefix itself.
        jobs = [Job(p) for _, p in shared_prompts(args.tenants, args.questions, words)]
        return lambda: closed_loop(url, jobs, args.concurrency, args.tokens, False)
    if name == "sessions":
        return lambda: conversations(url, args, lmi)
    if name == "distinct":
        jobs = [Job(p) for _, p in distinct_prompts(args.distinct, args.context_words)]
        return lambda: closed_loop(url, jobs, args.concurrency, args.tokens, False)
    jobs = [Job(p) for _, p in distinct_prompts(args.poisson, args.context_words // 4)]
    return lambda: open_loop(url, jobs, args.rate, args.tokens)


def measure(name: str, server: Server, args: argparse.Namespace, lmi: bool) -> dict[str, float]:
    run = workload(name, server.url, args, lmi)
    hits0, queries0 = prefix_cache(server.url, lmi)
    cpu0, started = client_cpu(), time.perf_counter()
    outcome = asyncio.run(run())
    wall, cpu = time.perf_counter() - started, client_cpu() - cpu0
    time.sleep(2.0)  # lmi's engine counters come with heartbeats (every 0.5 s here)
    hits1, queries1 = prefix_cache(server.url, lmi)
    return figures(outcome, wall, cpu, hits1 - hits0, queries1 - queries0, args)


ENV = {
    "TORCHDYNAMO_DISABLE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    "SERVING_HEALTH_CHECK_INTERVAL": "0.5",
}


def lmi_server(base: Path, demo: Path, routing: str, args: argparse.Namespace) -> Server:
    properties = {
        "option.backend": "vllm",
        "option.enforce_eager": "true",
        "option.enable_prefix_caching": "true",
        "option.max_model_len": "4096",
        "option.max_rolling_batch_size": "16",
        "option.dtype": "float32",
        "option.kv_cache_memory_bytes": str(args.kv_mib << 20),
        "option.routing": routing,
        "minWorkers": str(args.workers),
        "maxWorkers": str(args.workers),
    }
    directory = model_dir(base, f"lmi-{routing}", demo, properties)
    env = {
        **ENV,
        "VLLM_RPC_BASE_PATH": str(base),
        "TMPDIR": str(base),
        "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("", "plugins/lmi_vllm", "plugins/lmi_hf")),
    }
    command = lmi_command(directory, MODEL)
    return Server(directory, env, command=command, timeout=900)


def vllm_server(base: Path, demo: Path, args: argparse.Namespace) -> Server:
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(demo),
        "--served-model-name", MODEL, "--data-parallel-size", str(args.workers), "--enforce-eager",
        "--enable-prefix-caching", "--max-model-len", "4096", "--max-num-seqs", "16", "--dtype", "float32",
        "--kv-cache-memory-bytes", str(args.kv_mib << 20), "--host", "127.0.0.1",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    env = {**ENV, "VLLM_RPC_BASE_PATH": str(base), "TMPDIR": str(base)}
    return Server(None, env, command=command, ready_path="/health", timeout=900)


def kv_sizes(demo: Path, args: argparse.Namespace) -> str:
    """The contexts' tokens beside one engine's KV cache in tokens (float32 K and V per layer)."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(demo)
    tokenizer = AutoTokenizer.from_pretrained(demo)
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * 4
    per_token *= config.hidden_size // config.num_attention_heads
    capacity = (args.kv_mib << 20) // per_token
    lines = [f"one engine's KV cache: {capacity} tokens ({args.kv_mib} MiB, {per_token} bytes a token)"]
    for name, words in (("shared", args.context_words), ("pressure", args.pressure_words)):
        contexts = {t: p.split("\nQuestion")[0] for t, p in shared_prompts(args.tenants, 1, words)}
        tokens = sum(len(tokenizer(c)["input_ids"]) for c in contexts.values())
        share = tokens / capacity
        lines.append(
            f"{name}: {args.tenants} contexts of {tokens // args.tenants} tokens, {tokens} in all = "
            f"{share:.2f} of one engine's cache, {share / args.workers:.2f} of {args.workers}"
        )
    return "\n".join(lines)


def mean_figures(runs: list[dict[str, float]]) -> dict[str, float]:
    """One server's figures over its runs of a workload (``--order alternate``: two)."""
    return {key: statistics.fmean(run[key] for run in runs) for key in runs[0]}


def table(rows: dict[str, dict[str, dict[str, float]]], servers: list[str]) -> str:
    """Markdown: per workload and figure, each server's value and lmi's ratios to vLLM DP."""
    lmi = [s for s in servers if s != VLLM]
    headings = ["workload", "figure", *servers, *(f"{s} / vLLM" for s in lmi)]
    lines = ["| " + " | ".join(headings) + " |", "|" + " --- |" * len(headings)]
    for name, by_server in rows.items():
        for key, (heading, larger_better) in FIGURES.items():
            values = [by_server.get(s, {}).get(key) for s in servers]
            cells = ["-" if v is None else f"{v:.4g}" for v in values]
            reference = by_server.get(VLLM, {}).get(key)
            ratios = []
            for s in lmi:
                mine = by_server.get(s, {}).get(key)
                if mine is None or reference is None or key in ("refused", "client_core"):
                    ratios.append("-")
                elif larger_better:
                    ratios.append(f"{mine / reference:.2f}" if reference else "-")
                else:  # times: vLLM's / lmi's, above 1 when lmi is faster
                    ratios.append(f"{reference / mine:.2f}" if mine else "-")
            lines.append("| " + " | ".join([name, heading, *cells, *ratios]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument(
        "--order",
        choices=("lmi-first", "vllm-first", "alternate", "alternate-vllm-first"),
        default="lmi-first",
        help="alternate: lmi, vLLM, vLLM, lmi (each server twice, the mean: an order effect cancels); "
        "alternate-vllm-first: vLLM, lmi, lmi, vLLM",
    )
    parser.add_argument(
        "--routing", nargs="+", default=list(LMI_SERVERS.values()), choices=list(LMI_SERVERS.values())
    )
    parser.add_argument("--workers", type=int, default=2, help="N: lmi's workers and vLLM's DP size")
    parser.add_argument("--kv-mib", type=int, default=48, help="KV cache of each engine, MiB")
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--context-words", type=int, default=170, help="shared contexts (~1,000 tokens)")
    parser.add_argument("--pressure-words", type=int, default=390, help="the pressure workload's (~2,250)")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--distinct", type=int, default=24)
    parser.add_argument("--poisson", type=int, default=48, help="requests of the open-loop workload")
    parser.add_argument("--rate", type=float, default=2.0, help="open-loop arrivals per second")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of each request")
    parser.add_argument("--slo-ttft", type=float, default=2000.0, help="goodput SLO: TTFT ms")
    parser.add_argument("--slo-tpot", type=float, default=200.0, help="goodput SLO: TPOT ms")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="lmi-bench-dp-"))
    demo = build_demo_model(base / "demo-model", hidden_size=256, num_layers=4, max_position_embeddings=4096)
    lmis = [name for name, routing in LMI_SERVERS.items() if routing in args.routing]
    servers = {
        "lmi-first": [*lmis, VLLM],
        "vllm-first": [VLLM, *lmis],
        "alternate": [*lmis, VLLM, VLLM, *reversed(lmis)],
        "alternate-vllm-first": [VLLM, *lmis, *reversed(lmis), VLLM],
    }[args.order]
    print(f"{vars(args)}; load average at the start: {os.getloadavg()[0]:.1f}", flush=True)
    print(kv_sizes(demo, args), flush=True)
    runs: dict[str, dict[str, list[dict[str, float]]]] = {name: {} for name in args.workloads}
    for name in servers:
        lmi = name != VLLM
        with (
            lmi_server(base, demo, LMI_SERVERS[name], args)
            if lmi
            else vllm_server(base, demo, args) as server
        ):
            print(f"{name}: ready in {server.ready_seconds:.0f} s", flush=True)
            warm = [Job(f"warm-up {i}") for i in range(2 * args.workers)]  # lazy inits, on every engine
            asyncio.run(closed_loop(server.url, warm, 2 * args.workers, 4, False))
            for workload_name in args.workloads:
                found = measure(workload_name, server, args, lmi)
                runs[workload_name].setdefault(name, []).append(found)
                print(f"{name} {workload_name}: { ({k: round(v, 3) for k, v in found.items()}) }", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    rows = {
        workload_name: {name: mean_figures(found) for name, found in by_server.items()}
        for workload_name, by_server in runs.items()
    }
    print(table(rows, [*lmis, VLLM]))


if __name__ == "__main__":
    main()
