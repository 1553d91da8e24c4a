"""The endpoint picker's series: what Gateway API Inference Extension's picker (llm-d) scrapes.

The picker reads a model server's load under vLLM's metric names and types (its default engine):
``vllm:num_requests_waiting`` and ``vllm:num_requests_running`` (gauges), ``vllm:kv_cache_usage_perc``
(a gauge, a fraction 0..1), ``vllm:lora_requests_info`` (a gauge whose labels ``max_lora``,
``running_lora_adapters``, ``waiting_lora_adapters`` carry the data and whose value is the unix time
it was set; the picker takes the series with the largest value) and ``vllm:cache_config_info`` (labels
``block_size`` and ``num_gpu_blocks``, which size its prefix-cache index).

Invariant: each is exactly one series without any label but its own, so the picker's rule (with no
exposition timestamps the first series of a name wins) reads the whole endpoint: an endpoint is the
pod (every model's workers; ``/metrics`` with ``option.gie_metrics=true``), or one worker of each model
(``/metrics`` on a per-worker port, ``http.listeners``). Read at scrape time from the pools'
snapshots, as ``http.metrics`` reads its gauges: nothing is counted per request.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lmi_core.http.state import ModelService
from lmi_core.serving.pool import PoolSnapshot
from lmi_core.serving.routing import slot_worker
from lmi_core.serving.supervisor import WorkerSnapshot, WorkerState


@dataclass(frozen=True)
class PickerLoad:
    """One endpoint as the picker sees it."""

    waiting: int  # queued for a worker, or admitted by an engine and waiting for a batch slot
    running: int
    kv_cache_usage: float  # the mean over the workers whose engines report it; 0.0 when none does
    max_lora: int | None  # adapters the workers may hold at once, summed; None: no model serves LoRA
    lora_adapters: tuple[str, ...]  # the adapters they hold now
    block_size: int  # tokens per KV block (0: no engine reports one; the picker then uses its own)
    num_blocks: int  # KV blocks of the workers whose engines report them, summed


@dataclass(frozen=True)
class ModelLoad:
    """What ``picker_load`` reads of one served model."""

    pool: PoolSnapshot
    max_loras: int | None  # option.max_loras per worker; None: served without LoRA


def endpoint_workers(pool: PoolSnapshot, slot: int | None) -> tuple[WorkerSnapshot, ...]:
    """The workers of ``pool`` one endpoint stands for: all of them (the pod), or the one that
    per-worker port ``slot`` names (``routing.slot_worker``, as the dispatcher resolves it)."""
    if slot is None:
        return pool.workers
    serving = [w for w in pool.workers if w.state is not WorkerState.FAILED and not w.retiring]
    chosen = slot_worker((w.worker_id for w in serving), slot)
    return tuple(w for w in serving if w.worker_id == chosen)


def picker_load(models: Sequence[ModelLoad], slot: int | None = None) -> PickerLoad:
    """The endpoint's load summed over ``models``. A pool's queued requests count as waiting on every
    endpoint of the pod: they wait for whichever worker frees first."""
    waiting = running = blocks = block_size = 0
    usages: list[float] = []
    max_lora: int | None = None
    adapters: set[str] = set()
    for model in models:
        workers = endpoint_workers(model.pool, slot)
        waiting += model.pool.queued
        for worker in workers:
            stats = worker.engine_stats
            waiting += stats.waiting
            running += stats.running
            if stats.kv_cache_usage is not None:
                usages.append(stats.kv_cache_usage)
            if stats.kv_block_size and stats.kv_cache_tokens:
                block_size = block_size or stats.kv_block_size
                blocks += stats.kv_cache_tokens // stats.kv_block_size
            if model.max_loras is not None:
                adapters.update(stats.adapters)
        if model.max_loras is not None:
            max_lora = (max_lora or 0) + model.max_loras * len(workers)
    usage = min(1.0, max(0.0, sum(usages) / len(usages))) if usages else 0.0
    return PickerLoad(waiting, running, usage, max_lora, tuple(sorted(adapters)), block_size, blocks)


def picker_metrics(load: PickerLoad, now: float) -> list[Metric]:
    """``load`` as the picker's metric families; the LoRA info only where a model serves adapters (as
    vLLM emits it only with LoRA on; the picker skips a missing one silently)."""
    families: list[Metric] = [
        GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting to be processed", load.waiting),
        GaugeMetricFamily("vllm:num_requests_running", "Requests being generated", load.running),
        GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV cache in use, 0 to 1", load.kv_cache_usage),
    ]
    if load.max_lora is not None:
        lora = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "LoRA adapters held (labels); the value is the unix time it was set",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        # Requests waiting for an adapter wait in the pool, whose router prefers the workers that
        # hold it: none waits inside an engine for one, so the waiting list stays empty.
        lora.add_metric([str(load.max_lora), ",".join(load.lora_adapters), ""], now)
        families.append(lora)
    cache = GaugeMetricFamily(
        "vllm:cache_config_info", "KV cache configuration (labels)", labels=["block_size", "num_gpu_blocks"]
    )
    cache.add_metric([str(load.block_size), str(load.num_blocks)], 1.0)
    families.append(cache)
    return families


class PickerCollector(Collector):
    """The picker's series of ``server``'s served models, read at scrape time: of the whole pod, or of
    the workers that per-worker port ``slot`` names. ``only_when_asked``: none unless a served model
    sets ``option.gie_metrics=true`` (the main ``/metrics``; a worker port always exports them)."""

    def __init__(self, server: ModelService, slot: int | None = None, only_when_asked: bool = False) -> None:
        self.server = server
        self.slot = slot
        self.only_when_asked = only_when_asked

    def collect(self) -> Iterator[Metric]:
        served = self.server.served()
        if self.only_when_asked and not any(model.config.gie_metrics for model in served):
            return
        models = []
        for model in served:
            pool = self.server.describe(model.name).pool
            if pool is not None:
                lora = model.config.lora
                models.append(ModelLoad(pool, lora.max_loras if lora.enabled else None))
        yield from picker_metrics(picker_load(models, self.slot), time.time())
