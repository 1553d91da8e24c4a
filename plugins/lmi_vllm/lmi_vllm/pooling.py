"""The vLLM engine of a pooling model (``option.task`` ``text-embedding`` or ``rerank``): vLLM's pooling
runner (``runner=pooling``, set by ``lmi_vllm.start.pooling_kwargs``) behind lmi's ``Embed`` and
``Score`` operations.

Each input is one request to ``AsyncLLM.encode``, all of an operation's at once: vLLM's scheduler
batches them with every other request's, as it batches generations. Inputs are tokenized here, on the
prompt thread, so that the length check, ``truncate`` and the token count are lmi's, the same as the
HF engine's. A cross-encoder reads a pair as one input (the tokenizer's pair encoding, its token
type ids passed as vLLM's own scoring does); an embedding model scores a pair by the cosine
similarity of its two vectors. Vectors come from vLLM as pooled and are cut (``dimensions``) and
normalized here, so that ``dimensions`` works for every model, not only those vLLM marks Matryoshka.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from lmi_core import BadRequestError, EngineError, GenerationEvent, GenerationRequest, WorkerContext, prompts
from lmi_core.operations import Embed, EmbedResult, Score, ScoreResult
from lmi_core.pooling import (
    Task,
    check_dimensions,
    cosine_scores,
    distinct_texts,
    no_embeddings,
    pooling_settings,
    vector_bytes,
    wrong_task,
)
from lmi_vllm.convert import map_error
from lmi_vllm.engine import VllmEngine


class VllmPoolingEngine(VllmEngine):
    """An ``AsyncLLM`` with a pooling runner; build it with ``VllmPoolingEngine.start``."""

    task: Task = "text-embedding"
    supported: tuple[str, ...] = ()  # vLLM's pooling tasks for this model (embed, classify)

    @classmethod
    def start(cls, context: WorkerContext) -> VllmPoolingEngine:
        engine = super().start(context)
        assert isinstance(engine, VllmPoolingEngine)
        engine.task = pooling_settings(context.options).task
        return engine

    async def start_on_loop(self) -> None:
        """As ``VllmEngine``'s, with a one-input pooling request as the warmup."""
        self._warmup, warmup = False, self._warmup
        await super().start_on_loop()
        self.supported = tuple(await self.llm.get_supported_tasks())
        if warmup:
            inputs = Embed(["warmup"]) if "embed" in self.supported else None
            await (self.embed(inputs) if inputs is not None else self.score(Score([("warm", "up")])))

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        raise wrong_task(self.llm.model_config.model, self.task, "generation requests")

    @property
    def normalizes(self) -> bool:
        """The model's embedding activation (L2 normalization) unless a request says otherwise."""
        config = self.llm.model_config.pooler_config
        return config is None or config.use_activation is not False

    async def embed(self, operation: Embed) -> EmbedResult:
        if "embed" not in self.supported:
            raise no_embeddings()
        check_dimensions(operation.dimensions, int(self.llm.model_config.get_hidden_size()))
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(self._prompts, self._inputs, operation)
        normalize = self.normalizes if operation.normalize is None else operation.normalize
        # The pooled vectors as they are (vLLM's embedding activation is the normalization): cut,
        # then normalized here, for every model and not only those vLLM marks Matryoshka.
        outputs = await self._encode_all([(ids, None) for ids in rows], "embed", False)
        import torch

        vectors = torch.stack([o.outputs.data for o in outputs])
        data, dims = vector_bytes(vectors, operation.dimensions, normalize)
        return EmbedResult(data, dims, sum(len(ids) for ids in rows))

    async def score(self, operation: Score) -> ScoreResult:
        loop = asyncio.get_running_loop()
        if "classify" in self.supported:  # a cross-encoder reads each pair as one input
            pairs = await loop.run_in_executor(
                self._prompts, prompts.pooling_pairs, operation, self.tokenizer, self.max_model_len
            )
            outputs = await self._encode_all(pairs, "classify", None)
            # One label: its probability (vLLM's sigmoid); several: the last (the positive class).
            scores = [float(o.outputs.data.flatten()[-1]) for o in outputs]
            return ScoreResult(scores, sum(len(ids) for ids, _ in pairs))
        texts, first, second = distinct_texts(operation.pairs)
        embed = Embed(texts, operation.truncate, param=operation.param)
        rows = await loop.run_in_executor(self._prompts, self._inputs, embed)
        outputs = await self._encode_all([(ids, None) for ids in rows], "embed", None)
        import torch

        vectors = torch.stack([o.outputs.data for o in outputs])
        return ScoreResult(cosine_scores(vectors, first, second), sum(len(ids) for ids in rows))

    async def _encode_all(
        self, inputs: list[tuple[list[int], list[int] | None]], task: str, activation: bool | None
    ) -> list[Any]:
        """One ``encode`` request per input, all at once; their final outputs in order. One failure
        (or a cancel) aborts the rest: vLLM aborts a request whose generator is cancelled."""
        self.requests.in_flight += 1
        tasks = [
            asyncio.ensure_future(self._encode_one(ids, types, task, activation)) for ids, types in inputs
        ]
        try:
            outputs = await asyncio.gather(*tasks)
        except BaseException:
            for pending in tasks:
                pending.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.requests.cancelled_total += 1
            raise
        finally:
            self.requests.in_flight -= 1
        self.requests.finished_total += 1
        return outputs

    def _inputs(self, operation: Embed) -> list[list[int]]:
        return prompts.pooling_inputs(operation, self.tokenizer, self.vocab_size, self.max_model_len)

    async def _encode_one(
        self, ids: list[int], types: list[int] | None, task: str, activation: bool | None
    ) -> Any:
        from vllm import PoolingParams

        params = PoolingParams(task=task, use_activation=activation)
        if types is not None and any(types):
            from vllm.entrypoints.pooling.scoring.utils import compress_token_type_ids

            params.extra_kwargs = {"compressed_token_type_ids": compress_token_type_ids(types)}
        final = None
        try:
            async for output in self.llm.encode(self.engine_input(ids), params, uuid.uuid4().hex):
                final = output
        except (asyncio.CancelledError, BadRequestError, EngineError):
            raise
        except Exception as exc:
            raise map_error(exc) from exc
        if final is None:
            raise EngineError("vLLM ended a pooling request without an output")
        return final
