"""What OpenTelemetry tracing costs: tokens/s and CPU per token with tracing on vs off, as ratios.

Two servers of the same model, one with ``OTEL_EXPORTER_OTLP_ENDPOINT`` set (its spans go to an
OTLP/HTTP receiver in this process that answers 200 and keeps nothing) and one without, measured in
rounds at concurrency 1 and 16: each round starts both afresh and measures them back to back, in an
order that alternates from round to round, and gives one on/off ratio, so a change in the machine's
speed between rounds (tens of percent within a minute on this shared machine) falls on both sides of
a ratio; each ratio printed is the median over the rounds, with the middle half of them. CPU is
the server's and its workers' (``/proc``), per generated token. Engines: ``synthetic`` (the stack
alone, tokens as fast as it yields them: the worst case for a per-request cost) and ``hf`` (the demo
model).

Usage: python benchmarks/bench_tracing.py [--engine synthetic|hf] [--requests 64] [--tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import http.server
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import Any

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


def span_costs(iterations: int = 3000) -> dict[str, float]:
    """CPU microseconds of one traced request's span work, timed in this process (no machine noise
    between two servers): the server's (``HttpTrace``: the SERVER span with a caller's
    ``traceparent``, its generation and finish, ``lmi.queue`` and ``lmi.route``), the worker's (its
    ``lmi.worker.generate`` around a 64-token generation, less the same generation untraced), and
    the encoding of those four spans for export."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    from lmi_core.engine import Finished, GenerationEvent, GenerationRequest, Token
    from lmi_core.http.tracing import HttpTrace
    from lmi_core.otel import encode, parent_context, span_sink
    from lmi_core.worker.tracing import generate_in_span

    class Keep(SpanExporter):
        def __init__(self) -> None:
            self.spans: list[ReadableSpan] = []

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            self.spans[:] = [*self.spans[-3:], *spans]  # the last request's four
            return SpanExportResult.SUCCESS

    kept = Keep()
    sink = span_sink(SimpleSpanProcessor(kept), Resource.create({"service.name": "lmi-core"}))
    request = GenerationRequest("r", prompt="p")
    finished = Finished("length", 12, 64, "")
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    def server() -> None:
        attributes: dict[str, Any] = {"http.request.method": "POST", "url.path": "/v1/chat/completions"}
        trace = HttpTrace(sink, "POST /v1/chat/completions", parent_context(caller), attributes)
        now = time.time_ns()
        trace.span("lmi.queue", now, now, {"lmi.queue.ahead": 0})
        trace.span("lmi.route", now, now, {"lmi.route.worker": 0, "lmi.route.reason": "load"})
        trace.generation("demo", request)
        trace.finished(finished, time.monotonic())
        attributes |= {"http.route": "/v1/chat/completions", "http.response.status_code": 200}
        trace.end()

    async def generation(_: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        for i in range(64):
            yield Token(i, " tok", None)
        yield finished

    async def worker(traced: bool) -> None:
        traced_request = dataclasses.replace(request, traceparent=caller)
        events = generate_in_span(sink, traced_request, 0, generation) if traced else generation(request)
        async for _ in events:
            pass

    def timed(step: Callable[[], object]) -> float:
        started = time.process_time()
        for _ in range(iterations):
            step()
        return (time.process_time() - started) / iterations * 1e6

    loop = asyncio.new_event_loop()
    try:
        costs = {"server": timed(server)}
        costs["worker"] = timed(lambda: loop.run_until_complete(worker(True)))
        costs["worker"] -= timed(lambda: loop.run_until_complete(worker(False)))
    finally:
        loop.close()
    spans = list(kept.spans)
    costs["encoding"] = timed(lambda: encode(spans))
    return costs


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
        for round_ in range(args.rounds):
            # Fresh servers each round: two identical servers measured side by side differ by ~5% here
            # (which cores, which memory), a bias that new ones each round turn into noise.
            with Server(directory, env) as off, Server(directory, traced) as on:
                for server in (off, on):  # warm-up: first requests, imports, the tracer's first export
                    measure(server, 16, 16, args.tokens)
                for concurrency in CONCURRENCY:
                    pair = [("off", off), ("on", on)]
                    for name, server in pair if round_ % 2 == 0 else pair[::-1]:
                        figure = measure(server, args.requests, concurrency, args.tokens)
                        figures.setdefault((name, concurrency), []).append(figure)
    finally:
        sink.shutdown()
    runs = f"{args.requests} requests x {args.tokens} tokens, {args.rounds} rounds"
    print(f"{args.engine} engine, {runs}; medians (and the middle half of the rounds' ratios)")
    for concurrency in CONCURRENCY:
        untraced, traced_runs = figures[("off", concurrency)], figures[("on", concurrency)]
        speed = spread([b[0] / a[0] for a, b in zip(untraced, traced_runs, strict=True)])
        cpu = spread([a[1] / b[1] for a, b in zip(untraced, traced_runs, strict=True)])
        off_tps, off_cpu = (statistics.median(f[i] for f in untraced) for i in (0, 1))
        on_tps, on_cpu = (statistics.median(f[i] for f in traced_runs) for i in (0, 1))
        print(
            f"  c={concurrency:<2}  tokens/s off {off_tps:8.0f}  on {on_tps:8.0f}  on/off {speed}  "
            f"CPU us/token off {off_cpu * 1e6:6.1f}  on {on_cpu * 1e6:6.1f}  off/on {cpu}"
        )
    costs = span_costs()
    per_request = sum(costs.values())
    parts = ", ".join(f"{name} {us:.0f}" for name, us in costs.items())
    print(f"span work of one traced request, timed alone: {per_request:.0f} us of CPU ({parts})")
    for concurrency in CONCURRENCY:
        untraced_us = statistics.median(f[1] for f in figures[("off", concurrency)]) * args.tokens * 1e6
        share = untraced_us / (untraced_us + per_request)
        print(f"  c={concurrency:<2}  CPU per request untraced {untraced_us:8.0f} us: off/on {share:.3f}")


def spread(ratios: list[float]) -> str:
    """The median ratio and its interquartile range: ``0.975 (0.95-0.99)``."""
    low, median, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return f"{median:.3f} ({low:.2f}-{high:.2f})"


if __name__ == "__main__":
    main()
