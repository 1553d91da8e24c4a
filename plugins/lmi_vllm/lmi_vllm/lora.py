"""LoRA adapters in the vLLM engine: lmi's adapter names as vLLM's integer ids, and what is resident.

Invariants: an id stands for one (name, path) for the engine's life and is never reused, because vLLM
caches an adapter's weights by id (a reused id would serve the old weights after a re-registration
with a new path). Loads and evictions are counted from successive snapshots of vLLM's resident set
(``AsyncLLM.list_loras``: its CPU LRU cache of ``max_cpu_loras``), less the adapters lmi removed:
vLLM has no counters of its own, so a load and an eviction of the same adapter between two snapshots
go uncounted (snapshots are taken after every load lmi asks for and once per health tick, 1 s).

No vLLM import: the conversions here are unit-tested without it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from lmi_core import EngineError
from lmi_core.engine import LoraAdapter


@dataclass
class LoraIds:
    """vLLM's ``lora_int_id`` for each adapter name (ids start at 1: vLLM refuses 0)."""

    _ids: dict[str, tuple[int, str]] = field(default_factory=dict)  # name -> (id, path)
    _names: dict[int, str] = field(default_factory=dict)  # current ids only
    _next: int = 1

    def assign(self, name: str, path: str) -> tuple[int, int | None]:
        """The id of ``name`` at ``path``, and the id it replaces when ``name`` had another path."""
        known = self._ids.get(name)
        if known is not None and known[1] == path:
            return known[0], None
        lora_id = self._next
        self._next += 1
        self._ids[name] = (lora_id, path)
        self._names[lora_id] = name
        replaced = None
        if known is not None:
            replaced = known[0]
            del self._names[replaced]
        return lora_id, replaced

    def get(self, name: str) -> int | None:
        known = self._ids.get(name)
        return None if known is None else known[0]

    def names(self, ids: Iterable[int]) -> list[str]:
        """The names of ``ids`` (sorted; ids lmi no longer uses are left out)."""
        return sorted(self._names[i] for i in ids if i in self._names)


@dataclass
class ResidentTracker:
    """The adapter ids vLLM holds, and the loads and evictions seen between snapshots of them."""

    resident: frozenset[int] = frozenset()
    loads_total: int = 0
    evictions_total: int = 0
    # Ids lmi is removing: a snapshot taken while the removal is under way still shows them.
    _removed: set[int] = field(default_factory=set)

    def removed(self, lora_id: int) -> None:
        """lmi removes ``lora_id`` itself: its leaving is not an eviction."""
        self._removed.add(lora_id)

    def observe(self, current: Iterable[int]) -> None:
        """Take vLLM's resident set now: new ids were loaded, missing ones evicted (unless removed)."""
        now = frozenset(current)
        gone = self.resident - now
        self.loads_total += len(now - self.resident)
        self.evictions_total += len(gone - self._removed)
        self._removed &= now  # seen gone (or never there): settled
        self.resident = now


def can_pin(pinned: int, max_loras: int, max_cpu_loras: int) -> bool:
    """Whether one more adapter may be pinned: a batch may need ``max_loras`` unpinned adapters in
    vLLM's memory cache of ``max_cpu_loras`` at once, and one evicted mid-batch fails vLLM's engine core."""
    return pinned + 1 + max_loras <= max_cpu_loras


def adapter_error(adapter: LoraAdapter, exc: BaseException) -> EngineError:
    """vLLM's failure to load ``adapter`` (missing path, rank above max_lora_rank, modules the model
    lacks) as a 400 naming the adapter; vLLM's engine core sends only the message text."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    reason = lines[-1] if lines else type(exc).__name__
    return EngineError(
        f"LoRA adapter {adapter.name!r} (path {adapter.path}) cannot be loaded: {reason}",
        status=400,
        type="BadRequestException",
        param="adapter",
    )
