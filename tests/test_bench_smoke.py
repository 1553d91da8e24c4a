"""The stack benchmark, CI-sized (``benchmarks/bench_http.py``'s synthetic part, a few seconds): it runs
end to end and prints its figures; no thresholds (wall clock on a shared machine is not a verdict)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.bench_http import stack_alone

pytestmark = pytest.mark.slow


def test_stack_benchmark_runs_and_prints_its_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    figures = stack_alone(tmp_path, stream_tokens=2000, short_requests=20)
    with capsys.disabled():
        print(
            f"\nstack smoke: HTTP {figures['http_tok_s']:.0f} tokens/s = "
            f"{figures['http_tok_s'] / figures['in_process_tok_s']:.4f} of in-process; "
            f"gap p50/p99 {figures['gap_p50_us']:.0f}/{figures['gap_p99_us']:.0f} us; "
            f"TTFT p50/p99 {figures['ttft_p50_ms']:.2f}/{figures['ttft_p99_ms']:.2f} ms"
        )
    assert figures["http_tok_s"] > 0 and figures["ttft_p50_ms"] > 0


def test_lora_benchmark_runs_and_prints_its_ratio(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.bench_lora import lora_vs_base

    figures = lora_vs_base(tmp_path, requests=10, concurrency=16, tokens=4, rounds=1)
    with capsys.disabled():
        print(f"\nlora smoke: 4 adapters + base = {figures['ratio']:.3f} of base-only tokens/s")
    assert figures["base_tok_s"] > 0 and figures["mixed_tok_s"] > 0


def test_tenants_benchmark_runs_and_prints_its_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from benchmarks.bench_tenants import run

    args = argparse.Namespace(
        seconds=1.0, weights_seconds=1.0, flood=4, slots=2, tokens=4, interval=0.01, rounds=1
    )
    figures = run(tmp_path, args)
    with capsys.disabled():
        print(
            "\ntenants smoke: B's TTFT p95 under a flood / alone: "
            f"fifo {figures['fifo_b_ttft_p95_ratio']:.2f}, "
            f"fair {figures['fair_b_ttft_p95_ratio']:.2f}, budget {figures['budget_b_ttft_p95_ratio']:.2f}; "
            f"CPU per token with / without tenants {figures['cpu_per_token_ratio']:.3f}"
        )
    assert figures["fair_b_tok_s"] > 0 and figures["machinery_us_per_token"] > 0


def test_residency_benchmark_runs_and_prints_its_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks.bench_residency import measure, report

    figures = measure(tmp_path, tokens=2, rounds=1, larger=None)["demo"]
    with capsys.disabled():
        print(f"\nresidency smoke: {report('demo', figures)}")
    assert all(seconds > 0 for seconds in figures.values())


def test_embeddings_benchmark_runs_and_prints_its_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks.bench_embeddings import compare, report

    table = compare(tmp_path, count=32, rounds=1, with_vllm=False)
    with capsys.disabled():
        print("\nembeddings smoke (ratios to in-process sentence-transformers):")
        report(table)
    assert all(row["in_process_per_s"] > 0 and row["ratios"]["lmi-core (hf)"] > 0 for row in table.values())


@pytest.mark.vllm
@pytest.mark.timeout(900)  # two servers of two vLLM engines each start (~2 min each on a loaded host)
def test_vs_vllm_dp_benchmark_runs_and_prints_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    """``bench_vs_vllm_dp.py`` CI-sized (the vLLM stage: it starts vLLM's own DP server), lmi with
    ``prefix_aware`` only (least_loaded is the same server routed otherwise): every server answers
    every workload; the table is printed, the figures are not judged."""
    import signal
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_vs_vllm_dp.py"
    tiny = "--tenants 2 --questions 2 --context-words 30 --pressure-words 60 --sessions 2 --turns 2"
    tiny += " --distinct 4 --poisson 4 --rate 4 --tokens 4 --routing prefix_aware"
    argv = [sys.executable, str(script), *tiny.split()]
    bench = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = bench.communicate(timeout=780)
    except subprocess.TimeoutExpired:
        # Ctrl-C, as a user would: the benchmark stops its servers (their process groups) on the way out;
        # a kill would leave them running.
        bench.send_signal(signal.SIGINT)
        out, err = bench.communicate(timeout=90)
        pytest.fail("the benchmark ran over 780 s:\n" + out[-3000:] + err[-3000:])
    assert bench.returncode == 0, out[-3000:] + err[-3000:]
    table = [line for line in out.splitlines() if line.startswith("| ")]
    with capsys.disabled():
        print("\nvs vLLM DP smoke:\n" + "\n".join(table))
    workloads = {line.split(" | ")[0].removeprefix("| ") for line in table[2:]}
    assert workloads == {"shared", "pressure", "sessions", "distinct", "poisson"}
    for line in table:
        if "output tok/s" in line:  # both servers' cells: each served tokens
            assert all(float(cell) > 0 for cell in line.split("|")[3:5]), line
