"""The HuggingFace engine: a scheduler thread running continuous batching over a causal LM.

Requests are submitted from the worker's asyncio loop; the scheduler thread admits them at step
boundaries (up to ``max_rolling_batch_size``), decodes all running sequences in one forward pass per
step, and sends token events back to the loop. Each step starts from a ``StepPlan`` (which requests
join, which are cancelled, which LoRA adapters load or leave: ``lmi_hf.adapters``): in MPI mode rank 0
makes the plan and every rank applies the same one.

Beside it: ``lmi_hf.loading`` loads the model, ``lmi_hf.prompt`` encodes a request's prompt (on a prompt
thread), ``lmi_hf.step`` holds what a step works on (the plan, the coordinator, a request's state).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import threading
from collections.abc import AsyncGenerator
from collections.abc import Sequence as SequenceOf  # `Sequence` here is a request in the batch
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from lmi_core import prompts
from lmi_core.engine import (
    EngineStats,
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    LoraAdapter,
    Token,
    WorkerContext,
)
from lmi_core.errors import BadRequestError, EngineError, EngineFailedError, EngineOutOfMemoryError
from lmi_core.operations import Tokenize, TokenizeResult
from lmi_core.option_values import lora_settings
from lmi_core.request_checks import check_logit_bias, check_prompt_length, token_budget, tokenizer_token_bytes
from lmi_hf.adapters import AdapterSet
from lmi_hf.batch import Batch, decode, prefill
from lmi_hf.grammar import GrammarCompiler
from lmi_hf.prompt import encode_prompt
from lmi_hf.sampling import make_generator, position_seed, select_token
from lmi_hf.scoring import prompt_logprobs
from lmi_hf.step import Coordinator, Emit, LocalCoordinator, Sequence, StepPlan
from lmi_hf.text import IncrementalDetokenizer, StopMatcher
from lmi_hf.vision import ImageInputs, to_device

logger = logging.getLogger(__name__)

# Tokenizing and templating grow with the prompt: 1 MB of text took 4.5 s on the 2-core test machine,
# so a 30 MB prompt on the worker's event loop stopped its heartbeats and got it killed as hung. They
# run on these threads instead (bounded: a burst of huge prompts queues here, not in 32 threads).
PROMPT_THREADS = 2


def kv_cache_usage(running: SequenceOf[Sequence], max_batch_size: int, max_model_len: int) -> float:
    """The HF engine's KV utilisation, 0..1: the tokens its running sequences hold in the cache (prompt
    plus generated, resumed ones included) over the most it can hold, ``max_batch_size`` full contexts.
    It has no paged cache to measure: its cache grows with the batch, and this is the share of the
    batch's room in use (left padding, which the real tensors also hold, is not counted)."""
    held = sum(len(s.prompt_ids) + s.generated for s in running)
    return min(1.0, held / max(1, max_batch_size * max_model_len))


