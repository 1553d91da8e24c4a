"""What OpenTelemetry tracing costs: tokens/s and CPU per token with tracing on vs off, as ratios.

Two servers of the same model, one with ``OTEL_EXPORTER_OTLP_ENDPOINT`` set (its spans go to an
OTLP/HTTP receiver in this process that answers 200 and keeps nothing) and one without, measured in
alternating rounds (so a change in the machine's load falls on both), at concurrency 1 and 16; each
figure is the median over the rounds. CPU is the server's and its workers' (``/proc``), per
generated token. Engines: ``synthetic`` (the stack alone, tokens as fast as it yields them: the worst
case for a per-request cost) and ``hf`` (the demo model).

Usage: python benchmarks/bench_tracing.py [--engine synthetic|hf] [--requests 64] [--tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import statistics
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Server, model_dir, process_cpu, run_concurrent
from lmi_core.demo_model import build_demo_model

CONCURRENCY = (1, 16)


class Sink(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver that accepts every export and keeps nothing."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def cpu_seconds(server: Server) -> float:
    return sum(seconds for _, seconds in process_cpu(server.proc.pid).values())


def measure(server: Server, requests: int, concurrency: int, tokens: int) -> tuple[float, float]:
    """tokens/s and CPU seconds per token of ``requests`` streamed requests."""
    prompts = [f"request {i}: the quick brown fox" for i in range(requests)]
    before = cpu_seconds(server)
    wall, results = asyncio.run(run_concurrent(server.url, prompts, concurrency, tokens))
    generated = sum(r.tokens for r in results)
    return generated / wall, (cpu_seconds(server) - before) / generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("synthetic", "hf"), default="synthetic")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="lmi-bench-tracing-"))
    if args.engine == "synthetic":
        properties = {"option.model_id": "synthetic", "option.backend": "synthetic"}
        directory = model_dir(base, "synthetic", None, properties)
        env = {"LMI_EXTRA_PLUGINS": "benchmarks.synthetic_engine"}
    else:
        directory = model_dir(
            base, "hf", build_demo_model(base / "demo"), {"option.max_rolling_batch_size": "16"}
        )
        env = {}
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    traced = {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_address[1]}"}
    figures: dict[tuple[str, int], list[tuple[float, float]]] = {}
    try:
        with Server(directory, env) as off, Server(directory, traced) as on:
            for server in (off, on):  # warm-up: first requests, imports, the tracer's first export
                measure(server, 16, 16, args.tokens)
            for _ in range(args.rounds):
                for name, server in (("off", off), ("on", on)):
                    for concurrency in CONCURRENCY:
                        figure = measure(server, args.requests, concurrency, args.tokens)
                        figures.setdefault((name, concurrency), []).append(figure)
    finally:
        sink.shutdown()
    runs = f"{args.requests} requests x {args.tokens} tokens, median of {args.rounds} rounds"
    print(f"{args.engine} engine, {runs}")
    for concurrency in CONCURRENCY:
        off_tps, off_cpu = (statistics.median(f[i] for f in figures[("off", concurrency)]) for i in (0, 1))
        on_tps, on_cpu = (statistics.median(f[i] for f in figures[("on", concurrency)]) for i in (0, 1))
        print(
            f"  c={concurrency:<2}  tokens/s off {off_tps:8.0f}  on {on_tps:8.0f}  "
            f"on/off {on_tps / off_tps:.3f}  "
            f"CPU us/token off {off_cpu * 1e6:6.1f}  on {on_cpu * 1e6:6.1f}  off/on {off_cpu / on_cpu:.3f}"
        )


if __name__ == "__main__":
    main()
