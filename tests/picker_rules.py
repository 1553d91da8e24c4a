"""The endpoint picker's reading of a model server's ``/metrics``, re-expressed in Python.

What GIE's endpoint picker (now in llm-d-router, ``pkg/epp/framework/plugins/datalayer/extractor/
metrics``: ``spec.go``, ``extractor.go``, ``loraspec.go``; the vLLM mapping in ``factories.go``) does
with one scrape, rule for rule, so that a test can read lmi-core's output as the picker would:

- a metric is looked up by family name; a missing family, or one without samples, is an error;
- among the family's series, the one with the newest exposition timestamp wins, and with no
  timestamps (``0``) the first one does (``getLatestMetric``: ``ts > recent`` from ``-1``);
- its value is read from a gauge or a counter only; any other type reads as 0 (``extractValue``);
- ``vllm:lora_requests_info``: the series with the largest value wins (the value is when it was
  set); a missing family is no error (vLLM emits it only with LoRA on); ``running_lora_adapters`` and
  ``waiting_lora_adapters`` are comma lists (blanks dropped), ``max_lora`` an integer (``Atoi``);
- ``vllm:cache_config_info``: ``block_size`` and ``num_gpu_blocks`` are integer labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

QUEUED = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_USAGE = "vllm:kv_cache_usage_perc"
LORA = "vllm:lora_requests_info"
CACHE = "vllm:cache_config_info"


class PickerError(Exception):
    """What the picker would count as an extraction error for this scrape."""


@dataclass
class PickerMetrics:
    """The endpoint's fields the picker fills (``fwkdl.Metrics``)."""

    waiting_queue_size: int = 0
    running_requests_size: int = 0
    kv_cache_usage_percent: float = 0.0
    active_models: dict[str, int] = field(default_factory=dict)
    waiting_models: dict[str, int] = field(default_factory=dict)
    max_active_models: int = 0
    cache_block_size: int = 0
    cache_num_blocks: int = 0


def families(text: str) -> dict[str, Metric]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def latest(found: dict[str, Metric], name: str) -> tuple[Metric, Sample]:
    """``Spec.getLatestMetric`` for a spec without label matchers."""
    family = found.get(name)
    if family is None or not family.samples:
        raise PickerError(f"metric family {name!r} not found")
    best, recent = None, -1.0
    for sample in family.samples:
        stamp = float(sample.timestamp or 0) * 1000
        if stamp > recent:
            best, recent = sample, stamp
    assert best is not None
    return family, best


def value(family: Metric, sample: Sample) -> float:
    return float(sample.value) if family.type in ("gauge", "counter") else 0.0


def adapters(csv: str) -> dict[str, int]:
    return {name.strip(): 0 for name in csv.split(",") if name.strip()}


def read(text: str) -> PickerMetrics:
    """One scrape as the picker's ``Extractor.Extract`` fills an endpoint; ``PickerError`` where it
    would record an error."""
    found = families(text)
    out = PickerMetrics()
    out.waiting_queue_size = int(value(*latest(found, QUEUED)))
    out.running_requests_size = int(value(*latest(found, RUNNING)))
    out.kv_cache_usage_percent = value(*latest(found, KV_USAGE))
    lora = found.get(LORA)
    if lora is not None and lora.samples:
        chosen = max(lora.samples, key=lambda s: value(lora, s))  # the first of equals, as in Go
        out.active_models = adapters(chosen.labels.get("running_lora_adapters", ""))
        out.waiting_models = adapters(chosen.labels.get("waiting_lora_adapters", ""))
        if chosen.labels.get("max_lora", ""):
            out.max_active_models = int(chosen.labels["max_lora"])
    _, cache = latest(found, CACHE)
    for label, attribute in (("block_size", "cache_block_size"), ("num_gpu_blocks", "cache_num_blocks")):
        if cache.labels.get(label, ""):
            setattr(out, attribute, int(cache.labels[label]))
    return out
