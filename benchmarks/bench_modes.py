"""Python mode vs MPI mode (2 tensor-parallel ranks) on the same model, measured in one run.

(a) Time from ``lmi serve`` to /ping 200, and generation throughput through HTTP, per mode.
(b) Inside a 2-rank ``mpirun`` job: the per-step cost of broadcasting rank 0's step plan
    (``MpiCoordinator``, ``torch.distributed.broadcast_object_list``, mpi4py ``bcast``) and of one
    decode-step all-reduce (gloo vs mpi4py ``Allreduce``), the collective TP runs 2x per layer.

Usage: python benchmarks/bench_modes.py [--requests 16] [--concurrency 8] [--tokens 48] [--starts 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Server, model_dir, run_concurrent
from lmi_core.config import build_model_config
from lmi_core.demo_model import build_demo_model
from lmi_core.launch.launchers import free_ports, mpirun_argv

MODES = {
    "python": {},
    "mpi": {"option.mpi_mode": "true", "option.tensor_parallel_degree": "2"},
}


def measure_mode(base: Path, demo: Path, mode: str, args: argparse.Namespace) -> tuple[float, float]:
    """Median time to ready over ``args.starts`` starts, and tokens/s of the last server."""
    directory = model_dir(base, mode, demo, {"option.max_rolling_batch_size": "32", **MODES[mode]})
    texts = [f"Request {i}: the quick brown fox jumps over the lazy dog" for i in range(args.requests)]
    ready: list[float] = []
    for start in range(args.starts):
        with Server(directory) as server:
            ready.append(server.ready_seconds)
            if start == args.starts - 1:
                asyncio.run(run_concurrent(server.url, texts[:2], 2, 4))  # warm-up
                wall, results = asyncio.run(run_concurrent(server.url, texts, args.concurrency, args.tokens))
    return statistics.median(ready), sum(r.tokens for r in results) / wall


def per_call(fn: Callable[[], object], barrier: Callable[[], object], n: int) -> float:
    """Microseconds per call of ``fn`` (every rank runs it ``n`` times in step)."""
    barrier()
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n * 1e6


def rank_job(model: str, n: int) -> None:
    """Run inside each rank of ``mpirun -np 2``: time the collectives; rank 0 prints."""
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    from lmi_core.engine import WorkerContext
    from lmi_core.worker.rank_server import mpi_rank_and_size
    from lmi_hf.distributed import MpiCoordinator, init_distributed
    from lmi_hf.step import StepPlan

    rank, size = mpi_rank_and_size()
    group = init_distributed(WorkerContext(model, None, "hf", {}, mode="mpi", rank=rank, world_size=size))
    comm = MPI.COMM_WORLD
    coordinator = MpiCoordinator(rank, group)
    plan = StepPlan(admit=[(os.urandom(16).hex(), 1 << 62)], cancel=[os.urandom(16).hex()])
    mine = plan if rank == 0 else StepPlan()
    hidden = torch.ones(8, 1, 128)  # a decode step of 8 sequences of the demo model
    results = {
        "MpiCoordinator.exchange (gloo, 1 frame)": per_call(
            lambda: coordinator.exchange(mine), comm.Barrier, n
        ),
        "broadcast_object_list (gloo, pickle)": per_call(
            lambda: dist.broadcast_object_list([mine], src=0, group=group), comm.Barrier, n
        ),
        "mpi4py COMM_WORLD.bcast (pickle)": per_call(lambda: comm.bcast(mine, root=0), comm.Barrier, n),
        "all-reduce [8,1,128] fp32, gloo": per_call(lambda: dist.all_reduce(hidden), comm.Barrier, n),
        "all-reduce [8,1,128] fp32, mpi4py": per_call(
            lambda: comm.Allreduce(MPI.IN_PLACE, hidden.numpy()), comm.Barrier, n
        ),
    }
    if rank == 0:
        for name, micros in results.items():
            print(f"    {name:42s} {micros:8.0f} us", flush=True)


def collectives(demo: Path, n: int) -> None:
    config = build_model_config({"option.tensor_parallel_degree": "2"}, model_dir=str(demo), environ={})
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_ports())}
    command = [sys.executable, __file__, "--rank-job", str(demo), "--calls", str(n)]
    run = subprocess.run([*mpirun_argv(config, env), *command], env=env, capture_output=True, text=True)
    lines = [line.split(":", 1)[1] for line in run.stdout.splitlines() if line.startswith("[1,0]<stdout>:")]
    print("\n".join(lines) if run.returncode == 0 else run.stdout + run.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--starts", type=int, default=2, help="server starts per mode (median time to ready)")
    parser.add_argument("--calls", type=int, default=2000, help="calls per collective in (b)")
    parser.add_argument("--rank-job", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_job:
        rank_job(args.rank_job, args.calls)
        return
    base = Path(tempfile.mkdtemp(prefix="lmi-bench-modes-"))
    demo = build_demo_model(base / "demo")
    load = f"{args.requests} requests x {args.tokens} tokens, concurrency {args.concurrency}"
    print(f"(a) {load}, {os.cpu_count()} CPUs")
    measured = {mode: measure_mode(base, demo, mode, args) for mode in MODES}
    for mode, (ready, tps) in measured.items():
        print(f"    {mode:7s} ready in {ready:5.1f} s   {tps:8.1f} tokens/s")
    (py_ready, py_tps), (mpi_ready, mpi_tps) = measured["python"], measured["mpi"]
    print(
        f"    ratio mpi/python: time to ready {mpi_ready / py_ready:.2f}, throughput {mpi_tps / py_tps:.2f}"
    )
    print(f"(b) per call, 2 ranks, {args.calls} calls")
    collectives(demo, args.calls)


if __name__ == "__main__":
    main()
