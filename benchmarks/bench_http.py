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
    from lmi_hf.engine import HFEngine, load_model

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
    ceiling = asyncio.run(in_process_synthetic(args.stream_tokens))
    env = {"LMI_EXTRA_PLUGINS": "benchmarks.synthetic_engine"}
    with Server(
        model_dir(base, "synthetic", None, {"option.model_id": "synthetic", "option.backend": "synthetic"}),
        env,
    ) as server:
        asyncio.run(run_concurrent(server.url, ["warm"], 1, 100))
        wall, (stream,) = asyncio.run(run_concurrent(server.url, ["x"], 1, args.stream_tokens))
        _, short = asyncio.run(run_concurrent(server.url, ["x"] * 50, 1, 1))
    streamed = stream.tokens / wall
    ttfts = [r.ttft * 1000 for r in short]
    print(f"    in-process   {ceiling:11.0f} tokens/s")
    print(f"    via HTTP     {streamed:11.0f} tokens/s   ratio http/in-process = {streamed / ceiling:.4f}")
    gap50, gap99 = (percentile(stream.gaps, q) * 1e6 for q in (0.5, 0.99))
    print(f"    inter-token  p50 {gap50:.0f} us, p99 {gap99:.0f} us")
    ttft50, ttft99 = statistics.median(ttfts), percentile(ttfts, 0.99)
    print(f"    TTFT (1-token requests, sequential) p50 {ttft50:.2f} ms, p99 {ttft99:.2f} ms")


if __name__ == "__main__":
    main()
