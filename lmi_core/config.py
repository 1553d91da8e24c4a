"""Configuration: ``serving.properties``, ``OPTION_*`` / ``SERVING_*`` env mapping, validation.

Precedence (model level, highest first): ``serving.properties`` > ``OPTION_*`` env > defaults.
Server level: ``SERVING_*`` env > server properties > defaults. Every bad key or value raises
``ConfigError`` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmi_core import custom_code
from lmi_core.djl_options import DjlOptions, djl_options
from lmi_core.errors import ConfigError
from lmi_core.option_values import (
    LoraSettings,
    allowed_media_domains,
    default_chat_template_kwargs,
    image_limit,
    lora_settings,
)
from lmi_core.pooling import PoolingSettings, pooling_settings

PROPERTIES_FILE = "serving.properties"

logger = logging.getLogger(__name__)


def parse_properties(text: str) -> dict[str, str]:
    """Parse Java properties syntax: ``key=value`` or ``key: value`` lines, ``#``/``!`` comments."""
    result: dict[str, str] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line[0] in "#!":
            continue
        while line.endswith("\\") and i < len(lines):  # continuation line
            line = line[:-1] + lines[i].strip()
            i += 1
        match = re.match(r"([^=:\s]+)\s*[=:\s]\s*(.*)$", line)
        if match is None:
            raise ConfigError(line, "", "a 'key=value' line")
        result[match.group(1)] = match.group(2).strip()
    return result


def _env_option_key(name: str) -> str:
    """``OPTION_<NAME>`` -> property key, with DJL's special cases."""
    rest = name[len("OPTION_") :]
    if re.fullmatch(r"[A-Z_\d]+", rest):
        rest = rest.lower()
    if rest == "engine":
        return "engine"
    if rest.lower() == "entrypoint":
        return "option.entryPoint"
    return f"option.{rest}"


def env_model_properties(environ: Mapping[str, str]) -> dict[str, str]:
    """Model properties given through ``OPTION_*`` environment variables (empty values ignored)."""
    return {_env_option_key(k): v for k, v in environ.items() if k.startswith("OPTION_") and v != ""}


def env_server_properties(environ: Mapping[str, str]) -> dict[str, str]:
    """Server properties given through ``SERVING_*`` environment variables."""
    return {
        k[len("SERVING_") :].lower(): v for k, v in environ.items() if k.startswith("SERVING_") and v != ""
    }


# -- models ------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


_SIZE_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "ki": 1024, "mi": 1024**2, "gi": 1024**3}


@dataclass(frozen=True)
class MemoryBudget:
    """How much of each device the loaded models may hold: a fraction of its memory (a GPU's as NVML
    reports it, the host's RAM on CPU), or bytes."""

    fraction: float | None = None
    size: int | None = None

    def of(self, total: int) -> int:
        """The budget of a device with ``total`` bytes."""
        return self.size if self.size is not None else int(total * (self.fraction or 1.0))


def parse_memory_budget(value: str | int | float) -> MemoryBudget:
    """``SERVING_MEMORY_BUDGET``: a fraction in (0, 1] (``0.9``) or a size (``24GiB``, ``500MB``, bytes)."""
    text = str(value).strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKmMgG]i?)?[bB]?", text)
    if match is None:
        raise ValueError("a fraction of each device's memory (0.9) or a size (24GiB, 500MB)")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    if not unit and number <= 1:  # a bare number up to 1 is a fraction; above, bytes
        if number <= 0:
            raise ValueError("a fraction must be in (0, 1]")
        return MemoryBudget(fraction=number)
    if not unit and not number.is_integer():
        raise ValueError("a fraction in (0, 1] or a whole number of bytes")
    return MemoryBudget(size=int(number * _SIZE_UNITS[unit]))


