"""Per-token cost of constrained vs free generation on the HF engine (in process, the demo model).

The same prompts run twice at each concurrency: constrained by JSON schemas (each request's token
count recorded), then free with ``ignore_eos`` and exactly those token counts, so that both runs do
the same forward passes and differ only by the grammar work (mask per row per step, matcher
advance). Prints seconds per generated token for each and their ratio (goal: at most 1.3x).

Usage: python benchmarks/bench_structured.py [--concurrency 1 16] [--requests 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmi_core.demo_model import build_demo_model
from lmi_core.engine import GenerationRequest, SamplingParams, StructuredOutput, Token, WorkerContext
from lmi_hf.engine import HFEngine
from lmi_hf.loading import load_model

PROMPTS = ["Give me the record.", "hello world", "The quick brown fox", "one two three four"]
SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["a", "b", "c"]}},
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "maxItems": 4,
                "items": {
                    "type": "object",
                    "properties": {"id": {"type": "integer", "maximum": 999}, "ok": {"type": "boolean"}},
                    "required": ["id", "ok"],
                },
            }
        },
        "required": ["items"],
    },
]


async def run_all(
    engine: HFEngine, params: list[SamplingParams], concurrency: int
) -> tuple[float, list[int]]:
    """Run one request per entry of ``params`` (``concurrency`` at a time); wall seconds, token counts."""
    counts = [0] * len(params)
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with semaphore:
            request = GenerationRequest(f"b{i}-{time.monotonic_ns()}", prompt=PROMPTS[i % len(PROMPTS)])
            request.params = params[i]
            async for event in engine.generate(request):
                counts[i] += isinstance(event, Token)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(len(params))))
    return time.perf_counter() - started, counts


async def measure(engine: HFEngine, requests: int, concurrency: int, rounds: int) -> tuple[float, float]:
    constraints = [StructuredOutput("json", json.dumps(SCHEMAS[i % len(SCHEMAS)])) for i in range(requests)]
    # Warm-up: builds the llguidance tokenizer and compiles each schema once (cached afterwards).
    await run_all(engine, [SamplingParams(max_new_tokens=8, structured=c) for c in constraints[:2]], 2)
    constrained_s = free_s = 0.0
    tokens = 0
    # Alternate per group of ``concurrency`` requests, so that the load of this shared machine drifts
    # alike over both (whole-run alternation measured 0.7x-1.9x for the same code).
    for _ in range(rounds):
        for start in range(0, requests, concurrency):
            group = constraints[start : start + concurrency]
            params = [SamplingParams(max_new_tokens=200, structured=c) for c in group]
            seconds, counts = await run_all(engine, params, concurrency)
            constrained_s += seconds
            free = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in counts]
            seconds, free_counts = await run_all(engine, free, concurrency)
            assert free_counts == counts
            free_s += seconds
            tokens += sum(counts)
    return constrained_s / tokens, free_s / tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = build_demo_model(Path(tempfile.mkdtemp(prefix="lmi-bench-")) / "demo")
    context = WorkerContext(
        model_id=str(model),
        model_dir=str(model),
        backend="hf",
        options={},
        max_batch_size=max(args.concurrency),
    )
    engine = HFEngine(context, *load_model(context))
    try:
        for concurrency in args.concurrency:
            constrained, free = asyncio.run(measure(engine, args.requests, concurrency, args.rounds))
            print(
                f"c={concurrency:<3} constrained {constrained * 1e3:7.3f} ms/token"
                f"   free {free * 1e3:7.3f} ms/token   ratio {constrained / free:5.2f}x",
                flush=True,
            )
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
