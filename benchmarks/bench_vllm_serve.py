"""lmi-core + lmi_vllm against vLLM's own server, measured with vLLM's own client (``vllm bench serve``).

Both servers (``bench_vllm.py``'s, same engine arguments) stay up; each first serves ``--warmup``
untimed requests at the highest concurrency (a server's first traffic pays one-time costs: imports,
allocator growth, the engine's first batches; the usual warm-up of a serving benchmark, the same for
both). Each level then runs against lmi and vLLM for ``--rounds`` rounds, the server that goes first
alternating from round to round (lmi, vLLM; vLLM, lmi; ...) so that neither always follows the other:
``--max-concurrency`` 1, 4, 16 with requests sent at once, and a Poisson ``--request-rate`` near
saturation. The client is vLLM's (random dataset, fixed input and
output lengths, EOS ignored), so TTFT, TPOT, ITL and goodput have vLLM's definitions
(``vllm/benchmarks/serve.py``: TTFT = first content chunk; TPOT = (latency - TTFT) / (output tokens
- 1) per request; ITL = every gap between content chunks; goodput = requests/s meeting every SLO).
The client's own CPU time per output token is reported beside the servers': a client near one full
core would be the limit, not the server.

    .venv-vllm/bin/python benchmarks/bench_vllm_serve.py [--rounds 2] [--prompts 64] [--rate 12] [--warmup 32]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_vllm import ENGINE_PROCESS_PREFIX, MODEL, Engine, lmi_server, vllm_server
from benchmarks.common import ROOT, Server, heartbeat_summary, process_cpu
from lmi_core.demo_model import build_demo_model

# vLLM's result keys -> table heading (ms unless a rate)
METRICS = {
    "request_throughput": "requests/s",
    "output_throughput": "output tokens/s",
    "request_goodput": "goodput (req/s) at the SLO",
    "median_ttft_ms": "TTFT p50 (ms)",
    "p90_ttft_ms": "TTFT p90 (ms)",
    "p99_ttft_ms": "TTFT p99 (ms)",
    "median_tpot_ms": "TPOT p50 (ms)",
    "p99_tpot_ms": "TPOT p99 (ms)",
    "median_itl_ms": "ITL p50 (ms)",
    "p90_itl_ms": "ITL p90 (ms)",
    "p99_itl_ms": "ITL p99 (ms)",
    "frontend_cpu": "server CPU ms/token outside vLLM's engine",
    "client_cpu": "client CPU ms/token",
    "client_core": "client CPU share of one core",
}


def run_client(
    server: Server, demo: Path, level: dict[str, str], args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    """One ``vllm bench serve`` run against ``server``; its result JSON plus the CPU figures."""
    result = out / f"r{time.monotonic_ns()}.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "vllm_bench_client.py"),
        "--backend", "vllm", "--base-url", server.url, "--endpoint", "/v1/completions",
        "--model", MODEL, "--tokenizer", str(demo),
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.tokens), "--random-range-ratio", "0", "--ignore-eos",
        "--num-prompts", str(args.prompts), "--temperature", "0", "--seed", "0", "--disable-tqdm",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--goodput", f"ttft:{args.slo_ttft}", f"tpot:{args.slo_tpot}",
        "--save-result", "--result-dir", str(out), "--result-filename", result.name,
        *(f"--{key}={value}" for key, value in level.items()),
    ]  # fmt: skip
    before = process_cpu(server.proc.pid)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    wall = time.monotonic() - started
    spent = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = process_cpu(server.proc.pid)
    data: dict[str, float] = json.loads(result.read_text())
    tokens = data["total_output_tokens"]
    frontend = sum(
        seconds - before.get(pid, (name, 0.0))[1]
        for pid, (name, seconds) in after.items()
        if not name.startswith(ENGINE_PROCESS_PREFIX)
    )
    client = (spent.ru_utime + spent.ru_stime) - (children.ru_utime + children.ru_stime)
    return {
        **data,
        "frontend_cpu": frontend * 1000 / tokens,
        "client_cpu": client * 1000 / tokens,
        "client_core": client / wall,  # includes the client's start (imports): an upper bound
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=64, help="requests per run")
    parser.add_argument("--tokens", type=int, default=64, help="output tokens of each request")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rate", type=float, default=12.0, help="Poisson request rate (near saturation)")
    parser.add_argument("--warmup", type=int, default=32, help="untimed requests per server first (0: none)")
    parser.add_argument("--slo-ttft", type=float, default=500.0, help="goodput SLO: TTFT ms")
    parser.add_argument("--slo-tpot", type=float, default=50.0, help="goodput SLO: TPOT ms")
    args = parser.parse_args()
    engine = Engine(512, 16, 1)
    base = Path(tempfile.mkdtemp(prefix="lmi-bench-vllm-serve-"))
    demo = build_demo_model(base / "demo-model")
    env = {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "TORCHDYNAMO_DISABLE": "1",
        "VLLM_RPC_BASE_PATH": str(base),
        "TMPDIR": str(base),
    }
    levels = [{"max-concurrency": str(c), "request-rate": "inf"} for c in args.concurrency]
    levels.append({"request-rate": str(args.rate), "burstiness": "1.0"})
    with lmi_server(base, demo, engine, env) as lmi, vllm_server(demo, engine, env) as vllm:
        servers = {"lmi": lmi, "vllm": vllm}
        if args.warmup:
            warmup = argparse.Namespace(**{**vars(args), "prompts": args.warmup})
            busiest = {"max-concurrency": str(max(args.concurrency)), "request-rate": "inf"}
            for server in servers.values():
                run_client(server, demo, busiest, warmup, base)
        rows: dict[str, dict[str, dict[str, float]]] = {}
        for level in levels:
            name = ", ".join(f"{k} {v}" for k, v in level.items())
            runs: dict[str, list[dict[str, float]]] = {server: [] for server in servers}
            for round_ in range(args.rounds):
                order = list(servers.items())
                for server_name, server in order if round_ % 2 == 0 else reversed(order):
                    runs[server_name].append(run_client(server, demo, level, args, base))
                    figures = {k: round(runs[server_name][-1][k], 2) for k in METRICS}
                    print(f"{name} round {round_} {server_name}: {figures}", flush=True)
            rows[name] = {
                s: {k: statistics.median(r[k] for r in rs) for k in METRICS} for s, rs in runs.items()
            }
        heartbeats = heartbeat_summary(lmi.url)
    print(f"lmi worker heartbeats over the run: {heartbeats}")
    print(f"SLO for goodput: TTFT <= {args.slo_ttft} ms and TPOT <= {args.slo_tpot} ms")
    print("| level | metric | lmi | vLLM | lmi / vLLM |\n| --- | --- | --- | --- | --- |")
    for name, by_server in rows.items():
        for key, heading in METRICS.items():
            a, b = by_server["lmi"][key], by_server["vllm"][key]
            print(f"| {name} | {heading} | {a:.4g} | {b:.4g} | {a / b if b else float('nan'):.2f} |")


if __name__ == "__main__":
    main()
