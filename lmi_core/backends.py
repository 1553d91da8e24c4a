"""Backend registry: which engine plugins are installed and which one serves a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, cast

import pluggy

from lmi_core.errors import ConfigError
from lmi_core.reasoning import model_parser, parser_registry

if TYPE_CHECKING:  # the worker side imports this module: no pydantic there
    from lmi_core.config import ModelConfig

Mode = Literal["python", "mpi"]


@dataclass(frozen=True)
class BackendSpec:
    """An engine backend a plugin provides."""

    name: str
    default_mode: Mode = "python"
    # Values of option.rolling_batch that select this backend (DJL compatibility).
    rolling_batch: tuple[str, ...] = ()
    # Lower is preferred by option.rolling_batch=auto.
    auto_priority: int = 100
    # Whether option.rolling_batch=auto may pick it (the handler backend serves only models that ask).
    auto: bool = True
    description: str = ""
    aliases: tuple[str, ...] = field(default=())
    # Its engine honours GenerationRequest.resume_ids, so a stream whose worker died mid-request can
    # continue on another; without it only a request that got no token yet moves.
    resumes_streams: bool = False


def installed_backends(pm: pluggy.PluginManager) -> dict[str, BackendSpec]:
    """Every backend registered by the installed plugins, by name."""
    specs: dict[str, BackendSpec] = {}
    for group in pm.hook.register_backends():
        for spec in group or ():
            specs[spec.name] = spec
    return specs


@dataclass(frozen=True)
class InstalledBackend:
    """A backend and where it comes from: the distribution (name and version) that registers it."""

    spec: BackendSpec
    plugin: str
    distribution: str | None


def list_backends(pm: pluggy.PluginManager) -> list[InstalledBackend]:
    """Every registered backend with its plugin and distribution, by name (``lmi backends``)."""
    dists = {id(plugin): f"{dist.project_name} {dist.version}" for plugin, dist in pm.list_plugin_distinfo()}
    found: list[InstalledBackend] = []
    for impl in pm.hook.register_backends.get_hookimpls():
        specs = cast("list[BackendSpec]", impl.function() or [])
        found += [InstalledBackend(spec, impl.plugin_name, dists.get(id(impl.plugin))) for spec in specs]
    return sorted(found, key=lambda b: b.spec.name)


def select_backend(pm: pluggy.PluginManager, backend: str | None, rolling_batch: str | None) -> BackendSpec:
    """Pick the backend named by ``option.backend``, else by ``option.rolling_batch`` (default auto)."""
    specs = installed_backends(pm)
    available = ", ".join(sorted(specs)) or "none (pip install lmi-hf, lmi-vllm or lmi-trtllm)"
    if backend:
        for spec in specs.values():
            if backend == spec.name or backend in spec.aliases:
                return spec
        raise ConfigError("option.backend", backend, f"an installed backend: {available}")
    choice = (rolling_batch or "auto").lower()
    if choice == "auto":
        candidates = [s for s in specs.values() if s.auto]
        if not candidates:
            raise ConfigError("option.rolling_batch", choice, f"an installed backend: {available}")
        return min(candidates, key=lambda s: (s.auto_priority, s.name))
    for spec in specs.values():
        if choice in spec.rolling_batch:
            return spec
    allowed = sorted({rb for s in specs.values() for rb in s.rolling_batch} | {"auto"})
    raise ConfigError(
        "option.rolling_batch",
        choice,
        f"one of {', '.join(allowed)} (installed backends: {available})",
    )


def resolve_model(config: ModelConfig, pm: pluggy.PluginManager) -> ModelConfig:
    """Fill in the backend and the mode, and let the backend check its options; the core's own
    plugin-provided option (``option.reasoning_parser``) must name a parser."""
    spec = select_backend(pm, config.backend_name, config.rolling_batch)
    config.backend = spec.name
    if config.mpi_mode is not None:  # an explicit option.mpi_mode always wins
        config.mode = "mpi" if config.mpi_mode else "python"
    elif config.engine == "MPI":
        config.mode = "mpi"
    else:
        mode = pm.hook.resolve_mode(config=config) or spec.default_mode
        if mode not in ("python", "mpi"):
            raise ConfigError("option.mpi_mode", mode, "a mode of python or mpi (from the backend plugin)")
        config.mode = mode
    pm.hook.validate_config(config=config)
    model_parser(config.options, parser_registry(pm.hook.register_reasoning_parsers()))
    return config