class ServerConfig(_Strict):
    """Server-wide settings (``SERVING_*`` env, ``--host``/``--port``)."""

    inference_address: str = "http://127.0.0.1:8080"
    management_address: str | None = None
    job_queue_size: int = Field(1000, ge=1)
    max_request_size: int = Field(64 * 1024 * 1024, ge=1)
    retry_threshold: int = Field(5, ge=0)
    health_check_interval: float = Field(2.0, gt=0)
    health_check_timeout: float = Field(10.0, gt=0)
    drain_timeout: float = Field(30.0, ge=0)
    # Seconds a connection has to send a complete request head, from when it opens (and from the first
    # byte of each later one), else it is closed: an idle or slowloris client holds no descriptor.
    request_head_timeout: float = Field(10.0, gt=0)
    # Open HTTP connections per listener; one more is refused (503, closed) at once. Lowered at start
    # to what the file-descriptor limit leaves room for (http.connections.connection_bound).
    max_connections: int = Field(4096, ge=1)
    api_key: str | None = None
    # A listener serving only /metrics, with no API key (the endpoint picker sends none); None: no such.
    metrics_port: int | None = Field(None, ge=1, le=65535)
    # One listener per worker, at most 8 (an InferencePool's targetPorts): the i-th port's requests
    # go to each model's i-th worker, and its /metrics shows that worker alone (docs/deploy.md).
    worker_ports: tuple[int, ...] = ()
    # Comma-separated origins browsers may call from ("*": any); empty: CORS off.
    cors_allowed_origins: str = ""
    runtime_dir: str | None = None
    log_level: str = "info"
    # Tenants: their API keys, budgets, weights and priorities (docs/tenants.md), YAML or JSON; reread
    # on SIGHUP or when it changes. None: one tenant, no budget.
    tenants_file: str | None = None
    # With no API key needed: the tenant is the one x-llm-d-inference-fairness-id names (set by a
    # gateway the clients cannot bypass).
    trust_tenant_header: bool = False
    # Accepted for DJL compatibility; they only name the models directory and the models to load.
    model_store: str | None = None
    load_models: str | None = None
    # Residency (docs/management.md): whether a model loads at registration unless its
    # option.load_on_startup says otherwise, and the budget that loading evicts idle models to keep.
    load_on_startup: bool = True
    max_loaded_models: int | None = Field(None, ge=1)
    memory_budget: MemoryBudget | None = None

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> Any:
        return parse_memory_budget(value) if isinstance(value, str | int | float) else value

    @field_validator("worker_ports", mode="before")
    @classmethod
    def _ports(cls, value: Any) -> Any:
        """``8001,8002`` (the environment's and the command line's form) -> (8001, 8002): 1 to 8
        distinct ports, as many as an InferencePool's ``targetPorts`` may list."""
        if isinstance(value, str):
            try:
                value = tuple(int(p) for p in value.split(",") if p.strip())
            except ValueError:
                raise ValueError("comma-separated port numbers") from None
        ports = tuple(value)
        if len(ports) > 8 or len(set(ports)) != len(ports) or not all(1 <= p <= 65535 for p in ports):
            raise ValueError("at most 8 distinct port numbers (1-65535)")
        return ports


TpDegree = int | Literal["max"]


