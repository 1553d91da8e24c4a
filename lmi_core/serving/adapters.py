"""One model's LoRA adapters: the registry (name -> adapter) and the static check of an adapter directory.

Invariant: every adapter in a registry passed ``check_adapter`` against the model's settings when it
was registered (its directory exists, ``adapter_config.json`` is a PEFT LoRA config of rank at most
``option.max_lora_rank``, its weights file is there, and its target modules exist in the base model
when the base is a local directory). The registry never touches workers: ``on_change`` tells its
owner (the pool) which adapters to load into or drop from them. The check reads only small files
and the base model's safetensors headers (8-byte little-endian length, then JSON), never a tensor;
it blocks, so callers on an event loop run it in a thread.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from lmi_core.config import ModelConfig
from lmi_core.engine import LoraAdapter
from lmi_core.errors import BadRequestError, ConfigError, NotFoundError, ServiceError
from lmi_core.option_values import LoraSettings
from lmi_core.worker.wire import AdapterOp

logger = logging.getLogger(__name__)

ADAPTERS_DIR = "adapters"
CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# Names end up in URLs and metric labels: the same rule as model names.
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# A safetensors header beyond this is not one (the format caps it at 100 MB).
MAX_HEADER = 100 * 1024 * 1024

Source = Literal["directory", "djl", "vllm"]


@dataclass(frozen=True)
class RegisteredAdapter:
    """An adapter as registered: where it came from and whether workers hold it ahead of use."""

    name: str
    src: str
    preload: bool = True  # loaded into every worker at registration and when a worker (re)starts
    pin: bool = False  # never evicted from a worker's cache
    source: Source = "djl"  # the adapters directory, DJL's API or vLLM's

    @property
    def lora(self) -> LoraAdapter:
        return LoraAdapter(self.name, self.src, pinned=self.pin)


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names in a safetensors file's header."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER:
            raise ValueError(f"{path}: header of {length} bytes")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    return [k for k in header if k != "__metadata__"]


def base_modules(model_id: str) -> frozenset[str] | None:
    """The module paths of a local base model (``model.layers.0.self_attn.q_proj``), read from its
    safetensors headers; None when the base is not a local directory with safetensors files."""
    directory = Path(model_id)
    files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    if not files:
        return None
    modules: set[str] = set()
    for file in files:
        for key in safetensors_keys(file):
            modules.add(key.rsplit(".", 1)[0] if "." in key else key)
    return frozenset(modules)


def missing_targets(targets: Any, modules: frozenset[str]) -> list[str]:
    """The entries of PEFT's ``target_modules`` no base module matches (PEFT's rule: a name matches a
    module whose path is it or ends with ``.name``; a string is a regular expression on the path)."""
    if isinstance(targets, str):
        if targets == "all-linear":
            return []
        try:
            pattern = re.compile(targets)
        except re.error:
            return [targets]
        return [] if any(pattern.fullmatch(m) for m in modules) else [targets]
    names = [str(t) for t in targets or []]
    return [t for t in names if not any(m == t or m.endswith("." + t) for m in modules)]


def check_adapter(src: str, settings: LoraSettings, modules: frozenset[str] | None) -> None:
    """Raise a ``BadRequestError`` naming ``src`` unless it is a LoRA adapter this model can serve."""

    def bad(why: str) -> BadRequestError:
        return BadRequestError(f"src {src!r}: {why}", param="src")

    directory = Path(src)
    if not directory.is_dir():
        raise bad("no such directory (only local adapters are supported)")
    config_path = directory / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise bad(f"no {CONFIG_FILE}: not a PEFT adapter") from None
    except (OSError, ValueError) as exc:
        raise bad(f"{CONFIG_FILE} does not parse: {exc}") from None
    if not isinstance(config, dict):
        raise bad(f"{CONFIG_FILE} is not a JSON object")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise bad(f"peft_type is {config.get('peft_type')!r}, not LORA")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise bad(f"r is {rank!r}, not a positive integer")
    if rank > settings.max_lora_rank:
        raise bad(f"rank {rank} is above option.max_lora_rank={settings.max_lora_rank}")
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise bad(f"no weights ({' or '.join(WEIGHT_FILES)})")
    if modules is not None:
        missing = missing_targets(config.get("target_modules"), modules)
        if missing:
            raise bad(f"target modules {missing} are not in the base model")


def check_name(name: str, param: str = "name") -> None:
    if not ADAPTER_NAME.match(name):
        raise BadRequestError(
            f"adapter name {name!r}: letters, digits, '_', '.', '-' (64 at most), a letter or digit first",
            param=param,
        )


def directory_adapters(config: ModelConfig) -> list[tuple[str, str]]:
    """(name, path) of each sub-directory of ``adapters/`` in the model directory or in a local
    ``option.model_id`` (DJL's model and download directories), sorted by name."""
    roots = [d for d in dict.fromkeys((config.model_dir, config.model_id)) if d and Path(d).is_dir()]
    found: dict[str, str] = {}
    for root in roots:
        folder = Path(root) / ADAPTERS_DIR
        if folder.is_dir():
            for sub in sorted(folder.iterdir()):
                if sub.is_dir():
                    found.setdefault(sub.name, str(sub.resolve()))
    return sorted(found.items())


class AdapterRegistry:
    """The adapters of one model, by name (see the module docstring)."""

    def __init__(
        self,
        model: ModelConfig,
        on_change: Callable[[AdapterOp, LoraAdapter], None] = lambda op, adapter: None,
    ) -> None:
        self.model = model.name
        self.settings = model.lora
        self.base = model.model_id
        self.on_change = on_change
        self._adapters: dict[str, RegisteredAdapter] = {}
        self._modules: frozenset[str] | None = None
        self._modules_read = False

    def modules(self) -> frozenset[str] | None:
        """The base model's module paths (read once; blocking)."""
        if not self._modules_read:
            self._modules = base_modules(self.base)
            self._modules_read = True
        return self._modules

    def check(self, src: str) -> None:
        """``check_adapter`` for this model (blocking: run it in a thread on an event loop)."""
        check_adapter(src, self.settings, self.modules())

    def register_directory(self, config: ModelConfig) -> None:
        """Register the adapters directory's adapters (at start): a bad one is a ``ConfigError``."""
        for name, path in directory_adapters(config):
            try:
                check_name(name)
                self.check(path)
            except ServiceError as exc:
                raise ConfigError(f"{ADAPTERS_DIR}/{name}", path, f"a LoRA adapter ({exc})") from None
            self.add(name, path, source="directory")
            logger.info("model %s: adapter %s registered from %s", self.model, name, path)

    def add(
        self, name: str, src: str, *, preload: bool = True, pin: bool = False, source: Source = "djl"
    ) -> RegisteredAdapter:
        """Register a checked adapter; a taken name is a 409 (DJL's message)."""
        self.check_free(name)
        if name == self.model:
            raise BadRequestError(f"adapter name {name!r} is the base model's name", param="name")
        if pin and not preload:
            raise BadRequestError("Can not set preload to false and pin to true", param="pin")
        entry = RegisteredAdapter(name, src, preload, pin, source)
        self._adapters[name] = entry
        if preload or pin:
            self.on_change("load", entry.lora)
        return entry

    def check_free(self, name: str) -> None:
        """A 409 (DJL's message) when ``name`` is registered already."""
        if name in self._adapters:
            raise ServiceError(
                f"The adapter {name} already exists. If you want to replace it, please unregistering "
                "before registering a new adapter with the same name.",
                status=409,
                type="ConflictException",
                param="name",
            )

    def update(self, name: str, *, preload: bool | None = None, pin: bool | None = None) -> RegisteredAdapter:
        """Change ``preload``/``pin`` (DJL's rules: no pin without preload, no unpinning)."""
        old = self.get(name)
        new = replace(
            old,
            preload=old.preload if preload is None else preload,
            pin=old.pin if pin is None else pin,
        )
        if new.pin and not new.preload:
            raise BadRequestError("Can not set load to false and pin to true", param="pin")
        if old.pin and not new.pin:
            raise BadRequestError(
                f"Unpinning adapter is not supported. To unpin adapter '{name}', please delete the "
                "adapter and re-register it without pinning.",
                param="pin",
            )
        self._adapters[name] = new
        if (new.preload and not old.preload) or (new.pin and not old.pin):
            self.on_change("load", new.lora)
        elif old.preload and not new.preload:
            self.on_change("unload", new.lora)
        return new

    def remove(self, name: str) -> RegisteredAdapter:
        entry = self.get(name)
        del self._adapters[name]
        self.on_change("unload", entry.lora)
        return entry

    def get(self, name: str) -> RegisteredAdapter:
        """The adapter ``name``; a 404 naming it when unknown."""
        try:
            return self._adapters[name]
        except KeyError:
            raise NotFoundError(f"The adapter {name} was not found", param="adapter") from None

    def find(self, name: str) -> RegisteredAdapter | None:
        return self._adapters.get(name)

    def entries(self) -> list[RegisteredAdapter]:
        """Every adapter, in registration order."""
        return list(self._adapters.values())

    def resident(self) -> Iterable[LoraAdapter]:
        """The adapters a (re)started worker is given at once: preloaded or pinned."""
        return [e.lora for e in self._adapters.values() if e.preload or e.pin]


def adapter_registry(
    config: ModelConfig, on_change: Callable[[AdapterOp, LoraAdapter], None] = lambda op, adapter: None
) -> AdapterRegistry | None:
    """The registry of a model with ``option.enable_lora``, its directory's adapters registered; else None."""
    if not config.lora.enabled:
        return None
    registry = AdapterRegistry(config, on_change)
    registry.register_directory(config)
    return registry
