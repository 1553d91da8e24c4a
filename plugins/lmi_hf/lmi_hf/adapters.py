"""LoRA adapters of the HF engine: read off the step, installed between steps, cached LRU.

Invariants: the model's set of adapters changes only in the scheduler thread, between two steps
(``AdapterSet.apply``, from the step's plan, so every rank of an MPI job changes it at the same
step); reading and checking an adapter's files runs on a reader thread, never on the event loop or
inside a step; an adapter is never evicted while it is pinned or a running or waiting request uses
it; the running batch holds at most ``max_loras`` distinct adapters. Requests for different adapters
and for the base model run in one forward pass: PEFT's mixed-adapter batches (``adapter_names``, one
per row, ``__base__`` for the base model). That costs per step about one small LoRA matmul pair per
adapter per targeted layer: 4 adapters + base at c=16 ran at 0.40-0.75x the base-only tokens/s of the
same engine (``benchmarks/bench_lora.py``, demo model and a 512x4 one, the shared 2-core machine).
A request names its adapter and path; a resident adapter of that name is used as it is (a new path
takes effect after an unload).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmi_core.engine import LoraAdapter
from lmi_core.errors import EngineError
from lmi_core.option_values import LoraSettings

logger = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's adapter name for rows that run the base model
WEIGHT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[^.]+)?\.weight$")


@dataclass
class ParsedAdapter:
    """An adapter read from disk and checked against the model, ready to install."""

    path: str
    config: Any  # peft.LoraConfig
    weights: dict[str, torch.Tensor]


def bad_adapter(name: str, path: str, why: str) -> EngineError:
    return EngineError(f"LoRA adapter {name!r} ({path}) cannot be used: {why}", status=400)


def read_adapter(adapter: LoraAdapter, max_rank: int, linears: dict[str, tuple[int, int]]) -> ParsedAdapter:
    """Read ``adapter``'s PEFT config and weights and check them against the model's linear layers
    (name -> (in, out) features); a 400 naming the adapter when it cannot serve this model."""
    from peft import LoraConfig
    from peft.utils import load_peft_weights

    name, path = adapter.name, adapter.path

    def bad(why: str) -> EngineError:
        return bad_adapter(name, path, why)

    config_file = Path(path) / "adapter_config.json"
    if not Path(path).is_dir():
        raise bad("no such directory")
    if not config_file.is_file():
        raise bad("not a PEFT adapter (no adapter_config.json)")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise bad(f"adapter_config.json is not JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        kind = raw.get("peft_type") if isinstance(raw, dict) else None
        raise bad(f"not a LoRA adapter (peft_type {kind!r})")
    try:
        config = LoraConfig.from_pretrained(path)
        weights = load_peft_weights(path, device="cpu")
    except Exception as exc:  # PEFT raises several types for a broken directory
        raise bad(f"{exc.__class__.__name__}: {exc}") from None
    ranks = [int(config.r), *(int(r) for r in (config.rank_pattern or {}).values())]
    if max(ranks) > max_rank:
        raise bad(f"rank {max(ranks)} is above option.max_lora_rank={max_rank}")
    missing = missing_targets(config.target_modules, linears)
    if missing:
        raise bad(f"targets modules the model lacks: {', '.join(sorted(missing))}")
    mismatch = shape_mismatches(weights, linears)
    if mismatch:
        raise bad(f"weights do not fit the model: {'; '.join(mismatch[:3])}")
    return ParsedAdapter(path=path, config=config, weights=weights)


def missing_targets(targets: Any, linears: dict[str, tuple[int, int]]) -> list[str]:
    """The entries of a LoRA config's ``target_modules`` that match none of the model's layers."""
    if targets is None or targets == "all-linear":
        return []
    if isinstance(targets, str):  # PEFT: a regular expression over full module names
        return [] if any(re.fullmatch(targets, n) for n in linears) else [targets]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in linears)]


def shape_mismatches(weights: dict[str, torch.Tensor], linears: dict[str, tuple[int, int]]) -> list[str]:
    """LoRA matrices whose layer the model lacks or whose shape is not [r, in] (A) / [out, r] (B)."""
    problems = []
    for key, tensor in weights.items():
        match = WEIGHT_KEY.match(key)
        if match is None:
            continue  # modules_to_save and the like: PEFT loads them as they are
        module, part = match["module"], match["part"]
        if module not in linears:
            problems.append(f"{module} is not a linear layer of the model")
            continue
        fan_in, fan_out = linears[module]
        size = tensor.shape[1] if part == "A" else tensor.shape[0]
        if size != (fan_in if part == "A" else fan_out):
            problems.append(f"{key} has shape {list(tensor.shape)}, the layer is {fan_in} -> {fan_out}")
    return problems


@dataclass
class AdapterPlan:
    """The adapter side of one step's plan (leader only): which waiting requests may join, which
    adapters to install first and which to drop, which waiting requests fail (bad adapter)."""

    admit: list[int] = field(default_factory=list)  # indexes into the waiting list
    load: list[tuple[str, str]] = field(default_factory=list)  # (name, path)
    evict: list[str] = field(default_factory=list)  # LRU evictions
    unload: list[str] = field(default_factory=list)  # asked for (unload_adapter)
    fail: list[tuple[int, str]] = field(default_factory=list)  # (waiting index, message)


def plan_adapters(
    waiting: list[LoraAdapter | None],
    running: Iterable[str],
    resident: list[str],
    pinned: set[str],
    ready: set[str],
    failed: dict[str, str],
    loads: list[LoraAdapter],
    unloads: list[str],
    room: int,
    options: LoraSettings,
) -> AdapterPlan:
    """Admit waiting requests in arrival order as long as the batch has ``room``, skipping (not
    blocking on) one whose adapter is still being read, would exceed ``max_loras`` distinct adapters
    in the batch, or finds the cache full of adapters in use: a request behind it may still run.

    ``resident`` is in LRU order (oldest first); a load evicts the oldest adapter that is neither
    pinned nor used by a running or waiting request; when only pinned ones are left it goes over
    ``max_cpu_loras`` rather than never. ``ready``: read and checked; ``failed``: read failed."""
    plan = AdapterPlan()
    active = set(running)  # distinct adapters in the batch
    in_use = active | {a.name for a in waiting if a is not None}
    cache = list(resident)

    def make_room() -> bool:
        if len(cache) < options.max_cpu_loras:
            return True
        for name in cache:
            if name not in pinned and name not in in_use:
                cache.remove(name)
                plan.evict.append(name)
                return True
        return all(name in pinned for name in cache)

    for name in unloads:
        if name in cache and name not in in_use:
            cache.remove(name)
            plan.unload.append(name)
    for asked in loads:
        if asked.name not in cache and asked.name in ready and make_room():
            cache.append(asked.name)
            plan.load.append((asked.name, asked.path))
    for i, adapter in enumerate(waiting):
        if room <= 0:
            break
        if adapter is not None:
            name = adapter.name
            if name in failed:
                plan.fail.append((i, failed[name]))
                continue
            if name not in active and len(active) >= options.max_loras:
                continue
            if name not in cache:
                if name not in ready or not make_room():
                    continue
                cache.append(name)
                plan.load.append((name, adapter.path))
            active.add(name)
        plan.admit.append(i)
        room -= 1
    return plan


class AdapterSet:
    """The engine's adapters: reads in flight, the resident LRU cache, load/unload requests.

    ``model`` is what the engine runs: the base model, or a ``PeftModel`` around it while any
    adapter is resident (PEFT cannot run a ``PeftModel`` with no adapter: it is unwrapped again).
    """

    def __init__(self, model: Any, options: LoraSettings, wake: Callable[[], None]) -> None:
        self.options = options
        self.model = model
        self._base = model
        self._wake = wake
        self._lock = threading.Lock()
        # Layer shapes for the reader's checks, read once: the reader must not walk a model that
        # the scheduler thread is changing.
        self._linears = {
            name: (int(m.in_features), int(m.out_features))
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)
        }
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="lmi-hf-lora") if options.enabled else None
        self._reads: dict[str, Future[ParsedAdapter]] = {}
        self._resident: OrderedDict[str, str] = OrderedDict()  # scheduler thread only; LRU order
        self.names: tuple[str, ...] = ()  # a snapshot of the resident names, for other threads
        self.pinned: set[str] = set()
        self._loads: dict[str, LoraAdapter] = {}  # asked for by load_adapter, not yet resident
        self._unloads: set[str] = set()
        self._waiters: list[tuple[str, str, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self.loads_total = 0
        self.evictions_total = 0
        # Adapters whose install failed at the last step, for the requests admitted with them.
        self.install_errors: dict[str, EngineError] = {}

    # -- any thread ----------------------------------------------------------------------------

    def check(self, adapter: LoraAdapter | None) -> None:
        if adapter is not None and not self.options.enabled:
            raise EngineError(
                f"LoRA adapter {adapter.name!r} asked for, but this model is served without "
                "option.enable_lora=true",
                status=400,
            )

    def prefetch(self, adapter: LoraAdapter | None) -> Future[ParsedAdapter] | None:
        """Start reading ``adapter`` on the reader thread unless it is resident or being read."""
        if adapter is None or self._reader is None or adapter.name in self.names:
            return None
        with self._lock:
            future = self._reads.get(adapter.name)
            if future is not None:
                return future
            future = self._reader.submit(read_adapter, adapter, self.options.max_lora_rank, self._linears)
            self._reads[adapter.name] = future
        # Outside the lock: a read already done runs the callback here, and it takes the engine's lock.
        future.add_done_callback(lambda _: self._wake())
        return future

    @property
    def pending(self) -> bool:
        """Whether load/unload requests wait for the scheduler."""
        return bool(self._loads or self._unloads)

    async def load(self, adapter: LoraAdapter) -> None:
        """Make ``adapter`` resident (``AdapterEngine.load_adapter``); pin it if asked."""
        self.check(adapter)
        with self._lock:
            if adapter.pinned:
                self.pinned.add(adapter.name)
            else:
                self.pinned.discard(adapter.name)
        future = self.prefetch(adapter)
        if future is None:
            return  # resident already
        try:
            await asyncio.wrap_future(future)
        except EngineError:
            with self._lock:
                if self._reads.get(adapter.name) is future:
                    del self._reads[adapter.name]
            raise
        await self._wait("load", adapter, lambda: adapter.name in self.names)

    async def unload(self, name: str) -> None:
        """Drop adapter ``name`` once no request uses it (``AdapterEngine.unload_adapter``)."""
        with self._lock:
            self.pinned.discard(name)
        if name not in self.names:
            return
        await self._wait("unload", LoraAdapter(name, ""), lambda: name not in self.names)

    async def _wait(self, kind: str, adapter: LoraAdapter, done: Callable[[], bool]) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if done():
                return
            self._waiters.append((kind, adapter.name, loop, future))
            if kind == "load":
                self._loads[adapter.name] = adapter
            else:
                self._unloads.add(adapter.name)
        self._wake()
        await future

    # -- scheduler thread ----------------------------------------------------------------------

    def plan(
        self, waiting: list[LoraAdapter | None], running: list[LoraAdapter | None], room: int
    ) -> AdapterPlan:
        """Leader: the adapter side of the next step (``plan_adapters`` on the current state)."""
        if not self.options.enabled:
            return AdapterPlan(admit=list(range(min(room, len(waiting)))))
        self._settle()  # a load or unload that raced with the step that did it
        for adapter in waiting:
            if adapter is not None and adapter.name not in self._resident:
                self.prefetch(adapter)  # evicted since it arrived: read it again
        with self._lock:
            done = {name: f for name, f in self._reads.items() if f.done()}
            loads, unloads = list(self._loads.values()), list(self._unloads)
            pinned = set(self.pinned)
        ready = {name for name, f in done.items() if f.exception() is None}
        failed = {name: str(f.exception()) for name, f in done.items() if f.exception() is not None}
        running_names = [a.name for a in running if a is not None]
        resident = list(self._resident)
        plan = plan_adapters(
            waiting, running_names, resident, pinned, ready, failed, loads, unloads, room, self.options
        )
        reported = {waiting[i].name for i, _ in plan.fail}  # type: ignore[union-attr]
        with self._lock:  # those requests fail this step; the next request for it reads it again
            for name in reported:
                if self._reads.get(name) is done[name]:
                    del self._reads[name]
        return plan

    def apply(self, unload: list[str], evict: list[str], load: list[tuple[str, str]]) -> None:
        """Every rank: drop and install adapters as the step's plan says (before its admissions).
        An adapter that fails to install is not resident: the engine fails its admitted requests."""
        if not (unload or evict or load or self._waiters):
            return  # the usual step: nothing to change
        self.install_errors = {}
        for name in [*unload, *evict]:
            self._drop(name)
        self.evictions_total += len(evict)
        for name, path in load:
            try:
                self._install(name, path)
            except Exception as exc:
                logger.exception("LoRA adapter %s failed to install", name)
                self.install_errors[name] = bad_adapter(name, path, f"{exc.__class__.__name__}: {exc}")
                if self.model is not self._base and name in self.model.peft_config:
                    self._resident[name] = path
                    self._drop(name)
        self.names = tuple(self._resident)
        self._settle()

    def used(self, adapters: Iterable[LoraAdapter | None]) -> None:
        """Admitted requests used these adapters: most recently used now."""
        for adapter in adapters:
            if adapter is not None and adapter.name in self._resident:
                self._resident.move_to_end(adapter.name)

    def missing(self, adapter: LoraAdapter | None) -> EngineError | None:
        """Why an admitted request cannot run: its adapter failed to install (None: it can run)."""
        if adapter is None or adapter.name in self._resident:
            return None
        error = self.install_errors.get(adapter.name)
        return error or bad_adapter(adapter.name, adapter.path, "not loaded")

    def forward_args(self, adapters: Iterable[LoraAdapter | None]) -> list[str] | None:
        """PEFT's ``adapter_names`` for these rows; None while the model has no adapter."""
        if self.model is self._base:
            return None
        return [BASE if a is None else a.name for a in adapters]

    def _install(self, name: str, path: str) -> None:
        from peft import PeftModel
        from peft.utils import set_peft_model_state_dict

        with self._lock:
            future = self._reads.pop(name, None)
        # The leader's read is done; a follower waits for its own, or reads here when its copy of the
        # request has not arrived yet (the other ranks wait in the step's collectives meanwhile).
        if future is not None:
            parsed = future.result()
        else:
            parsed = read_adapter(LoraAdapter(name, path), self.options.max_lora_rank, self._linears)
        if self.model is self._base:
            self.model = PeftModel(self._base, parsed.config, adapter_name=name)
        else:
            self.model.add_adapter(name, parsed.config)
        set_peft_model_state_dict(self.model, parsed.weights, adapter_name=name)
        self.model.eval()
        self._resident[name] = path
        self.loads_total += 1
        logger.info("LoRA adapter %s loaded from %s (%d resident)", name, path, len(self._resident))

    def _drop(self, name: str) -> None:
        if name not in self._resident:
            return
        del self._resident[name]
        if self._resident:
            with warnings.catch_warnings():  # "active adapter deleted": every forward names its adapters
                warnings.simplefilter("ignore", UserWarning)
                self.model.delete_adapter(name)
        else:
            self._base = self.model = self.model.unload()  # the base model, its LoRA layers removed
        logger.info("LoRA adapter %s dropped (%d resident)", name, len(self._resident))

    def _settle(self) -> None:
        """Wake load_adapter / unload_adapter callers whose adapter is now in / out."""
        with self._lock:
            waiting = []
            for kind, name, loop, future in self._waiters:
                if (name in self._resident) == (kind == "load"):
                    self._loads.pop(name, None) if kind == "load" else self._unloads.discard(name)
                    loop.call_soon_threadsafe(_resolve, future)
                else:
                    waiting.append((kind, name, loop, future))
            self._waiters = waiting

    def shutdown(self) -> None:
        if self._reader is not None:
            self._reader.shutdown(wait=False, cancel_futures=True)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