class ModelConfig(_Strict):
    """One model: its ``serving.properties`` keys mapped to typed fields."""

    name: str = "lmi"
    model_dir: str | None = None
    model_id: str
    engine: Literal["Python", "MPI"] = "Python"
    mpi_mode: bool | None = None
    backend_name: str | None = Field(None, alias="backend")
    rolling_batch: str | None = None
    tensor_parallel_degree: TpDegree = 1
    pipeline_parallel_degree: int = Field(1, ge=1)
    min_workers: int | None = Field(None, ge=0)
    max_workers: int | None = Field(None, ge=1)
    job_queue_size: int | None = Field(None, ge=1)
    max_rolling_batch_size: int = Field(32, ge=1)
    model_loading_timeout: float = Field(240.0, gt=0)
    predict_timeout: float = Field(120.0, gt=0)
    # Waiting for a worker (503 + Retry-After past it); None: only predict_timeout bounds the wait.
    queue_timeout: float | None = Field(None, gt=0)
    # A running request with no token for this long means a wedged engine: its worker restarts.
    stall_timeout: float | None = Field(None, gt=0)
    # Times a request moves to another worker when its worker dies or stalls mid-request (0: never).
    max_migrations: int = Field(3, ge=0)
    # How long a moved request waits for a worker that is up (ready, or restarted with every rank
    # connected, loading); then it ends with its worker's error. None: SERVING_HEALTH_CHECK_TIMEOUT + 5 s.
    migration_timeout: float | None = Field(None, gt=0)
    max_idle_time: float = Field(60.0, gt=0)
    # Residency: None follows the server's load_on_startup (False: registered, loaded by its first
    # request); unloaded after this many idle seconds (None: never); a pinned model is never evicted.
    load_on_startup: bool | None = None
    idle_timeout: float | None = Field(None, gt=0)
    pinned: bool = False
    retry_threshold: int | None = Field(None, ge=0)
    dtype: str | None = None
    trust_remote_code: bool = False
    # Unknown request fields: a 400 naming them (OpenAI) instead of ignored and listed (vLLM).
    strict_request_fields: bool = False
    python_executable: str | None = None
    load_on_devices: str = "*"
    # MPI multi-node: hosts for ranks (Open MPI --host syntax) or a hostfile.
    mpi_hosts: str | None = None
    mpi_hostfile: str | None = None
    # Dispatch across a model's workers (docs/routing.md).
    routing: Literal["least_loaded", "prefix_aware"] = "prefix_aware"
    routing_block_chars: int = Field(64, ge=1)
    routing_cache_blocks: int = Field(16384, ge=1)
    routing_load_weight: float = Field(1.0, ge=0)
    routing_kv_weight: float = Field(0.5, ge=0)
    routing_imbalance_abs: int = Field(8, ge=0)
    routing_imbalance_rel: float = Field(1.5, ge=1)
    # The Responses API's store (docs/api.md): "off" is stateless; "memory" keeps up to
    # responses_store_size responses (least recently used dropped first) for responses_store_ttl seconds.
    responses_store: Literal["off", "memory"] = "off"
    responses_store_ttl: float = Field(3600.0, gt=0)
    responses_store_size: int = Field(1000, ge=1)
    # /metrics also exports the endpoint picker's series under vLLM's names (docs/deploy.md).
    gie_metrics: bool = False
    # Backend keys the core does not know: validated by the backend plugin (validate_config hook).
    options: dict[str, str] = Field(default_factory=dict)
    # The custom code file (DJL's model.py, or option.entryPoint), absolute; None: the model has none.
    entry_point: str | None = None
    # Filled by ``resolve`` from the plugins.
    backend: str = ""
    mode: Literal["python", "mpi"] = "python"

    @property
    def lora(self) -> LoraSettings:
        """The ``option.*lora*`` settings (validated by ``build_model_config``)."""
        return lora_settings(self.options)

    def loads_on_startup(self, server: ServerConfig) -> bool:
        """Whether registering this model loads it (else its first request does)."""
        return server.load_on_startup if self.load_on_startup is None else self.load_on_startup

    @property
    def pooling(self) -> PoolingSettings:
        """``option.task``, ``option.pooling``, ``option.normalize`` (validated by ``build_model_config``)."""
        return pooling_settings(self.options)

    @property
    def djl(self) -> DjlOptions:
        """DJL's output format, TGI, session and handler options (validated by ``build_model_config``)."""
        return djl_options(self.options)

    @property
    def world_size(self) -> int:
        """Ranks per worker: tensor x pipeline parallel degree (``max`` resolved to devices)."""
        tp = self.tensor_parallel_degree
        return (tp if isinstance(tp, int) else 1) * self.pipeline_parallel_degree


