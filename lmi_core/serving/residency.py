"""Residency policy: which models stay loaded, as pure functions, and the handle a request holds.

``make_room`` decides which idle models a load evicts (least recently used first, never a pinned or
busy one) so that the loaded models stay within ``max_loaded_models`` and each device's memory
budget; ``expiry`` when an idle model unloads (``option.idle_timeout``, or the last request's
``keep_alive``); ``estimate`` what a model will hold before it has been measured; ``warm_tier``
whether an eviction may put a model to sleep (vLLM's sleep mode, level 1) instead of stopping it.

``ResidentModel`` is a registered model as the HTTP handlers see it (``http.state.ServedModel``),
loaded or not. Invariant: every generation and operation goes through it, holding the model from
arrival to its last event, so a held model is never unloaded (a stream never loses its model), and
a request for an unloaded model loads it and waits, bounded by its queue deadline.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, TypeVar

from lmi_core.config import ModelConfig
from lmi_core.engine import GenerationEvent, GenerationRequest
from lmi_core.operations import Operation
from lmi_core.serving.adapters import AdapterRegistry
from lmi_core.serving.deadlines import Deadlines, deadlines
from lmi_core.serving.observer import UnloadReason
from lmi_core.serving.pool import WorkerPool
from lmi_core.serving.registry import ModelEntry
from lmi_core.serving.routing import RequestContext

T = TypeVar("T")

CPU = "cpu"  # the device key of host memory

# -- keep_alive and idle expiry ---------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_KEEP_ALIVE = 365 * 24 * 3600.0  # a year: beyond it, say -1


def parse_keep_alive(value: object) -> float:
    """Ollama's ``keep_alive``: seconds (a number), a duration (``"5m"``, ``"1h30m"``, ``"10s"``,
    ``"500ms"``), ``0`` (unload after this response) or a negative value (never unload: ``inf``)."""
    if isinstance(value, bool):
        raise ValueError("keep_alive is a duration (5m), seconds, 0 (unload now) or -1 (never)")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        negative = text.startswith("-")
        body = text.lstrip("-+")
        try:
            seconds = float(body)
        except ValueError:
            parts = _DURATION.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise ValueError(
                    f"keep_alive {text[:20]!r} is not a duration (5m, 1h30m, 10s), seconds, 0 or -1"
                ) from None
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
        seconds = -seconds if negative else seconds
    else:
        raise ValueError("keep_alive is a duration (5m), seconds, 0 (unload now) or -1 (never)")
    if math.isnan(seconds):
        raise ValueError("keep_alive is not a number")
    if seconds < 0:
        return math.inf
    return seconds if seconds <= MAX_KEEP_ALIVE else math.inf


def expiry(
    keep_alive: float | None, idle_timeout: float | None, pinned: bool
) -> tuple[float, UnloadReason] | None:
    """When a model that just went idle unloads, in seconds from now, and why; None: it stays.

    The last request's ``keep_alive`` overrides ``option.idle_timeout``; a pinned model stays."""
    if pinned:
        return None
    if keep_alive is not None:
        return None if math.isinf(keep_alive) else (keep_alive, "keep_alive")
    return None if idle_timeout is None else (idle_timeout, "idle")


# -- the budget ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    """A model that holds room (loading, loaded or unloading), as the budget sees it."""

    name: str
    held: Mapping[str, int]  # bytes per device
    last_used: float  # monotonic
    evictable: bool  # loaded, idle and not pinned
    pinned: bool


@dataclass(frozen=True)
class Budget:
    max_models: int | None  # None: no limit on the count
    capacity: Mapping[str, int]  # bytes per device; a device not listed has no memory limit


@dataclass(frozen=True)
class Room:
    """``make_room``'s answer: unload ``victims`` (None: no room now), or ``wait`` for busy models to
    go idle (False: only pinned models hold the room), and ``why`` there is none."""

    victims: tuple[str, ...] | None
    wait: bool = False
    why: str = ""


MODELS = "max_loaded_models"


