"""Residency latencies: a request that loads its model (cold), one to a loaded model (warm), one that
evicts the loaded model and loads its own (evict-then-load), against a fresh ``lmi serve`` start.

For each model (the demo model, and a larger one built offline): a fresh ``lmi serve --model-dir``
is timed from spawn to its first answer (the baseline: what a user pays without residency). Then one
server with ``SERVING_MAX_LOADED_MODELS=1`` and two copies of the model, both registered to load on
demand, answers in turn: the first request to ``x`` (cold: its load), a second one (warm), the first
request to ``y`` (evict-then-load: ``x`` is unloaded first), then ``x`` again (the same), and so on
for ``--rounds``. Each request generates ``--tokens`` tokens. Prints the medians in seconds and as
ratios: cold / fresh start (the server's own start-up is what residency saves), evict-then-load /
cold (what unloading the other model costs) and warm / cold.

Usage: python benchmarks/bench_residency.py [--models demo,larger] [--rounds 2] [--tokens 8]
                                           [--larger-hidden 1024] [--larger-layers 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Server, model_dir
from lmi_core.demo_model import build_demo_model
from lmi_core.serving.residency import weights_bytes

TIMEOUT = 600.0


def ask(url: str, model: str, tokens: int) -> float:
    """Seconds until ``model`` answers one request of ``tokens`` tokens."""
    body = {"inputs": "hello world", "parameters": {"max_new_tokens": tokens, "ignore_eos_token": True}}
    started = time.perf_counter()
    response = httpx.post(f"{url}/predictions/{model}", json=body, timeout=TIMEOUT)
    response.raise_for_status()
    return time.perf_counter() - started


def fresh_start(directory: Path, tokens: int) -> float:
    """Spawn to first answer of a fresh ``lmi serve`` of ``directory``'s model (loaded at startup)."""
    started = time.perf_counter()
    with Server(directory, timeout=TIMEOUT) as server:
        ask(server.url, directory.name, tokens)
        return time.perf_counter() - started


def residency(root: Path, weights: Path, tokens: int, rounds: int) -> dict[str, float]:
    """Median seconds of a fresh start and of cold, warm and evict-then-load requests for ``weights``,
    and the size of its weights (MiB)."""
    on_demand = {"option.load_on_startup": "false"}
    first, second = (model_dir(root, name, weights, on_demand) for name in ("x", "y"))
    fresh = [fresh_start(model_dir(root, "fresh", weights, {}), tokens) for _ in range(rounds)]
    env = {"SERVING_MAX_LOADED_MODELS": "1"}
    cold, warm, evict = [], [], []
    with Server(first, env, timeout=TIMEOUT) as server:  # x registered, nothing loaded yet
        httpx.post(f"{server.url}/models", params={"url": str(second)}, timeout=TIMEOUT).raise_for_status()
        cold.append(ask(server.url, "x", tokens))
        warm.append(ask(server.url, "x", tokens))
        for i in range(rounds):
            model = "y" if i % 2 == 0 else "x"
            evict.append(ask(server.url, model, tokens))
            warm.append(ask(server.url, model, tokens))
    return {
        "fresh": statistics.median(fresh),
        "cold": statistics.median(cold),
        "warm": statistics.median(warm),
        "evict": statistics.median(evict),
        "weights_mib": weights_bytes(str(weights)) / 1024**2,
    }


def measure(
    root: Path, tokens: int, rounds: int, larger: tuple[int, int] | None, demo: bool = True
) -> dict[str, dict[str, float]]:
    """The figures for the demo model (unless ``demo`` is False) and, unless ``larger`` is None, a
    (hidden size, layers) model."""
    models = {"demo": build_demo_model(root / "weights-demo")} if demo else {}
    if larger is not None:
        hidden, layers = larger
        models["larger"] = build_demo_model(root / "weights-larger", hidden_size=hidden, num_layers=layers)
    return {name: residency(root / name, weights, tokens, rounds) for name, weights in models.items()}


def report(name: str, figures: dict[str, float]) -> str:
    return (
        f"{name} ({figures['weights_mib']:.0f} MiB of weights): fresh start {figures['fresh']:.2f} s, "
        f"cold {figures['cold']:.2f} s, "
        f"warm {figures['warm']:.3f} s, evict-then-load {figures['evict']:.2f} s; "
        f"cold / fresh start {figures['cold'] / figures['fresh']:.2f}, "
        f"evict-then-load / cold {figures['evict'] / figures['cold']:.2f}, "
        f"warm / cold {figures['warm'] / figures['cold']:.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # Each model alone fits a short run on a busy machine: --models demo, then --models larger.
    parser.add_argument("--models", default="demo,larger", help="demo, larger or both (comma-separated)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--larger-hidden", type=int, default=1024)
    parser.add_argument("--larger-layers", type=int, default=8)
    args = parser.parse_args()
    models = set(args.models.split(","))
    if not models or models - {"demo", "larger"}:
        parser.error(f"--models: demo, larger or demo,larger, not {args.models!r}")
    larger = (args.larger_hidden, args.larger_layers) if "larger" in models else None
    with tempfile.TemporaryDirectory(prefix="lmi-bench-residency-") as root:
        figures = measure(Path(root), args.tokens, args.rounds, larger, demo="demo" in models)
    for name, numbers in figures.items():
        print(report(name, numbers), flush=True)


if __name__ == "__main__":
    main()
