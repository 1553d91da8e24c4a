"""Stack overhead of lmi-core, measured as ratios against a baseline from the same run.

(a) Generation throughput of the HF engine through the HTTP server (worker process, socket,
    streaming) vs the same engine called in-process, same requests and concurrency.
(b) The stack alone: a synthetic engine that yields tokens as fast as it can. Streamed tokens/s of
    one stream through HTTP vs iterating the same engine in-process, and time to first token.

Usage: python benchmarks/bench_http.py [--requests 32] [--concurrency 16] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import synthetic_engine
from benchmarks.common import Server, model_dir, percentile, run_concurrent
from lmi_core.demo_model import build_demo_model
from lmi_core.engine import GenerationRequest, SamplingParams, WorkerContext


def prompts(n: int) -> list[str]:
    return [f"Request {i}: the quick brown fox jumps over the lazy dog" for i in range(n)]


async def in_process_hf(model: Path, texts: list[str], concurrency: int, tokens: int) -> float:
    from lmi_hf.engine import HFEngine
    from lmi_hf.loading import load_model

    context = WorkerContext(
        model_id=str(model), model_dir=str(model), backend="hf", options={}, max_batch_size=32
    )
    loaded, tokenizer = load_model(context)
    engine = HFEngine(context, loaded, tokenizer)
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int, text: str) -> int:
        async with limit:
            params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
            events = [
                e async for e in engine.generate(GenerationRequest(f"b{i}", prompt=text, params=params))
            ]
            return len(events) - 1

    try:
        started = time.perf_counter()
        counts = await asyncio.gather(*(one(i, t) for i, t in enumerate(texts)))
        return sum(counts) / (time.perf_counter() - started)
    finally:
        engine.shutdown()


async def in_process_synthetic(tokens: int) -> float:
    engine = synthetic_engine.SyntheticEngine()
    request = GenerationRequest("s", prompt="x", params=SamplingParams(max_new_tokens=tokens))
    started = time.perf_counter()
    count = len([e async for e in engine.generate(request)]) - 1
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--stream-tokens", type=int, default=5000)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="lmi-bench-"))
    demo = build_demo_model(base / "demo")
    texts = prompts(args.requests)

    print(f"(a) HF engine, {args.requests} requests x {args.tokens} tokens, concurrency {args.concurrency}")
    baseline = asyncio.run(in_process_hf(demo, texts, args.concurrency, args.tokens))
    with Server(model_dir(base, "hf", demo, {"option.max_rolling_batch_size": "32"})) as server:
        asyncio.run(run_concurrent(server.url, texts[:4], 4, 4))  # warm-up
        wall, results = asyncio.run(run_concurrent(server.url, texts, args.concurrency, args.tokens))
        batch = texts[: args.concurrency]
        one_by_one, _ = asyncio.run(run_concurrent(server.url, batch, 1, args.tokens))
        together, _ = asyncio.run(run_concurrent(server.url, batch, len(batch), args.tokens))
    http_tps = sum(r.tokens for r in results) / wall
    print(f"    in-process   {baseline:9.1f} tokens/s")
    print(f"    via HTTP     {http_tps:9.1f} tokens/s   ratio http/in-process = {http_tps / baseline:.2f}")
    print(
        f"    {len(batch)} requests via HTTP: sequential {one_by_one:.2f} s, concurrent {together:.2f} s"
        f"   ratio sequential/concurrent = {one_by_one / together:.1f}x (continuous batching)"
    )

    print(f"(b) synthetic engine (stack only), one stream of {args.stream_tokens} tokens")
    figures = stack_alone(base, args.stream_tokens, short_requests=50)
    print(f"    in-process   {figures['in_process_tok_s']:11.0f} tokens/s")
    print(
        f"    via HTTP     {figures['http_tok_s']:11.0f} tokens/s   ratio http/in-process = "
        f"{figures['http_tok_s'] / figures['in_process_tok_s']:.4f}"
    )
    print(f"    inter-token  p50 {figures['gap_p50_us']:.0f} us, p99 {figures['gap_p99_us']:.0f} us")
    print(
        f"    TTFT (1-token requests, sequential) p50 {figures['ttft_p50_ms']:.2f} ms, "
        f"p99 {figures['ttft_p99_ms']:.2f} ms"
    )


def stack_alone(base: Path, stream_tokens: int, short_requests: int) -> dict[str, float]:
    """The stack with a synthetic engine: one long stream through HTTP against the same engine
    iterated in-process, and the TTFT of sequential 1-token requests (``tests/test_bench_smoke.py``
    runs it small)."""
    ceiling = asyncio.run(in_process_synthetic(stream_tokens))
    env = {"LMI_EXTRA_PLUGINS": "benchmarks.synthetic_engine"}
    with Server(
        model_dir(base, "synthetic", None, {"option.model_id": "synthetic", "option.backend": "synthetic"}),
        env,
    ) as server:
        asyncio.run(run_concurrent(server.url, ["warm"], 1, 100))
        wall, (stream,) = asyncio.run(run_concurrent(server.url, ["x"], 1, stream_tokens))
        _, short = asyncio.run(run_concurrent(server.url, ["x"] * short_requests, 1, 1))
    ttfts = [r.ttft * 1000 for r in short]
    return {
        "in_process_tok_s": ceiling,
        "http_tok_s": stream.tokens / wall,
        "gap_p50_us": percentile(stream.gaps, 0.5) * 1e6,
        "gap_p99_us": percentile(stream.gaps, 0.99) * 1e6,
        "ttft_p50_ms": statistics.median(ttfts),
        "ttft_p99_ms": percentile(ttfts, 0.99),
    }


if __name__ == "__main__":
    main()