def _over(count: int, used: Mapping[str, int], need: Mapping[str, int], budget: Budget) -> list[str]:
    """What one more model needing ``need`` would exceed: ``MODELS`` and/or the devices it needs."""
    over = [MODELS] if budget.max_models is not None and count + 1 > budget.max_models else []
    return over + [
        d for d, n in need.items() if d in budget.capacity and used.get(d, 0) + n > budget.capacity[d]
    ]


def make_room(need: Mapping[str, int], holders: Sequence[Holder], budget: Budget) -> Room:
    """The least recently used evictable holders to unload so that one more model needing ``need``
    fits the budget (none when it fits already).

    A model needing more than a device's whole budget needs that device to itself: it is loaded
    alone rather than never (its estimate may be high; the measurement after load replaces it). An
    evictable holder is unloaded only if that helps: it counts toward a full ``max_models`` or holds
    memory on a device that is over.
    """
    need = {d: min(n, budget.capacity[d]) if d in budget.capacity else n for d, n in need.items()}
    count = len(holders)
    used: dict[str, int] = {}
    for holder in holders:
        for device, size in holder.held.items():
            used[device] = used.get(device, 0) + size
    victims: list[str] = []
    for holder in sorted((h for h in holders if h.evictable), key=lambda h: h.last_used):
        over = _over(count, used, need, budget)
        if not over:
            break
        if MODELS in over or any(holder.held.get(d, 0) > 0 for d in over):
            victims.append(holder.name)
            count -= 1
            for device, size in holder.held.items():
                used[device] -= size
    over = _over(count, used, need, budget)
    if not over:
        return Room(tuple(victims))
    left = [h for h in holders if h.name not in victims]
    busy = [h.name for h in left if not h.pinned]
    full = [f"{MODELS}={budget.max_models}" if o == MODELS else f"the memory budget of {o}" for o in over]
    why = f"{' and '.join(full)} reached; held by {', '.join(sorted(h.name for h in left))}"
    return Room(None, wait=bool(busy), why=why)


# -- what a model will hold -----------------------------------------------------------------------

# A worker rank's own memory before any weight: the interpreter, torch and the engine. Measured here:
# the demo model's worker (2 MB of weights) has a PSS of 296-301 MiB on CPU (HF backend); CUDA adds
# its context, about 500 MiB per GPU.
RANK_OVERHEAD_CPU = 300 * 1024**2
RANK_OVERHEAD_GPU = 500 * 1024**2
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# vLLM takes this fraction of each of its GPUs at start (its --gpu-memory-utilization default).
VLLM_GPU_UTILIZATION = 0.9


def weights_bytes(model_id: str) -> int:
    """The size of a local model's weight files (safetensors, else the others); 0 when ``model_id``
    is not a local directory (a hub id: only the measurement after load knows)."""
    directory = Path(model_id)
    if not directory.is_dir():
        return 0
    files = [f for f in directory.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file()]
    preferred = [f for f in files if f.suffix == ".safetensors"] or files
    return sum(f.stat().st_size for f in preferred)


def kv_bytes_per_token(model_config: Mapping[str, object], element_bytes: int = 2) -> int:
    """The KV cache one token takes: keys and values of every layer, from a ``config.json``."""

    def number(*keys: str) -> int | None:
        for key in keys:
            value = model_config.get(key)
            if isinstance(value, int) and value > 0:
                return value
        return None

    layers = number("num_hidden_layers", "n_layer", "num_layers") or 0
    heads = number("num_attention_heads", "n_head") or 1
    kv_heads = number("num_key_value_heads") or heads
    head_dim = number("head_dim") or (number("hidden_size", "n_embd") or 0) // heads
    return 2 * layers * kv_heads * head_dim * element_bytes


