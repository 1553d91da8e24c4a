"""The vLLM engine inside an lmi-core worker: ``AsyncLLM`` on the worker's own event loop.

``load_engine`` builds ``AsyncLLM`` in the worker's load thread with no event loop running there, so
vLLM defers its output handler and its socket reader; ``start_on_loop`` (the ``LoopEngine``
contract) then warms the engine up on the worker's loop, where both start, before the worker reports
"loaded": a broken engine still fails the load, not the first client. From then on vLLM's outputs
reach lmi's request streams with no thread in between. An earlier design ran ``AsyncLLM`` on a
private loop thread and handed every request's output of every engine step across with
``call_soon_threadsafe``: at concurrency 16 that hand-off was 27% of the worker's busy samples, and
the two threads' GIL hand-offs came on top. vLLM's per-step output processing (detokenizing the
batch, at most ``max_num_seqs`` requests, in chunks of ``VLLM_V1_OUTPUT_PROC_CHUNK_SIZE`` with a
yield between them) is bounded, so heartbeats are still answered; prompts are tokenized on a
thread of their own because their cost grows with the prompt.

LoRA (``option.enable_lora``): a request's adapter is added to vLLM (``add_lora``) before the request
is submitted, unless vLLM holds it already; a bad adapter then fails that request
with a 400 instead of failing vLLM's engine core mid-batch, where the weights would otherwise load.

Building the engine (its arguments, stat logger and environment) is ``lmi_vllm.start``; the pure
conversions between lmi's requests and events and vLLM's are ``lmi_vllm.convert``. This module imports
vLLM only inside functions: the plugin's hooks import it to recognise the engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncGenerator
from collections.abc import Sequence as SequenceOf
from typing import TYPE_CHECKING, Any

from lmi_core import (
    BadRequestError,
    EngineError,
    EngineStats,
    Finished,
    GenerationEvent,
    GenerationRequest,
    LoraAdapter,
    RequestCounts,
    SamplingParams,
    ServiceError,
    WorkerContext,
    prompts,
    telemetry,
)
from lmi_core.operations import Tokenize, TokenizeResult
from lmi_core.request_checks import (
    check_logit_bias,
    check_prompt_length,
    refuse_unsupported,
    token_budget,
    tokenizer_token_bytes,
    truncate_prompt,
)
from lmi_vllm.convert import (
    image_prompt,
    images_per_prompt,
    map_error,
    output_events,
    prompt_entries,
    reasoning_kwargs,
    resume_check,
    structured_outputs_kwargs,
)
from lmi_vllm.lora import LoraIds, ResidentTracker, adapter_error, can_pin
from lmi_vllm.start import (
    WORKER_EXTENSION,
    SchedulerCounts,
    cpu_bind_lists,
    drop_prometheus_logger,
    engine_kwargs,
    numa_nodes,
    scoped_environ,
    set_envs_cache,
    stat_logger_factory,
    structured_outputs_config,
    vllm_reasoning_parser,
)

if TYPE_CHECKING:  # names for tests/lmi_vllm/test_api_names.py; vLLM is imported inside functions
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

HEALTH_INTERVAL = 1.0
SHUTDOWN_TIMEOUT = 60.0
ABORT_TIMEOUT = 5.0

# SamplingParams fields vLLM has no equivalent of (typical sampling is not in vLLM).
UNSUPPORTED = ("typical_p",)


class VllmEngine:
    """An ``AsyncLLM`` and the counters lmi reports; build it with ``VllmEngine.start``."""

    def __init__(self, llm: AsyncLLM, counts: SchedulerCounts, warmup: bool) -> None:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        try:  # an already-tokenized engine input: vLLM neither re-tokenizes nor warns (raw prompts)
            from vllm.inputs import tokens_input
        except ImportError:  # vLLM before the renderer API takes a TokensPrompt
            tokens_input = None
        self._tokens_input = tokens_input

        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.max_model_len: int = llm.model_config.max_model_len
        self.vocab_size: int = llm.model_config.get_vocab_size()
        self.max_images = images_per_prompt(llm.model_config)  # lmi_core.ImageEngine
        self.max_input_length = self.max_model_len - 1  # option.max_input_length lowers it
        # The most bytes of prompt one token stands for (None: no bound holds for this tokenizer).
        self.max_token_bytes = tokenizer_token_bytes(self.tokenizer)
        # Tokenizing and chat templates cost time that grows with the prompt: one thread, off the
        # worker's event loop (a 30 MB prompt there stopped its heartbeats), in arrival order.
        self._prompts = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lmi-vllm-prompt")
        self.codec = prompts.PromptCodec(self.tokenizer, self._decode, self.vocab_size, self._prompts)
        self.special_ids = frozenset(getattr(self.tokenizer, "all_special_ids", ()) or ())
        from vllm.lora.request import LoRARequest

        self._lora_request = LoRARequest
        self.lora_enabled: bool = getattr(llm.vllm_config, "lora_config", None) is not None
        self._lora_ids = LoraIds()
        self._lora_resident = ResidentTracker()
        self._lora_pinned: set[int] = set()
        # Pinning needs lmi's worker extension (option.worker_extension_cls replaces it).
        self._lora_pinning = llm.vllm_config.parallel_config.worker_extension_cls == WORKER_EXTENSION
        lora_config = getattr(llm.vllm_config, "lora_config", None)
        self._lora_slots = (
            (lora_config.max_loras, lora_config.max_cpu_loras) if lora_config is not None else (0, 0)
        )
        self._lora_locks: dict[int, asyncio.Lock] = {}
        self._vllm_sampling_params = VllmSamplingParams
        # vLLM holds a constrained request's grammar back until the thinking ends (lmi_vllm.convert).
        self.reasoning_gate = bool(llm.vllm_config.structured_outputs_config.reasoning_parser)
        self._structured_outputs_params = StructuredOutputsParams
        self._delta = RequestOutputKind.DELTA
        self._scheduler = counts
        # vLLM refuses a priority other than 0 unless its scheduler orders by it
        # (option.scheduling_policy=priority); otherwise only lmi's queue orders by it.
        self._priority = getattr(llm.vllm_config.scheduler_config, "policy", "fcfs") == "priority"
        self._warmup = warmup
        self.requests = RequestCounts()
        self._closed = False
        self._health_error: str | None = None
        self._health_task: asyncio.Task[None] | None = None  # started by start_on_loop

    # -- lifecycle -----------------------------------------------------------------------------

    @classmethod
    def start(cls, context: WorkerContext) -> VllmEngine:
        """Build the engine for ``context`` (blocking: call it off the worker's event loop)."""
        kwargs, kv_gib, warmup = engine_kwargs(context)
        reasoning = vllm_reasoning_parser(context.options)
        kwargs["structured_outputs_config"] = structured_outputs_config(kwargs, reasoning)
        bind: str | None = None
        if context.device == "cpu":
            if kv_gib is not None:
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_gib)  # read by vLLM's engine process
            elif not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                logger.warning(
                    "VLLM_CPU_KVCACHE_SPACE is not set: vLLM sizes its CPU KV cache from most of the RAM; "
                    "set option.cpu_kvcache_space=<GiB> or the environment variable"
                )
            ranks = kwargs["tensor_parallel_size"] * kwargs["pipeline_parallel_size"]
            if ranks > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ and numa_nodes() < ranks:
                # vLLM's automatic binding gives each rank a NUMA node of its own and refuses to start
                # with fewer nodes than ranks (most single-socket hosts): split the CPUs instead.
                bind = cpu_bind_lists(sorted(os.sched_getaffinity(0)), ranks)
        if kwargs.get("otlp_traces_endpoint") == telemetry.traces_endpoint(os.environ):
            # The endpoint is lmi's, an OTLP/HTTP one; vLLM's exporter speaks gRPC unless told.
            os.environ.setdefault("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
        if kwargs.get("enforce_eager") and "TORCHDYNAMO_DISABLE" not in os.environ:
            # Eager means no torch.compile, yet vLLM still compiles a sampler kernel (logprob ranks)
            # with inductor on first use: 6-30 s of C++ compilation on CPU. Read by vLLM's processes.
            os.environ["TORCHDYNAMO_DISABLE"] = "1"
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        counts = SchedulerCounts()
        started = time.monotonic()
        set_envs_cache(False)  # read the environment as it is now (start_on_loop caches it)
        # Built with no event loop running in this thread: AsyncLLM then starts its output handler
        # and socket reader on the loop of its first request, the worker's (start_on_loop).
        # The binding only while vLLM spawns its processes: a later engine here may have one rank.
        with scoped_environ("VLLM_CPU_OMP_THREADS_BIND", bind):
            llm = AsyncLLM.from_engine_args(
                AsyncEngineArgs(**kwargs), stat_loggers=[stat_logger_factory(counts)]
            )
        drop_prometheus_logger(llm)
        engine = cls(llm, counts, warmup)
        if context.options.get("max_input_length"):  # checked by validate_config in the server
            engine.max_input_length = min(int(context.options["max_input_length"]), engine.max_input_length)
        logger.info("vLLM engine built in %.1f s (%s)", time.monotonic() - started, kwargs["model"])
        return engine

    async def start_on_loop(self) -> None:
        """On the worker's loop: start vLLM's output handling and the health watch here, and run one
        tiny request with logprobs (unless ``option.warmup=false``) so that lazy compiles happen now."""
        # vLLM reads its settings from os.environ on every access unless cached, which its engine
        # processes do once started and its API server does not: 6% of this worker's busy samples
        # at concurrency 16 were those reads (vllm.envs.__getattr__) in its output processing.
        set_envs_cache(True)
        self._health_task = asyncio.get_running_loop().create_task(self._watch_health())
        if not self._warmup:
            return
        started = time.monotonic()
        ids = list(self.tokenizer.encode("warmup")) or [0]
        params = self._vllm_sampling_params(
            max_tokens=2, temperature=0.0, logprobs=1, output_kind=self._delta
        )
        async for _ in self.llm.generate(self.engine_input(ids), params, "lmi-vllm-warmup"):
            pass
        logger.info("vLLM warmup request took %.1f s", time.monotonic() - started)

    def shutdown(self) -> None:
        """Stop vLLM's engine processes, its output handler and the health watch."""
        if self._closed:
            return
        self._closed = True
        if self._health_task is not None:
            self._health_task.cancel()
        self._prompts.shutdown(wait=False, cancel_futures=True)
        self.llm.shutdown(timeout=SHUTDOWN_TIMEOUT)

    def _decode(self, ids: SequenceOf[int]) -> str:
        return str(self.tokenizer.decode(list(ids)))

    def engine_input(self, ids: list[int], text: str | None = None) -> Any:
        """The prompt as vLLM's engine input: token ids (and the text they came from)."""
        if self._tokens_input is not None:
            return self._tokens_input(ids, prompt=text)
        return {"prompt_token_ids": ids}

    # -- health and stats ------------------------------------------------------------------------

    async def _watch_health(self) -> None:
        """Keep ``check_health``'s verdict for ``stats`` (vLLM's check is async, stats are not)."""
        while True:
            try:
                await self.llm.check_health()
                if self.lora_enabled:  # vLLM loads and evicts adapters at scheduling time too
                    self._lora_resident.observe(await self.llm.list_loras())
            except Exception as exc:
                self._health_error = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(HEALTH_INTERVAL)

    def check_health(self) -> None:
        """Raise ``EngineError`` when vLLM's engine is dead or its output handler has stopped."""
        if self._closed:
            raise EngineError("vLLM engine is shut down", status=503)
        if self._health_error is not None or self.llm.errored:
            raise EngineError(
                f"vLLM engine is dead: {self._health_error or 'engine core exited'}", status=500
            )
        if not self.llm.is_running:
            raise EngineError("vLLM's output handler has stopped", status=500)

    def stats(self) -> EngineStats:
        """Counters for the worker's heartbeat; raises if the engine is unhealthy."""
        self.check_health()
        idle = self.requests.in_flight == 0  # vLLM's last report may predate the end of the last request
        return EngineStats(
            running=0 if idle else self._scheduler.running,
            waiting=0 if idle else self._scheduler.waiting,
            finished_total=self.requests.finished_total,
            cancelled_total=self.requests.cancelled_total,
            extra={
                "inflight": float(self.requests.in_flight),
                "unfinished_in_vllm": float(self.llm.get_num_unfinished_requests()),
            },
            adapters=self._lora_ids.names(self._lora_resident.resident),
            lora_loads_total=self._lora_resident.loads_total,
            lora_evictions_total=self._lora_resident.evictions_total,
            kv_cache_usage=0.0 if idle else self._scheduler.kv_cache_usage,
            # 0 until vLLM's engine core has measured its cache (before the first step): not known.
            kv_cache_tokens=self._scheduler.kv_cache_tokens or None,
            kv_block_size=self._scheduler.block_size or None,
            prefix_cache_hits=self._scheduler.prefix_cache_hits,
            prefix_cache_queries=self._scheduler.prefix_cache_queries,
        )

    # -- requests --------------------------------------------------------------------------------

    def prepare_prompt(self, request: GenerationRequest) -> tuple[str, list[int]]:
        """The prompt text (chat template applied to ``messages``) and its token ids."""
        fits = prompts.PromptLimits(self.max_input_length, self.max_model_len, self.max_token_bytes)
        prompt = prompts.encode_prompt(request, self.tokenizer, self._decode, self.vocab_size, fits=fits)
        param, text = prompt.param, prompt.text
        ids = truncate_prompt(prompt.ids, request.params)
        check_prompt_length(len(ids), self.max_input_length, self.max_model_len, param)
        check_logit_bias(request.params, self.vocab_size)
        return text, ids

    async def tokenize(self, operation: Tokenize) -> TokenizeResult:
        return await self.codec.tokenize(operation)

    async def detokenize(self, ids: list[int]) -> str:
        return await self.codec.detokenize(ids)

    async def sleep(self, level: int) -> None:
        """vLLM's sleep mode (``option.enable_sleep_mode=true``, GPU only: vLLM refuses it on CPU):
        level 1 offloads the weights to host memory and drops the KV cache (the residency's warm tier)."""
        await self.llm.sleep(level)

    async def wake_up(self) -> None:
        await self.llm.wake_up()

    def sampling_params(self, params: SamplingParams, max_tokens: int | None = None) -> Any:
        """vLLM ``SamplingParams`` for lmi's ``params`` (streaming deltas; logprobs only when asked).

        ``max_tokens``: the budget left by the prompt (``token_budget``); 0 scores the prompt only, which
        vLLM runs as one generated token that is then dropped (as its own server does for echo)."""
        budget = params.max_new_tokens if max_tokens is None else max_tokens
        if budget < 0:
            raise BadRequestError("max_new_tokens must not be negative", param="max_new_tokens")
        if params.top_logprobs < 0:
            raise BadRequestError("top_logprobs must not be negative", param="top_logprobs")
        refuse_unsupported(params, UNSUPPORTED, "vllm")
        if params.structured is not None and params.structured.starts_after and not self.reasoning_gate:
            raise BadRequestError(
                "a constrained output after the thinking needs vLLM's reasoning parser of the name "
                "option.reasoning_parser gives, and vLLM has none; turn the thinking off with "
                "chat_template_kwargs"
            )
        greedy = params.greedy
        try:
            return self._vllm_sampling_params(
                max_tokens=max(budget, 1),
                temperature=0.0 if greedy else params.temperature,
                top_p=1.0 if greedy else params.top_p,
                # lmi's 0 means "no top-k"; vLLM spells that -1 (0 too since 0.6, not before).
                top_k=-1 if greedy or params.top_k <= 0 else params.top_k,
                seed=params.seed,
                stop=list(params.stop_sequences) or None,
                ignore_eos=params.ignore_eos,
                # 0 = only the sampled token's logprob; None = none, which saves vLLM real work.
                logprobs=params.top_logprobs if params.logprobs or params.top_logprobs else None,
                output_kind=self._delta,
                # Same names and meanings in vLLM (lmi's are defined after them).
                stop_token_ids=list(params.stop_token_ids) or None,
                logit_bias=dict(params.logit_bias) or None,
                repetition_penalty=params.repetition_penalty,
                frequency_penalty=params.frequency_penalty,
                presence_penalty=params.presence_penalty,
                min_tokens=params.min_tokens,
                min_p=params.min_p,
                prompt_logprobs=params.prompt_logprobs,
                structured_outputs=(
                    None
                    if params.structured is None
                    else self._structured_outputs_params(**structured_outputs_kwargs(params.structured))
                ),
            )
        except (ValueError, TypeError) as exc:
            raise BadRequestError(f"invalid sampling parameters: {exc}", param="parameters") from None

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Stream ``request``'s tokens, then its ``Finished``; a bad request raises before the first
        event; closing the stream early aborts the request in vLLM."""
        return self.requests.relay(self._prepared(request))

    def prepare(self, request: GenerationRequest) -> tuple[str, list[int], Any, int]:
        """The prompt's text and ids, vLLM's sampling parameters and the token budget; a 400 naming
        the field when the request cannot run. On the prompt thread: its cost grows with the prompt."""
        if request.adapter is not None and not self.lora_enabled:
            raise BadRequestError(
                f"LoRA adapter {request.adapter.name!r} requested, but this model is served without "
                "adapters (option.enable_lora=true turns them on)",
                param="adapter",
            )
        if len(request.images) > self.max_images:
            message = f"this model reads at most {self.max_images} images per prompt"
            raise BadRequestError(message, param="messages")
        if request.images and request.resume_ids:  # vLLM takes an image prompt as text, not as token ids
            raise EngineError("a stream with images cannot resume on vLLM")
        text, ids = self.prepare_prompt(request)
        budget = token_budget(len(ids), self.max_model_len, request.params)
        resumed = resume_check(request, ids, self.vocab_size, self._decode)
        sampling = request.params
        if resumed:  # the delivered tokens become prompt; what is left of the budget is generated
            sampling = dataclasses.replace(sampling, min_tokens=max(0, sampling.min_tokens - len(resumed)))
        return text, ids, self.sampling_params(sampling, budget - len(resumed)), budget

    async def _prepared(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        loop = asyncio.get_running_loop()
        text, ids, params, budget = await loop.run_in_executor(self._prompts, self.prepare, request)
        events = self._stream(request, text, ids, params, budget)
        try:
            async for event in events:
                yield event
        finally:  # closed early: abort in vLLM now, not when the generator is collected
            await events.aclose()

    async def _stream(
        self, request: GenerationRequest, text: str, ids: list[int], params: Any, budget: int
    ) -> AsyncGenerator[GenerationEvent, None]:
        """The request's events from vLLM; aborts the request in vLLM unless it finished."""
        rid = request.request_id
        top_n = request.params.top_logprobs
        score_only = budget == 0
        # Prompt log-probs: vLLM gives no text for the first prompt token (nothing predicts it).
        first_text = str(self.tokenizer.decode(ids[:1])) if request.params.prompt_logprobs is not None else ""
        resumed = request.resume_ids
        prompt = self.engine_input(ids + resumed, None) if resumed else self.engine_input(ids, text)
        if request.images:  # the text: vLLM's processor expands its image placeholders (ids: unexpanded)
            prompt = image_prompt(text, request.images)
        prompt_tokens = len(ids)
        generated = len(resumed)
        scored: Any = None  # DELTA mode: the prompt's log-probs come with the first output only
        finished = False
        try:
            lora = None if request.adapter is None else await self._ensure_adapter(request.adapter)
            priority = request.priority if self._priority else 0
            gate = reasoning_kwargs(request, self.reasoning_gate)
            # Traced: vLLM's llm_request span under the worker's (it drops them unless it traces).
            trace = {"traceparent": request.traceparent} if request.traceparent is not None else None
            outputs = self.llm.generate(
                prompt, params, rid, lora_request=lora, trace_headers=trace, priority=priority, **gate
            )
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    scored = getattr(output, "prompt_logprobs", None) or scored
                    if request.images:  # the prompt as vLLM expanded it: usage counts the image tokens
                        prompt_tokens = len(getattr(output, "prompt_token_ids", None) or ids)
                    events = output_events(
                        output,
                        self.special_ids,
                        top_n,
                        text,
                        prompt_tokens,
                        generated,
                        score_only,
                        # A resumed request's "prompt" ends with its delivered tokens: not scored.
                        prompt_entries(scored[: len(ids)] if scored else scored, ids, first_text)
                        if output.finished
                        else None,
                    )
                    generated += len(events) - (1 if output.finished else 0)
                    for event in events:
                        finished = finished or isinstance(event, Finished)
                        yield event
            if not finished:
                raise EngineError("vLLM ended the request without a finish reason")
        except (ServiceError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            raise map_error(exc) from exc
        finally:
            if not finished:
                # Closed early (client gone, cancelled) or failed: free the sequence in vLLM now.
                await self.abort(rid)

    # -- LoRA adapters (AdapterEngine) ---------------------------------------------------------------

    async def load_adapter(self, adapter: LoraAdapter) -> None:
        """Make ``adapter`` resident in vLLM (pinned: never evicted); ``EngineError`` 400 if it cannot."""
        if not self.lora_enabled:
            raise EngineError(
                f"cannot load LoRA adapter {adapter.name!r}: option.enable_lora is off", status=400
            )
        await self._ensure_adapter(adapter)

    async def unload_adapter(self, name: str) -> None:
        """Drop adapter ``name`` from vLLM, pinned or not; unknown names are ignored."""
        lora_id = self._lora_ids.get(name)
        if self.lora_enabled and lora_id is not None:
            await self._remove_adapter(lora_id)

    async def _ensure_adapter(self, adapter: LoraAdapter) -> Any:
        """``adapter``'s ``LoRARequest``, added to vLLM first unless it is resident."""
        lora_id, replaced = self._lora_ids.assign(adapter.name, adapter.path)
        if replaced is not None:  # re-registered with new weights: the old id must not linger
            await self._remove_adapter(replaced)
        lora = self._lora_request(adapter.name, lora_id, adapter.path)
        async with self._lora_locks.setdefault(lora_id, asyncio.Lock()):  # one load per adapter
            if lora_id not in self._lora_resident.resident:
                try:
                    await self.llm.add_lora(lora)
                except Exception as exc:
                    if self.llm.errored:
                        raise
                    raise adapter_error(adapter, exc) from None
                self._lora_resident.observe(await self.llm.list_loras())  # the load, and evictions
            if self._lora_pinning and adapter.pinned != (lora_id in self._lora_pinned):
                await self._set_pinned(adapter, lora_id)
        return lora

    async def _set_pinned(self, adapter: LoraAdapter, lora_id: int) -> None:
        """Pin or unpin ``lora_id`` in vLLM's memory cache of adapters (not with
        vLLM's pin_lora, which also takes a batch slot for good: lmi_vllm.worker_extension)."""
        if adapter.pinned and not can_pin(len(self._lora_pinned), *self._lora_slots):
            max_loras, max_cpu_loras = self._lora_slots
            logger.warning(
                "LoRA adapter %r stays unpinned (loaded again on demand): %d pinned + max_loras=%d "
                "would exceed max_cpu_loras=%d",
                adapter.name,
                len(self._lora_pinned) + 1,
                max_loras,
                max_cpu_loras,
            )
            return
        await self.llm.collective_rpc("lmi_set_lora_pinned", args=(lora_id, adapter.pinned))
        if adapter.pinned:
            self._lora_pinned.add(lora_id)
        else:
            self._lora_pinned.discard(lora_id)

    async def _remove_adapter(self, lora_id: int) -> None:
        """Remove ``lora_id`` from vLLM (not counted as an eviction)."""
        self._lora_resident.removed(lora_id)
        self._lora_pinned.discard(lora_id)
        await self.llm.remove_lora(lora_id)
        self._lora_resident.observe(await self.llm.list_loras())

    async def abort(self, request_id: str) -> None:
        """Abort ``request_id`` in vLLM."""
        try:
            await asyncio.wait_for(self.llm.abort(request_id), ABORT_TIMEOUT)
        except Exception as exc:  # the engine may be dead already: nothing left to free
            logger.warning("vLLM abort of %s failed: %s", request_id, exc)
