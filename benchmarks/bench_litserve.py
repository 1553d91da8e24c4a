"""lmi-core's stack alone against LitServe's: the same synthetic engine work, the same client, one run.

Both servers stream tokens that cost nothing to make (a constant text, a yield to the event loop every
16 tokens: ``benchmarks/synthetic_engine.py`` in lmi's worker, ``benchmarks/litserve_server.py`` in
LitServe's inference worker), so what is measured is the serving stack: lmi's server, socket and
worker process against LitServe's API server, queues and worker process. The client is a raw
asyncio HTTP/1.1 client that counts tokens with ``bytes.count`` (no JSON parsing), and reports its
own CPU: a client that used a whole core would be the limit, not the servers. Servers are measured
alternately (lmi, LitServe, lmi, ...); figures are medians of the rounds; ratios are lmi / LitServe.

    make setup-litserve     # LitServe in .venv-litserve, away from lmi's pins
    .venv/bin/python benchmarks/bench_litserve.py [--rounds 3] [--tokens 5000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, Server, model_dir, percentile

# A token's text in both servers' stream lines: lmi's ``"text": " tok"``, LitServe's ``{"text": " tok"}``;
# lmi's final ``generated_text`` (" tok tok ...") does not match it (no quote after a token's text).
MARKER = b'" tok"'
LITSERVE_PYTHON = ROOT / ".venv-litserve" / "bin" / "python"


@dataclass
class Stream:
    ttft: float  # seconds to the first token
    seconds: float  # to the end of the response
    tokens: int


async def stream(url: str, path: str, body: dict[str, object]) -> Stream:
    """POST ``body`` and read the streamed response to its end, counting ``MARKER``s as they arrive."""
    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {parts.netloc}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n"
    )
    writer.write(head.encode() + payload)
    tokens, first, tail, status = 0, 0.0, b"", b""
    try:
        while chunk := await reader.read(1 << 16):
            if not status:
                status = chunk.split(b"\r\n", 1)[0]
                if b" 200 " not in status:
                    raise RuntimeError(f"{url}{path}: {status.decode(errors='replace')}")
            window = tail + chunk  # a marker cut between two reads is counted once
            found = window.count(MARKER)
            if found and not tokens:
                first = time.perf_counter() - started
            tokens += found
            tail = window[-(len(MARKER) - 1) :]
    finally:
        writer.close()
    return Stream(first, time.perf_counter() - started, tokens)


def request_for(server: str, tokens: int) -> tuple[str, dict[str, object]]:
    if server == "lmi":
        return "/invocations", {
            "inputs": "x",
            "parameters": {"max_new_tokens": tokens, "ignore_eos_token": True},
            "stream": True,
        }
    return "/predict", {"n": tokens}


async def measure(url: str, server: str, tokens: int, concurrency: int, short: int) -> dict[str, float]:
    """One round against one server: a single long stream, ``concurrency`` long streams at once, and
    ``short`` sequential 1-token requests (their time to first token); the client's CPU share."""
    path, body = request_for(server, tokens)
    cpu, wall = time.process_time(), time.perf_counter()
    (single,) = await asyncio.gather(stream(url, path, body))
    started = time.perf_counter()
    many = await asyncio.gather(*(stream(url, path, body) for _ in range(concurrency)))
    many_seconds = time.perf_counter() - started
    one_path, one_body = request_for(server, 1)
    firsts = [(await stream(url, one_path, one_body)).ttft * 1000 for _ in range(short)]
    client_share = (time.process_time() - cpu) / (time.perf_counter() - wall)
    for result in (single, *many):
        assert result.tokens == tokens, f"{server}: {result.tokens} of {tokens} tokens"
    return {
        "tok_s_1": tokens / single.seconds,
        f"tok_s_{concurrency}": concurrency * tokens / many_seconds,
        "ttft_p50": statistics.median(firsts),
        "ttft_p99": percentile(firsts, 0.99),
        "client_cpu": client_share,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=5000, help="tokens of each long stream")
    parser.add_argument("--concurrency", type=int, default=16, help="long streams at once")
    parser.add_argument("--short", type=int, default=200, help="sequential 1-token requests (TTFT)")
    parser.add_argument("--litserve-python", type=Path, default=LITSERVE_PYTHON)
    args = parser.parse_args()
    if not args.litserve_python.exists():
        sys.exit(f"{args.litserve_python} not found: make setup-litserve (LitServe in its own venv)")
    base = Path(tempfile.mkdtemp(prefix="lmi-bench-litserve-"))
    properties = {"option.model_id": "synthetic", "option.backend": "synthetic"}
    lmi = Server(
        model_dir(base, "synthetic", None, properties), {"LMI_EXTRA_PLUGINS": "benchmarks.synthetic_engine"}
    )
    litserve = Server(
        None,
        command=[str(args.litserve_python), str(ROOT / "benchmarks" / "litserve_server.py")],
        ready_path="/health",
    )
    servers = {"lmi": lmi, "litserve": litserve}
    rows: dict[str, dict[str, list[float]]] = {name: {} for name in servers}
    try:
        for name, server in servers.items():  # warm both
            asyncio.run(measure(server.url, name, 1000, 2, 10))
        for round_ in range(args.rounds):
            for name, server in servers.items():
                figures = asyncio.run(measure(server.url, name, args.tokens, args.concurrency, args.short))
                for key, value in figures.items():
                    rows[name].setdefault(key, []).append(value)
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    finally:
        lmi.stop()
        litserve.stop()
    names = {
        "tok_s_1": "tokens/s, one stream",
        f"tok_s_{args.concurrency}": f"tokens/s, {args.concurrency} streams",
        "ttft_p50": "TTFT p50 (ms), 1-token requests",
        "ttft_p99": "TTFT p99 (ms), 1-token requests",
        "client_cpu": "client CPU, share of a core",
    }
    print(f"\n{args.tokens} tokens per stream, {args.rounds} alternating rounds, medians\n")
    print("| metric | lmi | LitServe | lmi / LitServe |\n| --- | --- | --- | --- |")
    for key, label in names.items():
        ours, theirs = (statistics.median(rows[n][key]) for n in servers)
        print(f"| {label} | {ours:.4g} | {theirs:.4g} | {ours / theirs:.2f} |")


if __name__ == "__main__":
    main()
