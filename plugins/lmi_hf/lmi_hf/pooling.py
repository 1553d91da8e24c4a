"""The HF backend's pooling engine: embeddings and scores from a transformers encoder or decoder.

Requests arrive as operations (``Embed``, ``Score``) on the worker's event loop; their inputs are
tokenized on the prompt threads and become rows of a job; one scheduler thread runs forwards of at most
``max_rolling_batch_size`` rows, taken round-robin from every waiting job, so that requests arriving
together share forwards and a request of a thousand inputs delays a one-input request by one forward,
not by its whole batch (continuous batching, as the generation engine does with sequences). A row's
vector goes back to its job; a job complete resolves its operation's future on the loop.

Invariant: the event loop never runs the model or the tokenizer, and only the scheduler thread runs
the model; a job cancelled (its client left, its deadline passed) takes no further forward.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lmi_core import prompts
from lmi_core.engine import EngineStats, GenerationEvent, GenerationRequest, WorkerContext
from lmi_core.errors import EngineError
from lmi_core.operations import Embed, EmbedResult, Score, ScoreResult, Tokenize, TokenizeResult
from lmi_core.pooling import (
    Pooling,
    PoolingSettings,
    check_dimensions,
    cosine_scores,
    distinct_texts,
    no_embeddings,
    pooling_settings,
    vector_bytes,
    wrong_task,
)
from lmi_hf.loading import load_with

logger = logging.getLogger(__name__)

PROMPT_THREADS = 2  # as the generation engine: tokenizing grows with the input, off the event loop

Head = Literal["embed", "classify"]


@dataclass
class Row:
    """One forward row: token ids, and token type ids for a cross-encoder's pair."""

    ids: list[int]
    types: list[int] | None = None


@dataclass
class Job:
    """One operation's rows and what came back for them, in order."""

    rows: list[Row]
    finish: Callable[[torch.Tensor], Any]  # the stacked outputs -> the operation's result
    resolve: Callable[[Any], None]  # hands the result (or an exception) to the event loop
    taken: int = 0  # rows handed to forwards so far
    outputs: list[torch.Tensor] = field(default_factory=list)
    cancelled: bool = False


