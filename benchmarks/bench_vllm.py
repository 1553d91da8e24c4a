"""lmi-core with the vLLM backend vs vLLM's own OpenAI server, same engine, same workload, one run.

Both servers run vLLM's AsyncLLM on the demo model with the same engine arguments (enforce_eager,
max_model_len, max_num_seqs, dtype, ``VLLM_CPU_KVCACHE_SPACE``) and get the same client protocol:
streamed OpenAI ``/v1/completions``, greedy, EOS ignored. Both stay up for the whole run and are
measured alternately (lmi, vllm, lmi, vllm, ...) at each concurrency level, so that load from other
work on the machine hits both alike; each figure is the median over the rounds, and the ratio column
is lmi / vllm (above 1 is better for lmi on throughput, worse on latency and CPU).

Wall-clock figures on a shared 2-core machine are noisy; the CPU time each server's processes spend
per output token (vLLM's engine processes apart from the rest: lmi's server and worker, or vLLM's API
server) measures the HTTP side's overhead in a way other work on the machine barely skews.

Run it with the vLLM venv's interpreter (``make setup-vllm``):

    .venv-vllm/bin/python benchmarks/bench_vllm.py [--concurrency 1 4 16] [--rounds 5] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    ROOT,
    Server,
    StreamResult,
    lmi_command,
    model_dir,
    percentile,
    process_cpu,
    run_concurrent,
    stream_openai,
)
from lmi_core.demo_model import build_demo_model

MODEL = "demo"
# metric -> table heading
METRICS = {
    "req_s": "requests/s",
    "tok_s": "output tokens/s",
    "ttft_p50": "TTFT p50 (ms)",
    "ttft_p99": "TTFT p99 (ms)",
    "itl_p50": "ITL p50 (ms)",
    "itl_p99": "ITL p99 (ms)",
    "frontend_cpu": "server CPU ms/token, outside vLLM's engine",
    "engine_cpu": "CPU ms/token, vLLM engine core + worker",
}
# vLLM names its engine processes (VLLM::EngineCore, VLLM::Worker); the rest is the HTTP side.
ENGINE_PROCESS_PREFIX = "VLLM::"


@dataclass(frozen=True)
class Engine:
    """The engine arguments both servers get."""

    max_model_len: int
    max_num_seqs: int
    kv_cache_gib: int
    dtype: str = "float32"


def lmi_server(
    base: Path, demo: Path, engine: Engine, env: dict[str, str], name: str = MODEL, tree: Path | None = None
) -> Server:
    properties = {
        "option.backend": "vllm",
        "option.enforce_eager": "true",
        "option.max_model_len": str(engine.max_model_len),
        "option.max_rolling_batch_size": str(engine.max_num_seqs),  # vLLM's max_num_seqs
        "option.dtype": engine.dtype,
    }
    directory = model_dir(base, name, demo, properties)
    command = lmi_command(directory, MODEL)
    return Server(directory, env, command=command, timeout=600, cwd=tree or ROOT)


def vllm_server(demo: Path, engine: Engine, env: dict[str, str]) -> Server:
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(demo),
        "--served-model-name",
        MODEL,
        "--enforce-eager",
        "--max-model-len",
        str(engine.max_model_len),
        "--max-num-seqs",
        str(engine.max_num_seqs),
        "--dtype",
        engine.dtype,
        "--host",
        "127.0.0.1",
        "--disable-uvicorn-access-log",  # lmi serve logs no access lines by default either
    ]
    return Server(None, env, command=command, ready_path="/health", timeout=600)


def summarize(wall: float, results: list[StreamResult], cpu: dict[str, float]) -> dict[str, float]:
    ttfts = [r.ttft * 1000 for r in results]
    gaps = [g * 1000 for r in results for g in r.gaps]
    tokens = sum(r.tokens for r in results)
    return {
        **{key: seconds * 1000 / tokens for key, seconds in cpu.items()},
        "req_s": len(results) / wall,
        "tok_s": tokens / wall,
        "ttft_p50": percentile(ttfts, 0.5),
        "ttft_p99": percentile(ttfts, 0.99),
        "itl_p50": percentile(gaps, 0.5),
        "itl_p99": percentile(gaps, 0.99),
    }


def measure(server: Server, prompts: list[str], concurrency: int, tokens: int) -> dict[str, float]:
    """One load run; CPU time of the server's processes is robust to other work on the machine."""
    before = process_cpu(server.proc.pid)
    wall, results = asyncio.run(run_concurrent(server.url, prompts, concurrency, tokens, stream_openai))
    after = process_cpu(server.proc.pid)
    assert all(r.tokens == tokens for r in results), "every request must produce max_tokens tokens"
    cpu = {"frontend_cpu": 0.0, "engine_cpu": 0.0}
    for pid, (name, seconds) in after.items():
        key = "engine_cpu" if name.startswith(ENGINE_PROCESS_PREFIX) else "frontend_cpu"
        cpu[key] += seconds - before.get(pid, (name, 0.0))[1]
    return summarize(wall, results, cpu)


