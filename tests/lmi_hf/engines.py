"""A running ``HFEngine`` on the demo model, for the HF backend's engine-level tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from lmi_core.engine import Finished, GenerationRequest, Token, WorkerContext
from lmi_hf.engine import HFEngine
from lmi_hf.loading import load_model


@contextlib.contextmanager
def running_engine(model: Path, options: dict[str, str], max_batch_size: int = 4) -> Iterator[HFEngine]:
    """An engine with ``options`` (``option.*`` keys without the prefix), shut down on exit."""
    context = WorkerContext(
        model_id=str(model),
        model_dir=str(model),
        backend="hf",
        options=options,
        max_batch_size=max_batch_size,
    )
    model_obj, tokenizer = load_model(context)
    engine = HFEngine(context, model_obj, tokenizer)
    try:
        yield engine
    finally:
        engine.shutdown()


async def run_request(engine: HFEngine, request: GenerationRequest) -> tuple[list[Token], Finished]:
    """``request``'s tokens and its ``Finished``, straight from the engine."""
    tokens: list[Token] = []
    async for event in engine.generate(request):
        if isinstance(event, Token):
            tokens.append(event)
        else:
            return tokens, event
    raise AssertionError("no Finished event")
