"""Who a request is for, and what that tenant may use: the tenants file, its API keys, each tenant's
budgets (requests in flight, tokens per minute) and its share of the dispatch (weight, priorities).

The file (``tenants_file``, YAML or JSON) names each tenant's API keys by their SHA-256 digest, so
that it holds no secret::

    tenants:
      team-a: {api_keys: ["sha256:<hex>"], weight: 2, priority: [0, 10], max_concurrency: 32,
               tokens_per_minute: 200000}

Invariants:

- every request has exactly one ``Tenant``: the one its API key names; the ``default`` tenant (the
  server's own ``api_key``, or no key where none is needed; a tenant the file calls ``default``
  configures it); with no key needed and ``trust_tenant_header``, the one
  ``x-llm-d-inference-fairness-id`` names (a name the file does not declare is a flow of its own
  with the default settings). Without a file there is one tenant, ``default``, with no budget;
- ``Tenant.admit`` refuses (``TenantBudgetError``, 429) only for that tenant's own budgets, and
  every admitted request is released exactly once (``Lease.release``), so ``in_flight`` counts the
  tenant's requests queued or running, across all models;
- ``tokens_per_minute`` is a token bucket of that size, refilled continuously: a request takes its
  prompt plus its ``max_new_tokens`` at admission (at most the bucket: a large request waits for a
  full bucket rather than never running) and gives back what it did not use when it ends;
- a reload (SIGHUP, or the file changed) swaps the settings of every tenant at once and keeps the
  state of those that remain (requests in flight, bucket level): nothing in flight is dropped. A bad
  file at start-up is a ``ConfigError`` naming its line; on a reload it is logged and the settings
  in force stay;
- metric labels are bounded: a declared tenant's name (the first ``MAX_LABELS`` of the file),
  ``default``, or ``other`` for every flow the file does not declare.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmi_core.config import ServerConfig
from lmi_core.engine import CHARS_PER_TOKEN, GenerationRequest
from lmi_core.errors import ConfigError, TenantBudgetError

logger = logging.getLogger(__name__)

DEFAULT = "default"
OTHER = "other"  # the metric label of every flow the file does not declare
FAIRNESS_HEADER = b"x-llm-d-inference-fairness-id"
KEY_PREFIX = "sha256:"
# vLLM's priority is a Python int; 32 bits keep it an int on every engine's side of the wire.
PRIORITY_RANGE = (-(2**31), 2**31 - 1)
MAX_LABELS = 1000  # declared tenants with a metric label of their own (llm-d's EPP caps flows at 1,000)
MAX_FLOWS = 10_000  # undeclared fairness-header flows remembered (least recently seen forgotten)
MAX_NAME = 128
RELOAD_CHECK = 1.0  # seconds between two looks at the file's identity (one stat)


@dataclass(frozen=True)
class TenantSpec:
    """One tenant's settings, as the file gives them (defaults: no budget, weight 1, any priority)."""

    name: str
    api_keys: tuple[str, ...] = ()  # "sha256:<hex digest>" of each key
    weight: float = 1.0
    priority: tuple[int, int] = PRIORITY_RANGE  # the priorities its requests may ask for
    max_concurrency: int | None = None
    tokens_per_minute: int | None = None

    def clamp(self, priority: int) -> int:
        low, high = self.priority
        return min(high, max(low, priority))


def key_digest(key: str) -> str:
    """How the file names ``key``: ``sha256:`` and the hex SHA-256 of its UTF-8 bytes."""
    return KEY_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def estimate_prompt_tokens(request: GenerationRequest) -> int:
    """The prompt's tokens as the server can tell before the worker tokenizes it: exact for token ids,
    else its characters / ``CHARS_PER_TOKEN``."""
    if request.prompt_ids is not None:
        return len(request.prompt_ids)
    chars = len(request.prompt or "")
    for message in request.messages or ():
        content = message.get("content")
        chars += len(content) if isinstance(content, str) else 0
    return chars // CHARS_PER_TOKEN + 1