# serving.properties key -> ModelConfig field.
MODEL_KEYS: dict[str, str] = {
    "engine": "engine",
    "option.model_id": "model_id",
    "option.mpi_mode": "mpi_mode",
    "option.backend": "backend_name",
    "option.rolling_batch": "rolling_batch",
    "option.tensor_parallel_degree": "tensor_parallel_degree",
    "option.pipeline_parallel_degree": "pipeline_parallel_degree",
    "minWorkers": "min_workers",
    "maxWorkers": "max_workers",
    "gpu.minWorkers": "min_workers",
    "gpu.maxWorkers": "max_workers",
    "cpu.minWorkers": "min_workers",
    "cpu.maxWorkers": "max_workers",
    "job_queue_size": "job_queue_size",
    "option.max_rolling_batch_size": "max_rolling_batch_size",
    "option.model_loading_timeout": "model_loading_timeout",
    "option.predict_timeout": "predict_timeout",
    "option.queue_timeout": "queue_timeout",
    "option.stall_timeout": "stall_timeout",
    "option.max_migrations": "max_migrations",
    "option.migration_timeout": "migration_timeout",
    "max_idle_time": "max_idle_time",
    "option.load_on_startup": "load_on_startup",
    "option.idle_timeout": "idle_timeout",
    "option.pinned": "pinned",
    "retry_threshold": "retry_threshold",
    "option.dtype": "dtype",
    "option.trust_remote_code": "trust_remote_code",
    "option.pythonExecutable": "python_executable",
    "load_on_devices": "load_on_devices",
    "option.mpi_hosts": "mpi_hosts",
    "option.mpi_hostfile": "mpi_hostfile",
    "option.served_model_name": "name",
    "option.strict_request_fields": "strict_request_fields",
    # Routing across a model's workers (docs/routing.md).
    "option.routing": "routing",
    "option.routing_block_chars": "routing_block_chars",
    "option.routing_cache_blocks": "routing_cache_blocks",
    "option.routing_load_weight": "routing_load_weight",
    "option.routing_kv_weight": "routing_kv_weight",
    "option.routing_imbalance_abs": "routing_imbalance_abs",
    "option.routing_imbalance_rel": "routing_imbalance_rel",
    "option.gie_metrics": "gie_metrics",
    "option.responses_store": "responses_store",
    "option.responses_store_ttl": "responses_store_ttl",
    "option.responses_store_size": "responses_store_size",
}
# Keys DJL users commonly set that lmi-core accepts without effect, each with the reason (logged).
IGNORED_MODEL_KEYS = {
    "option.async_mode": "every backend runs requests concurrently (DJL's async mode is the only mode)",
    "batch_size": "requests join the engine's continuous batch; there is no dynamic batching",
    "max_batch_delay": "requests join the engine's continuous batch; there is no dynamic batching",
    "option.revision": "the model is read from option.model_id as it is",
}


def _field_error(exc: ValidationError, key_of: Mapping[str, str], raw: Mapping[str, Any]) -> ConfigError:
    err = exc.errors()[0]
    field = str(err["loc"][0]) if err["loc"] else ""
    key = key_of.get(field, field)
    return ConfigError(key, raw.get(key, err.get("input")), err["msg"].lower())