def table(rows: dict[int, dict[str, dict[str, float]]]) -> str:
    """Markdown: per concurrency and metric, each server's median and each lmi server's ratio to vLLM."""
    names = list(next(iter(rows.values())))
    lmis = [name for name in names if name != "vllm"]
    lines = [
        f"| concurrency | metric | {' | '.join(names)} | {' | '.join(f'{n} / vLLM' for n in lmis)} |",
        "| --- | --- |" + " --- |" * (len(names) + len(lmis)),
    ]
    for concurrency, by_server in rows.items():
        for key, heading in METRICS.items():
            values = " | ".join(f"{by_server[name][key]:.4g}" for name in names)
            ratios = " | ".join(f"{by_server[name][key] / by_server['vllm'][key]:.2f}" for name in lmis)
            lines.append(f"| {concurrency} | {heading} | {values} | {ratios} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=5, help="alternations lmi/vllm per level")
    parser.add_argument("--requests", type=int, default=8, help="requests per unit of concurrency (min 8)")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens of each request")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--kv-cache-gib", type=int, default=1)
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another lmi-core source tree (a checkout of main) measured as 'lmi-base' in the same rounds",
    )
    args = parser.parse_args()
    engine = Engine(args.max_model_len, args.max_num_seqs, args.kv_cache_gib)
    base = Path(tempfile.mkdtemp(prefix="lmi-bench-vllm-"))
    demo = build_demo_model(base / "demo-model")
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(engine.kv_cache_gib),
        # lmi_vllm sets this when eager (see docs/vllm.md); vLLM's server gets it too: same engine.
        "TORCHDYNAMO_DISABLE": "1",
        "VLLM_RPC_BASE_PATH": str(base),
        "TMPDIR": str(base),
    }
    print(f"engine: {engine}; {args.tokens} tokens per request; {args.rounds} rounds", flush=True)
    # Started one after the other: two engines starting at once would share the 2 cores.
    with contextlib.ExitStack() as stack:
        servers = {"lmi": stack.enter_context(lmi_server(base, demo, engine, env))}
        if args.baseline is not None:
            tree = args.baseline.resolve()
            path = os.pathsep.join(str(tree / p) for p in ("", "plugins/lmi_hf", "plugins/lmi_vllm"))
            baseline_env = {**env, "PYTHONPATH": path}
            servers["lmi-base"] = stack.enter_context(
                lmi_server(base, demo, engine, baseline_env, name="demo-base", tree=tree)
            )
        servers["vllm"] = stack.enter_context(vllm_server(demo, engine, env))
        ready = ", ".join(f"{name} {server.ready_seconds:.1f} s" for name, server in servers.items())
        print(f"ready in: {ready}", flush=True)
        for server in servers.values():  # warm-up: first requests pay lazy initialisation
            measure(server, [f"warm-up {i}" for i in range(4)], 4, 8)
        rows: dict[int, dict[str, dict[str, float]]] = {}
        for concurrency in args.concurrency:
            prompts = [
                f"Request {i}: the quick brown fox jumps over the lazy dog"
                for i in range(max(8, args.requests * concurrency))
            ]
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
            for round_ in range(args.rounds):
                for name, server in servers.items():
                    runs[name].append(measure(server, prompts, concurrency, args.tokens))
                    figures = {key: round(value, 3) for key, value in runs[name][-1].items()}
                    print(f"c={concurrency} round {round_} {name}: {figures}", flush=True)
            rows[concurrency] = {
                name: {key: statistics.median(run[key] for run in results) for key in METRICS}
                for name, results in runs.items()
            }
    # Other work on the machine skews both servers; the load average says how much there was.
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(table(rows))


if __name__ == "__main__":
    main()
