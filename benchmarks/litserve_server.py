"""LitServe's streaming server with an engine that yields tokens as fast as it can (the baseline of
``benchmarks/bench_litserve.py``); run with the LitServe venv: ``python litserve_server.py --port N``.

The same work per token as ``benchmarks/synthetic_engine.py``: a constant text, a yield to the
event loop every 16 tokens. ``POST /predict`` ``{"n": tokens}`` streams one JSON object per token.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import litserve as ls


class StreamingAPI(ls.LitAPI):  # type: ignore[misc]  # litserve is not in lmi's typed environment
    def setup(self, device: str) -> None:
        pass

    # Unannotated: LitServe builds the route's request and response models from these annotations.
    async def decode_request(self, request):  # type: ignore[no-untyped-def]
        return int(request["n"])

    async def predict(self, n: int) -> AsyncIterator[str]:
        for i in range(n):
            yield " tok"
            if i % 16 == 15:
                await asyncio.sleep(0)

    async def encode_response(self, outputs):  # type: ignore[no-untyped-def]
        async for text in outputs:
            yield {"text": text}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    api = StreamingAPI(stream=True, enable_async=True, max_batch_size=1)
    # fast_queue: ZeroMQ between the API server and the inference worker, LitServe's fastest transport.
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=False, fast_queue=True)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