class TokenBucket:
    """``per_minute`` tokens, refilled at ``per_minute / 60`` a second up to ``per_minute``. The
    level may go below 0 (a request used more than it was charged): later requests wait for it."""

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.level = self.capacity
        self._at = now

    @property
    def rate(self) -> float:
        return self.capacity / 60.0

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + max(0.0, now - self._at) * self.rate)
        self._at = now

    def take(self, amount: float, now: float) -> float | None:
        """Take ``amount`` if the bucket holds it (None); else the seconds until it will."""
        self._refill(now)
        if self.level >= amount:
            self.level -= amount
            return None
        return (amount - self.level) / self.rate

    def give(self, amount: float, now: float) -> None:
        """Put ``amount`` back (negative: take what was used beyond the charge)."""
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)

    def resize(self, per_minute: int, now: float) -> None:
        self._refill(now)
        self.capacity = float(per_minute)
        self.level = min(self.level, self.capacity)


class Tenant:
    """One tenant's live state: its settings (swapped by a reload) and the use of its budgets."""

    def __init__(self, spec: TenantSpec, label: str, now: float | None = None) -> None:
        self.spec = spec
        self.label = label  # its metric label (bounded: see the module's invariants)
        self.in_flight = 0  # admitted, not yet released: queued or running, on any model
        now = time.monotonic() if now is None else now
        self.bucket = TokenBucket(spec.tokens_per_minute, now) if spec.tokens_per_minute else None

    @property
    def name(self) -> str:
        return self.spec.name

    def update(self, spec: TenantSpec, now: float) -> None:
        """New settings; the requests in flight and the bucket's level carry over."""
        self.spec = spec
        if spec.tokens_per_minute is None:
            self.bucket = None
        elif self.bucket is None:
            self.bucket = TokenBucket(spec.tokens_per_minute, now)
        else:
            self.bucket.resize(spec.tokens_per_minute, now)

    def admit(self, prompt_tokens: int, max_new_tokens: int, now: float) -> Lease:
        """Count one more request in flight, charging ``prompt_tokens + max_new_tokens`` to the token
        budget; a ``TenantBudgetError`` (429) naming the budget when either is spent."""
        spec = self.spec
        if spec.max_concurrency is not None and self.in_flight >= spec.max_concurrency:
            raise TenantBudgetError(
                f"tenant {spec.name!r} is over its max_concurrency budget: "
                f"{self.in_flight} of {spec.max_concurrency} requests in flight",
                "max_concurrency",
                1,
            )
        charge = 0.0
        if self.bucket is not None:
            charge = min(float(prompt_tokens + max_new_tokens), self.bucket.capacity)
            wait = self.bucket.take(charge, now)
            if wait is not None:
                raise TenantBudgetError(
                    f"tenant {spec.name!r} is over its tokens_per_minute budget "
                    f"({spec.tokens_per_minute}): this request needs {charge:.0f} tokens, "
                    f"{max(0.0, self.bucket.level):.0f} are left",
                    "tokens_per_minute",
                    max(1, math.ceil(wait)),
                )
        self.in_flight += 1
        return Lease(self, charge)

    def _release(self, charge: float, used: int, now: float) -> None:
        self.in_flight -= 1
        if self.bucket is not None:
            self.bucket.give(charge - used, now)


class Lease:
    """One admitted request of a tenant; ``release`` it once with the tokens it used."""

    def __init__(self, tenant: Tenant, charge: float) -> None:
        self.tenant = tenant
        self.charge = charge
        self._open = True

    def release(self, used: int, now: float) -> None:
        """The request ended having used ``used`` tokens (prompt + output); a second call does nothing."""
        if self._open:
            self._open = False
            self.tenant._release(self.charge, used, now)


# -- the file --------------------------------------------------------------------------------------


def _digest(value: str) -> str:
    digest = value.lower()
    hexpart = digest.removeprefix(KEY_PREFIX)
    hexadecimal = len(hexpart) == 64 and all(c in "0123456789abcdef" for c in hexpart)
    if not digest.startswith(KEY_PREFIX) or not hexadecimal:
        raise ValueError("a key digest 'sha256:<64 hex digits>' (printf %s KEY | sha256sum)")
    return digest


def _name(value: str) -> str:
    if not value or len(value) > MAX_NAME or not value.isprintable():
        raise ValueError(f"a tenant name of 1 to {MAX_NAME} printable characters")
    if value == OTHER:
        raise ValueError(f"a name other than {OTHER!r} (the metric label of undeclared flows)")
    return value