class HFPoolingEngine:
    """A loaded pooling model and the scheduler thread that batches its rows."""

    def __init__(
        self,
        context: WorkerContext,
        model: Any,
        tokenizer: Any,
        settings: PoolingSettings,
        pooling: Pooling,
        max_length: int,
        head: Head,
    ) -> None:
        self.context = context
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.pooling = pooling
        self.head = head
        self.max_model_len = max_length
        self.device = next(model.parameters()).device
        self.max_batch_size = context.max_batch_size
        self.vocab_size = int(getattr(model.config, "vocab_size", None) or len(tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._prompts = ThreadPoolExecutor(PROMPT_THREADS, thread_name_prefix="lmi-hf-prompt")
        self.codec = prompts.PromptCodec(tokenizer, self._decode, self.vocab_size, self._prompts)
        self._lock = threading.Condition()
        self._jobs: list[Job] = []  # waiting or running, in arrival order
        self._stopping = False
        self._totals = EngineStats()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="lmi-hf-pooling", daemon=True)
        self._thread.start()

    # -- asyncio side ----------------------------------------------------------------------------

    async def embed(self, operation: Embed) -> EmbedResult:
        if self.head != "embed":
            raise no_embeddings()
        check_dimensions(operation.dimensions, int(self.model.config.hidden_size))
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(self._prompts, self._rows, operation)
        normalize = self.settings.normalize if operation.normalize is None else operation.normalize

        def finish(vectors: torch.Tensor) -> EmbedResult:
            data, width = vector_bytes(vectors, operation.dimensions, normalize)
            return EmbedResult(data, width, sum(len(r.ids) for r in rows))

        result: EmbedResult = await self._submit(rows, finish)
        return result

    async def score(self, operation: Score) -> ScoreResult:
        loop = asyncio.get_running_loop()
        if self.head == "classify":  # a cross-encoder reads each pair as one input
            rows = await loop.run_in_executor(self._prompts, self._pair_rows, operation)

            def finish(logits: torch.Tensor) -> ScoreResult:
                # One label: its sigmoid (sentence-transformers' CrossEncoder and vLLM's default);
                # several: the probability of the last (the positive class of a binary classifier).
                scores = logits[:, 0].sigmoid() if logits.shape[1] == 1 else logits.softmax(-1)[:, -1]
                return ScoreResult(scores.tolist(), sum(len(r.ids) for r in rows))

            result: ScoreResult = await self._submit(rows, finish)
            return result
        # An embedding model: the cosine similarity of the two texts' vectors, each text embedded once.
        texts, first, second = distinct_texts(operation.pairs)
        rows = await loop.run_in_executor(
            self._prompts, self._rows, Embed(texts, operation.truncate, param=operation.param)
        )

        def similarities(vectors: torch.Tensor) -> ScoreResult:
            return ScoreResult(cosine_scores(vectors, first, second), sum(len(r.ids) for r in rows))

        cosine: ScoreResult = await self._submit(rows, similarities)
        return cosine

    async def tokenize(self, operation: Tokenize) -> TokenizeResult:
        return await self.codec.tokenize(operation)

    async def detokenize(self, ids: list[int]) -> str:
        return await self.codec.detokenize(ids)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        raise wrong_task(self.context.model_id, self.settings.task, "generation requests")
        yield  # an async generator, as the protocol has it

    async def _submit(self, rows: list[Row], finish: Callable[[torch.Tensor], Any]) -> Any:
        """Queue ``rows`` as one job and wait for its result; cancelling stops its forwards."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def resolve(value: Any) -> None:
            loop.call_soon_threadsafe(_settle, future, value)

        job = Job(rows, finish, resolve)
        with self._lock:
            if self._stopping:
                raise EngineError("engine stopping", status=503)
            self._jobs.append(job)
            self._lock.notify()
        try:
            return await future
        finally:
            job.cancelled = True  # a no-op once it finished; else its remaining rows are dropped

    def _rows(self, operation: Embed) -> list[Row]:
        return [
            Row(ids)
            for ids in prompts.pooling_inputs(operation, self.tokenizer, self.vocab_size, self.max_model_len)
        ]

    def _pair_rows(self, operation: Score) -> list[Row]:
        return [
            Row(ids, types)
            for ids, types in prompts.pooling_pairs(operation, self.tokenizer, self.max_model_len)
        ]

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout=5)
        self._prompts.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> EngineStats:
        if self.error:
            raise RuntimeError(self.error)
        with self._lock:
            running = sum(1 for job in self._jobs if job.taken)
            return dataclasses.replace(self._totals, running=running, waiting=len(self._jobs) - running)

    def _decode(self, ids: Any) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    # -- scheduler thread ------------------------------------------------------------------------

    def _next_forward(self) -> list[tuple[Job, Row]] | None:
        """Wait for rows, then take up to ``max_batch_size`` of them, one job after another in turn
        (None: stopping). Cancelled jobs leave the queue here."""
        with self._lock:
            while True:
                for job in [j for j in self._jobs if j.cancelled]:
                    self._jobs.remove(job)
                    self._totals.cancelled_total += 1
                if self._stopping:
                    return None
                if self._jobs:
                    break
                self._lock.wait()
            return take_rows(self._jobs, self.max_batch_size)

    def _run(self) -> None:
        try:
            while (batch := self._next_forward()) is not None:
                try:
                    outputs = self._forward([row for _, row in batch])
                except Exception as exc:  # the batch's jobs fail; the engine goes on
                    logger.exception("pooling forward failed")
                    self._fail({id(job): job for job, _ in batch}.values(), exc)
                    continue
                for (job, _), output in zip(batch, outputs, strict=True):
                    job.outputs.append(output)
                self._complete([job for job, _ in batch])
        except Exception as exc:  # the engine is broken: fail every job, report unhealthy
            logger.exception("pooling thread failed")
            self.error = f"{exc.__class__.__name__}: {exc}"
            with self._lock:
                jobs, self._jobs = self._jobs, []
            self._fail(jobs, exc)

    def _complete(self, touched: list[Job]) -> None:
        for job in {id(j): j for j in touched}.values():
            if len(job.outputs) < len(job.rows) or job.cancelled:
                continue
            with self._lock:
                if job in self._jobs:
                    self._jobs.remove(job)
                self._totals.finished_total += 1
            try:
                job.resolve(job.finish(torch.stack(job.outputs)))
            except Exception as exc:
                job.resolve(exc)

    def _fail(self, jobs: Any, exc: Exception) -> None:
        error = EngineError(f"{exc.__class__.__name__}: {exc}")
        with self._lock:
            for job in jobs:
                if job in self._jobs:
                    self._jobs.remove(job)
                job.resolve(error)

    @torch.inference_mode()
    def _forward(self, rows: list[Row]) -> torch.Tensor:
        """One forward of ``rows`` (right-padded): a pooled vector per row, or a cross-encoder's logits."""
        width = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row.ids)] = torch.tensor(row.ids)
            mask[i, : len(row.ids)] = 1
        inputs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if any(r.types is not None for r in rows):
            types = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                if row.types is not None:
                    types[i, : len(row.types)] = torch.tensor(row.types)
            inputs["token_type_ids"] = types.to(self.device)
        out = self.model(**inputs)
        if self.head == "classify":
            logits: torch.Tensor = out.logits.float().cpu()
            return logits
        return pool(out.last_hidden_state, inputs["attention_mask"], self.pooling).float().cpu()