class HFEngine:
    """A loaded model plus the scheduler thread that batches its requests."""

    def __init__(
        self,
        context: WorkerContext,
        model: Any,
        tokenizer: Any,
        coordinator: Coordinator | None = None,
        images: ImageInputs | None = None,
    ) -> None:
        self.context = context
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.coordinator: Coordinator = coordinator or LocalCoordinator()
        self.max_batch_size = context.max_batch_size
        # An image-text-to-text model's config nests its language model's (get_text_config).
        text_config = model.config.get_text_config()
        limit: Any = context.options.get("max_model_len") or getattr(
            text_config, "max_position_embeddings", 2048
        )
        self.max_model_len = int(limit)
        # option.max_input_length: prompt tokens; the context by default (one token left to generate).
        self.max_input_length = int(context.options.get("max_input_length") or self.max_model_len - 1)
        # The most bytes of prompt one token stands for (None: no bound holds for this tokenizer).
        self.max_token_bytes = tokenizer_token_bytes(tokenizer)
        self._prompts = ThreadPoolExecutor(PROMPT_THREADS, thread_name_prefix="lmi-hf-prompt")
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.vocab_size = int(text_config.vocab_size)
        self.images = images  # an image-text-to-text model's processor; None: a text-only model
        self.max_images = images.max_images if images is not None else 0  # lmi_core.ImageEngine
        self.codec = prompts.PromptCodec(tokenizer, self._decode, self.vocab_size, self._prompts)
        self.grammars = GrammarCompiler(tokenizer, model.get_output_embeddings().out_features, self.eos_ids)
        # finished_total / cancelled_total, counted by the scheduler thread as it ends requests.
        self._totals = EngineStats()
        self._lock = threading.Condition()
        self.lora = AdapterSet(model, lora_settings(context.options), wake=self._wake)
        self._submitted: dict[str, Sequence] = {}  # arrived, not yet running
        self._order: list[str] = []  # arrival order of _submitted
        self._running: list[Sequence] = []  # aligned with the rows of _batch
        self._batch: Batch | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: list[tuple[Emit, GenerationEvent | EngineError]] = []
        # Follower ranks: ids rank 0 cancelled before this rank's copy of the request arrived.
        self._dropped: set[str] = set()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="lmi-hf-scheduler", daemon=True)
        self._thread.start()

    # -- asyncio side ----------------------------------------------------------------------------

    def encode_prompt(self, request: GenerationRequest) -> tuple[list[int], str]:
        """``request``'s prompt ids and text within this engine's limits (``lmi_hf.prompt``)."""
        return encode_prompt(
            request,
            self.tokenizer,
            self._decode,
            self.vocab_size,
            self.max_input_length,
            self.max_model_len,
            self.max_token_bytes,
        )

    def encode_images(self, request: GenerationRequest) -> tuple[list[int], str, dict[str, Any]]:
        """An image request's prompt ids and text within this engine's limits and its image inputs
        on the model's device (``lmi_hf.vision``); a 400 naming ``messages`` for a text-only model."""
        if self.images is None:
            raise BadRequestError("this model reads no images (a text-only model)", param="messages")
        ids, text, inputs = self.images.encode(request, self.tokenizer)
        check_prompt_length(len(ids), self.max_input_length, self.max_model_len, "messages")
        return ids, text, to_device(inputs, self.device, self.model.dtype)

    async def tokenize(self, operation: Tokenize) -> TokenizeResult:
        """The prompt's ids as ``generate`` encodes them: with images, the processor's (each image's
        tokens expanded), so the count equals the generation's ``prompt_tokens``."""
        if not operation.request.images:
            return await self.codec.tokenize(operation)
        if self.images is None:
            raise BadRequestError("this model reads no images (a text-only model)", param="messages")
        loop = asyncio.get_running_loop()  # no length check, no pixels moved: only the ids are wanted
        encode = self.images.encode
        ids, _, _ = await loop.run_in_executor(self._prompts, encode, operation.request, self.tokenizer)
        strs = [str(s) for s in self.tokenizer.convert_ids_to_tokens(ids)] if operation.token_strs else None
        return TokenizeResult(ids, strs)

    async def detokenize(self, ids: list[int]) -> str:
        return await self.codec.detokenize(ids)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Submit ``request`` and yield its events until ``Finished``; closing cancels it."""
        loop = asyncio.get_running_loop()
        image_inputs = None
        if request.images:
            encoded = await loop.run_in_executor(self._prompts, self.encode_images, request)
            prompt_ids, prompt_text, image_inputs = encoded
        else:
            prompt_ids, prompt_text = await loop.run_in_executor(self._prompts, self.encode_prompt, request)
        check_logit_bias(request.params, self.vocab_size)
        budget = token_budget(len(prompt_ids), self.max_model_len, request.params)
        constraint = None
        self.lora.check(request.adapter)
        if request.params.structured is not None:  # compiled off the loop: other requests keep streaming
            constraint = await asyncio.to_thread(self.grammars.compile, request.params.structured)
        self._loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationEvent | EngineError] = asyncio.Queue()
        seq = Sequence(
            request=request,
            prompt_ids=prompt_ids,
            prompt_text=prompt_text,
            max_new_tokens=budget,
            emit=queue.put_nowait,
            detokenizer=IncrementalDetokenizer(self._decode),
            stop=StopMatcher(request.params.stop_sequences),
            stop_ids=frozenset(request.params.stop_token_ids).union(
                () if request.params.ignore_eos else self.eos_ids
            ),
            constraint=constraint,
            image_inputs=image_inputs,
        )
        if request.resume_ids:  # its cost grows with the tokens replayed: off the event loop
            await loop.run_in_executor(self._prompts, seq.replay, request.resume_ids, self.vocab_size)
        self.submit(seq)
        try:
            while True:
                event = await queue.get()
                if isinstance(event, EngineError):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            if not seq.done:
                self.cancel(seq)

    def submit(self, seq: Sequence) -> None:
        with self._lock:
            if seq.request.request_id in self._dropped:
                self._dropped.remove(seq.request.request_id)
                seq.done = True
                seq.emit(Finished("cancelled", len(seq.prompt_ids), 0, seq.prompt_text))
                return
            self._submitted[seq.request.request_id] = seq
            self._order.append(seq.request.request_id)
            self.lora.prefetch(seq.request.adapter)  # read on the reader thread while it waits
            self._lock.notify()

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify()

    async def load_adapter(self, adapter: LoraAdapter) -> None:
        await self.lora.load(adapter)

    async def unload_adapter(self, name: str) -> None:
        await self.lora.unload(name)

    def cancel(self, seq: Sequence) -> None:
        with self._lock:
            seq.cancelled = True
            self._lock.notify()

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout=5)
        self._prompts.shutdown(wait=False, cancel_futures=True)
        self.lora.shutdown()

    def stats(self) -> EngineStats:
        if self.error:
            raise RuntimeError(self.error)
        with self._lock:
            running = self._running  # the scheduler thread rebinds it: one list throughout
            return dataclasses.replace(
                self._totals,
                running=len(running),
                waiting=len(self._submitted),
                adapters=list(self.lora.names),
                lora_loads_total=self.lora.loads_total,
                lora_evictions_total=self.lora.evictions_total,
                kv_cache_usage=kv_cache_usage(running, self.max_batch_size, self.max_model_len),
            )

    # -- scheduler thread ------------------------------------------------------------------------

    def _decode(self, ids: SequenceOf[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def _decode_one(self, token: int) -> str:
        # A prompt token's own text, special tokens included (echo shows the prompt as it was).
        return str(self.tokenizer.decode([token]))

    def _make_plan(self) -> StepPlan:
        """Leader only: wait for work, then pick admissions, cancellations and adapter changes
        (waiting requests whose adapter is still being read wait here, not in a busy loop)."""
        with self._lock:
            while True:
                while not (self._stopping or self._running or self._order or self.lora.pending):
                    self._lock.wait()
                plan = StepPlan(stop=self._stopping)
                plan.cancel = [s.request.request_id for s in self._running if s.cancelled]
                plan.cancel += [rid for rid in self._order if self._submitted[rid].cancelled]
                waiting = [rid for rid in self._order if not self._submitted[rid].cancelled]
                lora = self.lora.plan(
                    [self._submitted[rid].request.adapter for rid in waiting],
                    [s.request.adapter for s in self._running],
                    self.max_batch_size - len(self._running),
                )
                for i in lora.admit:
                    seed = self._submitted[waiting[i]].request.params.seed
                    plan.admit.append((waiting[i], seed if seed is not None else random.getrandbits(63)))
                plan.fail = [(waiting[i], message) for i, message in lora.fail]
                plan.unload, plan.evict, plan.load = lora.unload, lora.evict, lora.load
                if self._running or plan != StepPlan():
                    return plan
                self._lock.wait()

    def _take(self, rid: str) -> Sequence:
        """The submitted sequence ``rid``; a follower rank waits until its copy has arrived."""
        with self._lock:
            while rid not in self._submitted:
                if self._stopping:
                    raise EngineError("engine stopping", status=503)
                self._lock.wait(timeout=1.0)
            self._order.remove(rid)
            return self._submitted.pop(rid)

    def _run(self) -> None:
        try:
            while True:
                plan = self._make_plan() if self.coordinator.leader else StepPlan()
                plan = self.coordinator.exchange(plan)
                if plan.stop:
                    break
                self._apply(plan)
                if self._running:
                    self._step()
                self._flush()
        except Exception as exc:  # the engine is broken: fail everything, report unhealthy
            logger.exception("scheduler thread failed")
            self.error = f"{exc.__class__.__name__}: {exc}"
            with self._lock:
                victims = self._running + list(self._submitted.values())
            for seq in victims:
                self._outbox.append((seq.emit, EngineFailedError(f"engine failed: {self.error}")))
            self._flush()

    def _apply(self, plan: StepPlan) -> None:
        cancelled = set(plan.cancel)
        running = {s.request.request_id for s in self._running}
        for rid in cancelled:
            with self._lock:
                if rid in self._submitted:
                    self._order.remove(rid)
                    seq = self._submitted.pop(rid)
                    self._finish(seq, "cancelled")
                elif rid not in running:  # a follower that has not received it yet: drop it on arrival
                    self._dropped.add(rid)
        if cancelled:
            self._evict(running & cancelled, reason="cancelled")
        self.lora.apply(plan.unload, plan.evict, plan.load)
        for rid, message in plan.fail:
            with self._lock:
                if rid not in self._submitted:  # a follower that has not received it yet
                    self._dropped.add(rid)
                    continue
                self._order.remove(rid)
                self._fail(self._submitted.pop(rid), EngineError(message, status=400))
        if not plan.admit:
            return
        new = [self._take(rid) for rid, _ in plan.admit]
        for seq, (_, seed) in zip(new, plan.admit, strict=True):
            if not seq.request.params.greedy:
                seq.generator, seq.seed = make_generator(seed), seed
        for seq in new:  # an adapter that failed to install fails its requests, not the group
            error = self.lora.missing(seq.request.adapter)
            if error is not None:
                self._fail(seq, error)
        self.lora.used(s.request.adapter for s in new)
        new = [s for s in new if not s.done]
        # Requests that want prompt log-probs prefill apart with every position's logits; the others
        # keep logits_to_keep=1 (a [T, V] tensor per prompt is 64 MB at T=128, V=128k in fp32).
        text = [s for s in new if s.image_inputs is None]
        scoring = [s for s in text if s.request.params.prompt_logprobs is not None]
        plain = [s for s in text if s.request.params.prompt_logprobs is None]
        for group in (plain, scoring):
            if group:
                self._prefill(group, all_logits=group is scoring)
        # An image request prefills alone (its pixel values are its own; images of different sizes
        # do not stack), then decodes in the batch: the image is in its KV cache.
        for seq in new:
            if seq.image_inputs is not None:
                inputs, seq.image_inputs = seq.image_inputs, None
                self._prefill([seq], seq.request.params.prompt_logprobs is not None, inputs)

    def _prefill(self, new: list[Sequence], all_logits: bool, images: dict[str, Any] | None = None) -> None:
        try:
            names = self.lora.forward_args(s.request.adapter for s in new)
            batch, logits = prefill(
                self.lora.model, [s.input_ids for s in new], self.device, all_logits, names, images
            )
        except Exception as exc:
            self._raise_if_ranks_diverged(exc)
            for seq in new:
                self._fail(seq, exc)
            return
        if all_logits:
            for seq, rows in zip(new, logits, strict=True):
                top_n = seq.request.params.prompt_logprobs or 0
                rows = rows[: rows.shape[0] - len(seq.resumed)]  # the prompt's positions only
                seq.prompt_logprobs = prompt_logprobs(rows, seq.prompt_ids, top_n, self._decode_one)
            logits = logits[:, -1, :]
        # max_new_tokens 0 (scoring the prompt only), or a resumed request that had used its budget:
        # finished after prefill, never decoded.
        keep = [i for i, s in enumerate(new) if s.max_new_tokens > s.generated]
        for seq in new:
            if seq.max_new_tokens <= seq.generated:
                self._finish(seq, "length")
        if not keep:
            return
        if len(keep) < len(new):
            batch.keep(keep)
            new, logits = [new[i] for i in keep], logits[keep]
        if self._batch is None:
            self._batch = batch
        else:
            self._batch.merge(batch)
        self._running += new
        self._sample(new, logits, start=len(self._running) - len(new))

    def _step(self) -> None:
        assert self._batch is not None
        try:
            names = self.lora.forward_args(s.request.adapter for s in self._running)
            logits = decode(self.lora.model, self._batch, names)
        except Exception as exc:
            self._raise_if_ranks_diverged(exc)
            for seq in self._running:
                self._fail(seq, exc)
            self._running, self._batch = [], None
            return
        self._sample(self._running, logits, start=0)

    def _raise_if_ranks_diverged(self, exc: Exception) -> None:
        """A forward that failed on one tensor-parallel rank (a collective with a dead peer, most
        often) leaves the ranks out of step: the engine is broken, not the batch. Out of memory is
        the batch's; a single-process engine's failure is too."""
        if not isinstance(self.coordinator, LocalCoordinator) and not isinstance(
            exc, torch.OutOfMemoryError | MemoryError
        ):
            raise exc

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, start: int) -> None:
        """Choose each sequence's next token, emit it, and drop the sequences that finished."""
        tokens: list[int] = []
        allowed = self._allowed(seqs)
        for i, (seq, row) in enumerate(zip(seqs, logits, strict=True)):
            try:
                tokens.append(self._advance(seq, row, allowed.get(i)))
            except Exception as exc:  # one request's failure (its sampling) ends that request only
                self._fail(seq, exc)
                tokens.append(0)  # a placeholder: the row is evicted below
        assert self._batch is not None
        last = self._batch.last_tokens.tolist()
        last[start : start + len(tokens)] = tokens
        self._batch.set_last_tokens(last)
        self._evict({s.request.request_id for s in self._running if s.done})

    def _allowed(self, seqs: list[Sequence]) -> dict[int, torch.Tensor]:
        """The tokens each constrained sequence's grammar allows next, by row (one call per step)."""
        rows = [i for i, s in enumerate(seqs) if s.constraint is not None and s.constraint.active]
        if not rows:
            return {}
        try:
            masks = self.grammars.allowed([seqs[i].constraint for i in rows])  # type: ignore[misc]
        except Exception as exc:  # a broken matcher: fail its requests, not the batch
            for i in rows:
                self._fail(seqs[i], exc)
            return {}
        return dict(zip(rows, masks, strict=True))

    def _advance(self, seq: Sequence, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> int:
        """Sample ``seq``'s next token from its logits row (only ``allowed`` tokens, when its output
        is constrained), emit it, finish ``seq`` if it is done."""
        params = seq.request.params
        if seq.done:
            return 0  # failed while computing its mask: evicted after this step
        if allowed is not None:  # a row as wide as the logits (the grammar's vocabulary is the model's)
            logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
        if seq.generator is not None:
            seq.generator.manual_seed(position_seed(seq.seed, seq.generated))
        token, log_prob, log_probs = select_token(
            logits, params, seq.generator, seq.output_counts, seq.prompt_ids, seq.stop_ids
        )
        # The grammar allows EOS only where it may end, and then it is the end even with ignore_eos.
        constrained = allowed is not None
        is_eos = token in self.eos_ids and (not params.ignore_eos or constrained)
        is_stop = token in params.stop_token_ids
        # A stop token's text is not part of the output (vLLM: include_stop_str_in_output=False).
        text = "" if is_stop else seq.detokenizer.add(token)
        if seq.constraint is not None:  # after the text: a deferred grammar starts after a marker
            seq.constraint.accept(token, text)
        seq.generated += 1
        seq.output_counts[token] += 1
        reason: FinishReason | None = None
        if is_eos:
            reason = "eos_token"
        elif is_stop:
            reason = "stop_sequence"
        elif seq.generated >= seq.max_new_tokens:
            reason = "length"
        if reason is not None:
            text += seq.detokenizer.flush()
        text, hit = seq.stop.feed(text)
        if hit:
            reason = "stop_sequence"
        elif reason is not None:
            text += seq.stop.flush()
        top = None
        if params.top_logprobs:
            values, ids = torch.topk(log_probs, params.top_logprobs)
            top = [(int(i), self._decode([int(i)]), float(v)) for v, i in zip(values, ids, strict=True)]
        first = len(seq.prompt_ids) if seq.generated == 1 else None
        event = Token(token, text, log_prob, is_eos, top, last=reason is not None, prompt_tokens=first)
        self._outbox.append((seq.emit, event))
        if reason is not None:
            self._finish(seq, reason)
        return token

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.done = True
        if reason == "cancelled":
            self._totals.cancelled_total += 1
        else:
            self._totals.finished_total += 1
        event = Finished(reason, len(seq.prompt_ids), seq.generated, seq.prompt_text, seq.prompt_logprobs)
        self._outbox.append((seq.emit, event))

    def _evict(self, rids: set[str], reason: FinishReason | None = None) -> None:
        if not rids:
            return
        keep = [i for i, s in enumerate(self._running) if s.request.request_id not in rids]
        if reason is not None:
            for seq in self._running:
                if seq.request.request_id in rids and not seq.done:
                    self._finish(seq, reason)
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._batch = None
        elif self._batch is not None:
            self._batch.keep(keep)

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        seq.done = True
        message = f"{exc.__class__.__name__}: {exc}"
        error: EngineError
        if isinstance(exc, EngineError):  # the engine's own, with its status (a bad adapter: 400)
            error = exc
        elif isinstance(exc, torch.OutOfMemoryError | MemoryError):
            error = EngineOutOfMemoryError(message)
        else:
            error = EngineError(message)
        logger.error("request %s failed: %s", seq.request.request_id, message)
        self._outbox.append((seq.emit, error))

    def _flush(self) -> None:
        """Hand this step's events to the asyncio loop in one wake-up."""
        if not self._outbox or self._loop is None:
            self._outbox.clear()
            return
        events, self._outbox = self._outbox, []
        self._loop.call_soon_threadsafe(_deliver, events)


def _deliver(events: list[tuple[Emit, GenerationEvent | EngineError]]) -> None:
    for emit, event in events:
        emit(event)