class _TenantEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    api_keys: list[Annotated[str, AfterValidator(_digest)]] = Field(default_factory=list)
    weight: float = Field(1.0, gt=0, le=1e6)
    priority: list[int] | None = Field(None, min_length=2, max_length=2)
    max_concurrency: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)

    @field_validator("priority")
    @classmethod
    def _range(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            low, high = value
            if low > high or low < PRIORITY_RANGE[0] or high > PRIORITY_RANGE[1]:
                raise ValueError(f"[LOW, HIGH] with LOW <= HIGH, both 32-bit integers; got {value}")
        return value


class _TenantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    tenants: dict[Annotated[str, AfterValidator(_name)], _TenantEntry]


def _line(node: yaml.Node | None, path: Sequence[int | str]) -> int | None:
    """The 1-based line of the value at ``path`` (a pydantic error location; ``[key]``: the key
    before it) in the composed file, or of the deepest part of it that exists."""
    if node is None:
        return None
    key = node
    for part in path:
        if part == "[key]":
            return int(key.start_mark.line) + 1
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if str(k.value) == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            pair = (node.value[part], node.value[part])
        else:
            pair = None
        if pair is None:
            break
        key, node = pair
    return int(node.start_mark.line) + 1


def _duplicate_key(node: yaml.Node | None) -> tuple[str, int] | None:
    """The first mapping key that appears twice in its mapping (YAML would keep the last silently)."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if str(key.value) in seen:
                return str(key.value), int(key.start_mark.line) + 1
            seen.add(str(key.value))
            if (found := _duplicate_key(value)) is not None:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            if (found := _duplicate_key(item)) is not None:
                return found
    return None


def parse_tenants(text: str, source: str) -> list[TenantSpec]:
    """The tenants of a file's ``text`` (YAML, or JSON when it starts with ``{``); a ``ConfigError``
    naming ``source`` and the line at fault otherwise."""

    def error(line: int | None, field: str, value: object, allowed: str) -> ConfigError:
        where = f"{source}, line {line}" if line is not None else source
        return ConfigError(f"tenants_file {where}" + (f": {field}" if field else ""), value, allowed)

    is_json = text.lstrip().startswith("{")
    try:
        # JSON is parsed as JSON (YAML 1.1 reads 1e3 as a string); its layout, tabs made spaces, is
        # valid YAML flow style, which gives the lines.
        data: Any = json.loads(text) if is_json else yaml.safe_load(text)
        node = yaml.compose(text.replace("\t", " ") if is_json else text)
    except json.JSONDecodeError as exc:
        raise error(exc.lineno, "", exc.msg, "valid JSON") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise error(line, "", exc.problem or str(exc), "valid YAML") from None
    duplicate = _duplicate_key(node)
    if duplicate is not None:
        raise error(duplicate[1], duplicate[0], "twice", "each key once in its mapping")
    try:
        parsed = _TenantsFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "the file"
        problem = first["msg"].removeprefix("Value error, ")
        allowed = problem[:1].lower() + problem[1:]
        if first["type"] == "extra_forbidden":
            known = _TenantsFile.model_fields if len(first["loc"]) == 1 else _TenantEntry.model_fields
            allowed = f"a known key ({', '.join(known)})"
        elif not first["loc"]:
            allowed = "a mapping 'tenants: {NAME: {api_keys: [...], weight: ...}}'"
        raise error(_line(node, first["loc"]), field, first.get("input"), allowed) from None
    owners: dict[str, str] = {}
    specs = []
    for name, entry in parsed.tenants.items():
        for i, digest in enumerate(entry.api_keys):
            if digest in owners:
                line = _line(node, ("tenants", name, "api_keys", i))
                other = f"a key no other tenant has (tenant {owners[digest]} has it)"
                raise error(line, f"tenants.{name}.api_keys.{i}", digest, other)
            owners[digest] = name
        priority = PRIORITY_RANGE if entry.priority is None else (entry.priority[0], entry.priority[1])
        specs.append(
            TenantSpec(
                name,
                tuple(entry.api_keys),
                entry.weight,
                priority,
                entry.max_concurrency,
                entry.tokens_per_minute,
            )
        )
    return specs


def _identity(path: str) -> tuple[int, int, int] | None:
    """What changes when the file does (an edit, or a new file renamed over it); None: unreadable."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


# -- the registry ----------------------------------------------------------------------------------


class Tenants:
    """The tenants of one server: read from ``path`` (None: only ``default``), found by API key or
    fairness header, reloaded when the file changes or on ``reload``."""

    def __init__(self, path: str | None = None, trust_header: bool = False) -> None:
        self.path = path
        self.trust_header = trust_header
        self.default = Tenant(TenantSpec(DEFAULT), DEFAULT)
        self._declared: dict[str, Tenant] = {}
        self._keys: dict[str, Tenant] = {}
        self._flows: OrderedDict[str, Tenant] = OrderedDict()  # undeclared fairness-header flows
        self._identity: tuple[int, int, int] | None = None
        self._checked = time.monotonic()
        if path is not None:
            self._adopt(self._read(path), time.monotonic())

    @classmethod
    def from_config(cls, config: ServerConfig) -> Tenants:
        """The server's tenants (``tenants_file``, ``trust_tenant_header``): a bad file raises here."""
        return cls(config.tenants_file, config.trust_tenant_header)

    def identify(
        self, keys: Sequence[str], fairness_id: str | None, api_key: str | None = None
    ) -> Tenant | None:
        """The tenant of a request presenting API ``keys`` (the first that is valid counts) and
        fairness header ``fairness_id``, on a server whose own key is ``api_key``; None when a key is
        needed (the server has one, or some tenant has) and no key presented is one of them."""
        self.reload_if_changed()
        for key in keys:
            # Constant time against the server's key: no guessing it by timing. A tenant's key is
            # looked up by its digest, which tells nothing of the key.
            if api_key is not None and hmac.compare_digest(key.encode(), api_key.encode()):
                return self.default
            tenant = self._keys.get(key_digest(key))
            if tenant is not None:
                return tenant
        if api_key is not None or self._keys:
            return None
        if not self.trust_header or not fairness_id:
            return self.default
        return self._declared.get(fairness_id) or self._flow(fairness_id)

    def _flow(self, name: str) -> Tenant:
        """The undeclared fairness-header flow ``name``: default settings, a service of its own, the
        label ``other``."""
        tenant = self._flows.get(name)
        if tenant is None:
            tenant = self._flows[name] = Tenant(TenantSpec(name[:MAX_NAME]), OTHER)
            if len(self._flows) > MAX_FLOWS:
                self._flows.popitem(last=False)
        self._flows.move_to_end(name)
        return tenant

    def reload(self) -> bool:
        """Read the file again and adopt it; a bad file is logged and changes nothing (False)."""
        if self.path is None:
            return False
        try:
            specs = self._read(self.path)
        except (ConfigError, OSError) as exc:
            logger.error("tenants file not reloaded, the settings in force stay: %s", exc)
            return False
        self._adopt(specs, time.monotonic())
        logger.info("tenants file %s reloaded: %d tenant(s)", self.path, len(specs))
        return True

    def reload_if_changed(self, now: float | None = None) -> None:
        """Reload if the file changed since it was read (looked at once per ``RELOAD_CHECK`` seconds)."""
        if self.path is None:
            return
        now = time.monotonic() if now is None else now
        if now - self._checked < RELOAD_CHECK:
            return
        self._checked = now
        identity = _identity(self.path)
        if identity is not None and identity != self._identity:
            self._identity = identity  # a bad new version is reported once, not at every look
            self.reload()

    def _read(self, path: str) -> list[TenantSpec]:
        identity = _identity(path)
        try:
            with open(path, encoding="utf-8") as file:
                text = file.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("tenants_file", path, f"a readable UTF-8 file ({exc})") from None
        self._identity = identity
        return parse_tenants(text, path)

    def _adopt(self, specs: list[TenantSpec], now: float) -> None:
        """Make ``specs`` the tenants in force; tenants that stay keep their state."""
        declared: dict[str, Tenant] = {}
        for index, spec in enumerate(specs):
            tenant = self.default if spec.name == DEFAULT else self._declared.get(spec.name)
            if tenant is None:  # new, or a fairness-header flow until now
                tenant = self._flows.pop(spec.name, None) or Tenant(spec, spec.name, now)
            tenant.update(spec, now)
            tenant.label = spec.name if index < MAX_LABELS or spec.name == DEFAULT else OTHER
            declared[spec.name] = tenant
        if DEFAULT not in declared:
            self.default.update(TenantSpec(DEFAULT), now)
            declared[DEFAULT] = self.default
        self._declared = declared
        self._keys = {digest: tenant for tenant in declared.values() for digest in tenant.spec.api_keys}