def build_model_config(
    properties: Mapping[str, str],
    *,
    model_dir: str | None = None,
    name: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ModelConfig:
    """Merge ``properties`` (the file) with ``OPTION_*`` env (file wins) into a ``ModelConfig``."""
    environ = os.environ if environ is None else environ
    merged = {**env_model_properties(environ), **properties}
    if environ.get("TENSOR_PARALLEL_DEGREE") and "option.tensor_parallel_degree" not in merged:
        merged["option.tensor_parallel_degree"] = environ["TENSOR_PARALLEL_DEGREE"]
    values: dict[str, Any] = {}
    options: dict[str, str] = {}
    for key, value in merged.items():
        if key in MODEL_KEYS:
            values[MODEL_KEYS[key]] = value
        elif key in IGNORED_MODEL_KEYS:
            logger.warning("%s=%s has no effect in lmi-core: %s", key, value, IGNORED_MODEL_KEYS[key])
        elif key.startswith("option."):
            options[key[len("option.") :]] = value
        else:
            allowed = ", ".join(sorted(k for k in MODEL_KEYS if not k.startswith("option.")))
            raise ConfigError(key, value, f"a known key ({allowed}, or option.*)")
    if values.get("engine") not in (None, "Python", "MPI"):
        raise ConfigError("engine", values["engine"], "Python or MPI")
    if "model_id" not in values:
        if model_dir is None:
            raise ConfigError("option.model_id", None, "a model id or path (or a model directory)")
        values["model_id"] = model_dir
    tp = values.get("tensor_parallel_degree")
    if isinstance(tp, str) and tp != "max":
        if not tp.isdigit() or int(tp) < 1:
            raise ConfigError("option.tensor_parallel_degree", tp, "a positive integer or 'max'")
        values["tensor_parallel_degree"] = int(tp)
    if name:
        values.setdefault("name", name)
    values["model_dir"] = model_dir
    values["options"] = options
    djl = djl_options(options)  # a bad DJL option fails the start, not the first request
    named = options.get("entryPoint") or environ.get("DJL_ENTRY_POINT")
    entry = values["entry_point"] = custom_code.entry_point_file(model_dir, named)
    # DJL: the entry point's handler function, where it has one, is the model (its Python engine).
    if (
        entry is not None
        and named not in custom_code.DJL_HANDLERS
        and custom_code.defines(entry, djl.handler)
    ):
        backend = values.setdefault("backend_name", "handler")
        if backend != "handler":
            allowed = f"handler: {entry} defines {djl.handler}(), which serves the model"
            raise ConfigError("option.backend", backend, allowed)
    # Name the key the user actually wrote (several keys map to one field: maxWorkers, gpu.maxWorkers).
    key_of = {MODEL_KEYS[k]: k for k in merged if k in MODEL_KEYS}
    try:
        config = ModelConfig.model_validate(values)
    except ValidationError as exc:
        raise _field_error(exc, key_of, merged) from None
    low, high = config.min_workers, config.max_workers
    if low is not None and high is not None and low > high:
        raise ConfigError("minWorkers", low, f"at most maxWorkers ({high})")
    lora_settings(options)  # bad LoRA settings fail the start, not the first adapter request
    default_chat_template_kwargs(options)  # bad JSON fails the start, not every chat request
    pooling_settings(options)  # and so does a bad task
    image_limit(options)  # and image limits or media hosts that do not parse
    allowed_media_domains(options)
    return config


def load_model_config(
    model_dir: str | os.PathLike[str] | None,
    *,
    model_id: str | None = None,
    name: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ModelConfig:
    """Read ``<model_dir>/serving.properties`` (if any) and build the model's config."""
    properties: dict[str, str] = {}
    directory = None
    if model_dir is not None:
        path = Path(model_dir)
        if not path.is_dir():
            raise ConfigError("model_dir", str(model_dir), "an existing directory")
        directory = str(path.resolve())
        props_file = path / PROPERTIES_FILE
        if props_file.is_file():
            properties = parse_properties(props_file.read_text())
    if model_id is not None:
        properties.setdefault("option.model_id", model_id)
    if name is None and directory is not None:
        name = Path(directory).name
    if name is not None:
        name = re.sub(r"\W", "_", name)
    return build_model_config(properties, model_dir=directory, name=name, environ=environ)


def model_directories(path: str | os.PathLike[str]) -> list[str]:
    """The model directories ``--model-dir`` names: ``path`` itself when it holds a model (a
    ``serving.properties`` or a ``config.json``), else each subdirectory that does, by name (DJL's
    model store: one ``lmi serve`` for a chat model, an embedding model and a reranker)."""
    root = Path(path)
    if not root.is_dir() or (root / PROPERTIES_FILE).is_file() or (root / "config.json").is_file():
        return [str(root)]
    found = [
        str(child)
        for child in sorted(root.iterdir())
        if child.is_dir() and ((child / PROPERTIES_FILE).is_file() or (child / "config.json").is_file())
    ]
    return found or [str(root)]


def build_server_config(
    properties: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> ServerConfig:
    """Server settings: defaults < ``properties`` < ``SERVING_*`` env < explicit overrides."""
    environ = os.environ if environ is None else environ
    known = set(ServerConfig.model_fields)
    from_env = env_server_properties(environ)
    for key in sorted(set(from_env) - known):
        # Other tools share the SERVING_ prefix (DJL's SERVING_FEATURES): warn, do not fail.
        logger.warning("ignoring unknown environment variable SERVING_%s", key.upper())
        del from_env[key]
    merged: dict[str, Any] = {**(properties or {}), **from_env}
    merged.update({k: v for k, v in overrides.items() if v is not None})
    for key, value in merged.items():
        if key not in known:
            raise ConfigError(key, value, f"a known key ({', '.join(sorted(known))})")
    try:
        return ServerConfig.model_validate(merged)
    except ValidationError as exc:
        key_of = {f: f"SERVING_{f.upper()}" for f in known}
        raw = {f"SERVING_{k.upper()}": v for k, v in merged.items()}
        raise _field_error(exc, key_of, raw) from None
