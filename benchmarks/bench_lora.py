"""Throughput of a mix of 4 LoRA adapters + the base model vs the base model alone, on one HF engine.

One engine (``option.enable_lora=true``, ``max_loras=4``) on the demo model, 4 random PEFT adapters
(``tests/lora_adapters.py``) loaded ahead (``load_adapter``: steady state, not first-use reads). The
same requests (``ignore_eos``, equal token counts) run at the same concurrency twice per round: every
request on the base model, then round-robin over base, A, B, C, D; so both runs do the same number of
forward passes and differ by PEFT's mixed-adapter work (per adapter, a LoRA matmul on its rows of each
targeted layer). Rounds alternate the two so that the load of a shared machine drifts alike over both.
Prints generated tokens/s of each and the ratio mixed / base.

Usage: python benchmarks/bench_lora.py [--concurrency 16] [--requests 32] [--tokens 32] [--rounds 2]
                                      [--hidden-size 128] [--layers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmi_core.demo_model import build_demo_model
from lmi_core.engine import GenerationRequest, LoraAdapter, SamplingParams, Token, WorkerContext
from lmi_hf.engine import HFEngine
from lmi_hf.loading import load_model
from tests.lora_adapters import build_adapter

PROMPTS = ["Hello", "The quick brown fox", "one two three four", "Large language model serving is"]
ADAPTERS = 4


async def run_all(
    engine: HFEngine, adapters: list[LoraAdapter | None], concurrency: int, tokens: int
) -> float:
    """One request per entry of ``adapters`` (``concurrency`` at a time); generated tokens per second."""
    semaphore = asyncio.Semaphore(concurrency)
    counts = [0] * len(adapters)

    async def one(i: int) -> None:
        async with semaphore:
            request = GenerationRequest(
                f"b{i}-{time.monotonic_ns()}",
                prompt=PROMPTS[i % len(PROMPTS)],
                params=SamplingParams(max_new_tokens=tokens, ignore_eos=True),
                adapter=adapters[i],
            )
            async for event in engine.generate(request):
                counts[i] += isinstance(event, Token)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(len(adapters))))
    return sum(counts) / (time.perf_counter() - started)


async def measure(
    engine: HFEngine, adapters: list[LoraAdapter], requests: int, concurrency: int, tokens: int, rounds: int
) -> tuple[float, float]:
    """Mean tokens/s of (base only, mix of adapters + base) over ``rounds``."""
    for adapter in adapters:
        await engine.load_adapter(adapter)
    choices: list[LoraAdapter | None] = [None, *adapters]
    mix = [choices[i % len(choices)] for i in range(requests)]
    base: list[LoraAdapter | None] = [None] * requests
    await run_all(engine, mix[: len(choices)], len(choices), 4)  # warm-up
    base_rates, mix_rates = [], []
    for _ in range(rounds):
        base_rates.append(await run_all(engine, base, concurrency, tokens))
        mix_rates.append(await run_all(engine, mix, concurrency, tokens))
    return sum(base_rates) / rounds, sum(mix_rates) / rounds


def lora_vs_base(
    root: Path,
    requests: int,
    concurrency: int,
    tokens: int,
    rounds: int,
    hidden_size: int = 128,
    layers: int = 2,
) -> dict[str, float]:
    """Build the model (the demo model, or a wider/deeper one) and adapters under ``root``, measure,
    return tokens/s and the ratio."""
    model = build_demo_model(root / "demo", hidden_size=hidden_size, num_layers=layers)
    adapters = [
        LoraAdapter(f"adapter-{i}", str(build_adapter(model, root / f"adapter-{i}", seed=i)))
        for i in range(ADAPTERS)
    ]
    context = WorkerContext(
        model_id=str(model),
        model_dir=str(model),
        backend="hf",
        options={"enable_lora": "true", "max_loras": str(ADAPTERS)},
        max_batch_size=concurrency,
    )
    engine = HFEngine(context, *load_model(context))
    try:
        base, mixed = asyncio.run(measure(engine, adapters, requests, concurrency, tokens, rounds))
    finally:
        engine.shutdown()
    return {"base_tok_s": base, "mixed_tok_s": mixed, "ratio": mixed / base}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=128, help="128: the demo model")
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lmi-bench-"))
    figures = lora_vs_base(
        root, args.requests, args.concurrency, args.tokens, args.rounds, args.hidden_size, args.layers
    )
    print(
        f"hidden {args.hidden_size} x {args.layers} layers, c={args.concurrency}: "
        f"base only {figures['base_tok_s']:8.1f} tokens/s   "
        f"{ADAPTERS} adapters + base {figures['mixed_tok_s']:8.1f} tokens/s   ratio {figures['ratio']:.3f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