def load_pooling_engine(context: WorkerContext) -> HFPoolingEngine:
    """Load ``context``'s model for its task: a cross-encoder (``*ForSequenceClassification``) for
    ``rerank``, else the base model (an encoder, or a decoder without its LM head) whose hidden states
    are pooled."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    settings = pooling_settings(context.options)
    config = AutoConfig.from_pretrained(context.model_id, trust_remote_code=context.trust_remote_code)
    architectures = getattr(config, "architectures", None) or []
    classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    head: Head = "classify" if settings.task == "rerank" and classifier else "embed"
    model_class = AutoModelForSequenceClassification if head == "classify" else AutoModel
    model, tokenizer = load_with(model_class, context)
    st = sentence_transformers_config(Path(context.model_id))
    decoder = any(a.endswith("ForCausalLM") for a in architectures)
    pooling = settings.pooling or st.pooling or ("last" if decoder else "cls")
    limit = context.options.get("max_model_len") or st.max_seq_length
    limit = limit or getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length
    logger.info("pooling model: %s head, %s pooling, %s tokens", head, pooling, limit)
    return HFPoolingEngine(context, model, tokenizer, settings, pooling, int(limit), head)


@dataclass(frozen=True)
class SentenceTransformersConfig:
    """What a sentence-transformers model directory says about its pooling and length (if anything)."""

    pooling: Pooling | None = None
    max_seq_length: int | None = None


def sentence_transformers_config(directory: Path) -> SentenceTransformersConfig:
    """The pooling of the ``Pooling`` module in ``modules.json`` and ``sentence_bert_config.json``'s
    ``max_seq_length``: the model's own, which ``sentence-transformers`` and vLLM apply too."""
    pooling: Pooling | None = None
    try:
        modules = json.loads((directory / "modules.json").read_text())
        folder = next(m["path"] for m in modules if str(m.get("type", "")).endswith(".Pooling"))
        modes = json.loads((directory / folder / "config.json").read_text())
        if modes.get("pooling_mode_cls_token"):
            pooling = "cls"
        elif modes.get("pooling_mode_lasttoken"):
            pooling = "last"
        elif modes.get("pooling_mode_mean_tokens"):
            pooling = "mean"
    except (OSError, ValueError, StopIteration, KeyError, TypeError):
        pass  # not a sentence-transformers directory (or a hub id): the defaults apply
    length: int | None = None
    try:
        length = int(json.loads((directory / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return SentenceTransformersConfig(pooling, length)


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: Pooling) -> torch.Tensor:
    """One vector per row of ``hidden`` [rows, tokens, width] (right-padded; ``mask`` marks tokens)."""
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.sum(-1) - 1]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def take_rows(jobs: list[Job], limit: int) -> list[tuple[Job, Row]]:
    """Up to ``limit`` rows not yet taken, one from each job in turn (arrival order): every waiting job
    gets a share of the next forward, and none waits for another's whole batch."""
    taken: list[tuple[Job, Row]] = []
    active = [j for j in jobs if j.taken < len(j.rows)]
    while active and len(taken) < limit:
        for job in active:
            if len(taken) == limit:
                break
            taken.append((job, job.rows[job.taken]))
            job.taken += 1
        active = [j for j in active if j.taken < len(j.rows)]
    return taken


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if future.done():  # cancelled while its forward ran
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)