def read_model_config(model_id: str) -> dict[str, object]:
    """A local model's ``config.json``; empty when there is none."""
    path = Path(model_id) / "config.json"
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def estimate(
    config: ModelConfig, workers: int, devices: Sequence[str], device_memory: Mapping[str, int]
) -> dict[str, int]:
    """What ``config`` will hold once ``workers`` workers have loaded it on ``devices`` (their GPUs;
    none: the host), bytes per device: its weights, the KV cache of one full-length sequence (the
    engine grows it with the batch) and each rank's own memory. vLLM on GPU takes its utilization
    fraction of each GPU. The measurement after its first load replaces this."""
    ranks = config.world_size
    if devices and config.backend == "vllm":
        fraction = float(config.options.get("gpu_memory_utilization", VLLM_GPU_UTILIZATION))
        return {d: int(device_memory.get(d, 0) * fraction) for d in devices}
    model_config = read_model_config(config.model_id)
    length = model_config.get("max_position_embeddings")
    tokens = int(config.options.get("max_model_len", length if isinstance(length, int) else 0))
    total = weights_bytes(config.model_id) + kv_bytes_per_token(model_config) * tokens
    if not devices:  # every worker holds all of it
        return {CPU: workers * (total + ranks * RANK_OVERHEAD_CPU)}
    per_device = total // config.world_size + RANK_OVERHEAD_GPU  # a rank per device
    return dict.fromkeys(devices, per_device)


def warm_tier(config: ModelConfig, on_gpu: bool) -> bool:
    """Whether evicting ``config``'s model may put it to sleep (vLLM's sleep mode, level 1: weights
    offloaded to host memory, KV cache dropped; waking is faster than a load) instead of stopping it.

    Only vLLM with ``option.enable_sleep_mode=true`` on GPU: vLLM refuses sleep mode on CPU."""
    enabled = config.options.get("enable_sleep_mode", "").strip().lower() == "true"
    return enabled and on_gpu and config.backend == "vllm"


def eviction(config: ModelConfig, on_gpu: bool, asleep: bool) -> Literal["sleep", "stop"]:
    """What evicting a loaded model does: put it to sleep when it has the warm tier and is awake,
    else stop its workers (an evicted sleeper goes all the way)."""
    return "sleep" if warm_tier(config, on_gpu) and not asleep else "stop"


# -- the handle ---------------------------------------------------------------------------------


class Loader(Protocol):
    """What ``ResidentModel`` asks of the server (``server.ModelServer``)."""

    def hold(self, entry: ModelEntry) -> None: ...  # a request starts holding the model

    async def acquire(self, entry: ModelEntry, limits: Deadlines) -> WorkerPool: ...  # its pool, loaded

    def release(self, entry: ModelEntry, keep_alive: float | None) -> None: ...  # the request is done


class ResidentModel:
    """A registered model, loaded or not, as the HTTP handlers see it (``http.state.ServedModel``)."""

    def __init__(self, entry: ModelEntry, loader: Loader) -> None:
        self.entry = entry
        self.loader = loader

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def loaded_at(self) -> float:
        return self.entry.registered_at

    @property
    def config(self) -> ModelConfig:
        return self.entry.config

    @property
    def adapters(self) -> AdapterRegistry | None:
        return self.entry.adapters

    @property
    def max_model_len(self) -> int | None:
        return self.entry.max_model_len

    @property
    def max_images(self) -> int | None:
        return self.entry.max_images

    def _limits(self, arrived: float, context: RequestContext | None) -> Deadlines:
        client = context.client_timeout if context is not None else None
        config = self.entry.config
        return deadlines(arrived, config.predict_timeout, config.queue_timeout, client)

    async def generate(
        self, request: GenerationRequest, context: RequestContext | None = None
    ) -> AsyncGenerator[GenerationEvent, None]:
        """``request``'s events from the model's pool, once it is loaded."""
        arrived = time.monotonic()
        self.loader.hold(self.entry)
        try:
            pool = await self.loader.acquire(self.entry, self._limits(arrived, context))
            events = pool.generate(request, context, arrived=arrived)
            try:
                async for event in events:
                    yield event
            finally:
                await events.aclose()
        finally:
            self.loader.release(self.entry, context.keep_alive if context is not None else None)

    async def perform(self, operation: Operation[T], context: RequestContext | None = None) -> T:
        """``operation``'s result from the model's pool, once it is loaded."""
        arrived = time.monotonic()
        self.loader.hold(self.entry)
        try:
            pool = await self.loader.acquire(self.entry, self._limits(arrived, context))
            return await pool.perform(operation, context, arrived=arrived)
        finally:
            self.loader.release(self.entry, context.keep_alive if context is not None else None)
