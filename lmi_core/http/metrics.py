"""Prometheus metrics: one registry per app, served at ``GET /metrics``.

Request, latency and token metrics are counted in the server as each request runs, so they are
complete whatever the number of workers or ranks (a worker that dies loses none of them). The
engines' own gauges (running, waiting) and counters (finished, cancelled) are read at scrape time
from the last heartbeat of every worker's rank 0 and summed over the model's workers; ``lmi_workers``
counts workers by the status the management API shows (``UNLOADING`` while one retires). The LoRA
load and eviction totals are the engines' too, but kept monotonic across worker restarts and
retirements (``LoraTotals``). Residency: loads and unloads are counted as the server reports them
(``lmi_model_loads_total{tier}``, ``lmi_model_unloads_total{reason,tier}``, the load-seconds
histogram); each model's state and resident bytes are read at scrape time. Every metric but the
``lmi_tenant_*`` ones has a ``model`` label; it is always a registered model's name, never a
client-supplied string (so is ``adapter``: a registered adapter's name). The ``lmi_tenant_*``
metrics are labelled by tenant instead, summed over the models: a tenant the tenants file declares,
``default``, or ``other`` for every undeclared flow, so a client cannot grow the label set
(``serving.tenants``).
"""

from __future__ import annotations

import collections
import time
from collections.abc import AsyncGenerator, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmi_core.engine import Finished, GenerationEvent, GenerationRequest, Token
from lmi_core.errors import DeadlineError
from lmi_core.http.common import HttpMiddleware, on_response_start
from lmi_core.http.context import context_of
from lmi_core.http.gie_metrics import PickerCollector
from lmi_core.http.management import worker_status
from lmi_core.http.state import ModelService, ServedModel
from lmi_core.serving.observer import TenantOutcome, Tier, UnloadReason
from lmi_core.serving.pool import PoolSnapshot
from lmi_core.serving.routing import Reason, RequestContext

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, float("inf"))
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, float("inf"))
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, float("inf"))


class LoraTotals:
    """The engines' LoRA load/eviction counters made monotonic: a worker restart or retirement
    resets its engine's counts, so each engine life's last seen values are banked. Counts an engine
    made after the last scrape before it died are lost (at most one scrape interval's)."""

    def __init__(self) -> None:
        # (model, pool loaded_at, worker id) -> (restarts, loads, evictions) last seen.
        self._seen: dict[tuple[str, float, int], tuple[int, int, int]] = {}
        self._banked: dict[str, tuple[int, int]] = {}

    def update(self, model: str, pool: PoolSnapshot) -> tuple[int, int]:
        """The model's (loads, evictions) totals with ``pool``'s workers as they are now."""
        loads, evictions = self._banked.get(model, (0, 0))
        for worker in pool.workers:
            key = (model, pool.loaded_at, worker.worker_id)
            stats = worker.engine_stats
            previous = self._seen.get(key)
            if previous is not None and previous[0] != worker.restarts:  # a new engine life
                loads, evictions = loads + previous[1], evictions + previous[2]
                self._banked[model] = (loads, evictions)
            self._seen[key] = (worker.restarts, stats.lora_loads_total, stats.lora_evictions_total)
        live = {(model, pool.loaded_at, w.worker_id) for w in pool.workers}
        for key in [k for k in self._seen if k[0] == model and k not in live]:  # retired, or unloaded
            _, gone_loads, gone_evictions = self._seen.pop(key)
            loads, evictions = loads + gone_loads, evictions + gone_evictions
            self._banked[model] = (loads, evictions)
        current = [self._seen[k] for k in live]
        return loads + sum(c[1] for c in current), evictions + sum(c[2] for c in current)


class EngineCollector(Collector):
    """Scrape-time gauges from the models' snapshots and the engines' heartbeat counters."""

    def __init__(self, server: ModelService) -> None:
        self.server = server
        self.lora = LoraTotals()

    def collect(self) -> Iterator[Metric]:
        model = ["model"]
        running = GaugeMetricFamily("lmi_requests_running", "Requests being generated", labels=model)
        waiting = GaugeMetricFamily(
            "lmi_requests_waiting", "Requests queued for a worker or inside an engine", labels=model
        )
        finished = CounterMetricFamily(
            "lmi_engine_finished_requests",
            "Requests the engines completed (resets with a worker)",
            labels=model,
        )
        cancelled = CounterMetricFamily(
            "lmi_engine_cancelled_requests",
            "Requests the engines stopped because the client left or timed out (resets with a worker)",
            labels=model,
        )
        workers = GaugeMetricFamily("lmi_workers", "Workers by state", labels=[*model, "state"])
        lora_loads = CounterMetricFamily("lmi_lora_loads", "LoRA adapters the engines loaded", labels=model)
        lora_evictions = CounterMetricFamily(
            "lmi_lora_evictions", "LoRA adapters the engines evicted (least recently used)", labels=model
        )
        resident = GaugeMetricFamily(
            "lmi_model_resident_bytes",
            "Memory a loaded model's workers hold, measured after its load (GPU memory on GPU)",
            labels=model,
        )
        states = GaugeMetricFamily(
            "lmi_model_state", "1 for each model's residency state", labels=[*model, "state"]
        )
        for name in self.server.names():
            described = self.server.describe(name)
            residency = described.residency
            states.add_metric([name, residency.state.value], 1)
            if residency.resident_bytes is not None:
                resident.add_metric([name], residency.resident_bytes)
            snapshot = described.pool
            if snapshot is None:  # not loaded, or failed: no workers to count
                if residency.waiting:
                    waiting.add_metric([name], residency.waiting)
                continue
            stats = [w.engine_stats for w in snapshot.workers]
            running.add_metric([name], sum(s.running for s in stats))
            waiting.add_metric([name], residency.waiting + snapshot.queued + sum(s.waiting for s in stats))
            finished.add_metric([name], sum(s.finished_total for s in stats))
            cancelled.add_metric([name], sum(s.cancelled_total for s in stats))
            by_state = collections.Counter(worker_status(w) for w in snapshot.workers)
            for state, count in sorted(by_state.items()):
                workers.add_metric([name, state], count)
            if self.server.get(name).adapters is not None:
                loads, evictions = self.lora.update(name, snapshot)
                lora_loads.add_metric([name], loads)
                lora_evictions.add_metric([name], evictions)
        yield from (
            running,
            waiting,
            finished,
            cancelled,
            workers,
            lora_loads,
            lora_evictions,
            resident,
            states,
        )
        yield from prefix_cache_metrics(self.server)


def prefix_cache_metrics(server: ModelService) -> Iterator[Metric]:
    """The prefix-cache counters of the engines that report them (``EngineStats.prefix_cache_queries``
    and ``prefix_cache_hits``; vLLM does), per worker, in prompt tokens; they reset with a worker, like
    the engine counters above."""
    labels = ["model", "worker"]
    hits = CounterMetricFamily(
        "lmi_prefix_cache_hits", "Prompt tokens found in the prefix cache", labels=labels
    )
    queries = CounterMetricFamily(
        "lmi_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", labels=labels
    )
    for name in server.names():
        snapshot = server.describe(name).pool
        for worker in snapshot.workers if snapshot is not None else ():
            stats = worker.engine_stats
            if stats.prefix_cache_queries is not None:
                hits.add_metric([name, str(worker.worker_id)], stats.prefix_cache_hits or 0)
                queries.add_metric([name, str(worker.worker_id)], stats.prefix_cache_queries)
    yield from (hits, queries)


class Metrics:
    """The registry and every metric of one app; the pools' observer (``serving.observer.PoolObserver``).

    Built before the server (``ModelServer(observe=metrics)``); ``collect_from`` then adds the
    scrape-time gauges of the server's models."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, ["model", *labels], registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, doc, ["model"], buckets=buckets, registry=self.registry)

        self.requests = counter("lmi_http_requests", "HTTP requests by route and status", "route", "status")
        self.queue_seconds = histogram("lmi_request_queue_time_seconds", "Arrival until a worker took it")
        self.time_to_first_token = histogram("lmi_time_to_first_token_seconds", "Time to the first token")
        self.time_per_output_token = histogram(
            "lmi_time_per_output_token_seconds", "Mean time between output tokens", TOKEN_BUCKETS
        )
        self.e2e_latency = histogram("lmi_e2e_request_latency_seconds", "Time to the last token, per request")
        # A worker's loop that answers pings late is busy with work that belongs off it.
        self.heartbeat_seconds = histogram(
            "lmi_worker_heartbeat_seconds", "Round trip of a health-check ping to a rank", TOKEN_BUCKETS
        )
        self.prompt_tokens = counter("lmi_prompt_tokens", "Prompt tokens processed")
        self.generation_tokens = counter("lmi_generation_tokens", "Tokens generated, also when cancelled")
        self.finished = counter(
            "lmi_requests_finished",
            "Generations by outcome: length, eos_token, stop_sequence, error, cancelled",
            "finish_reason",
        )
        self.worker_restarts = counter("lmi_worker_restarts", "Workers restarted after a failure")
        self.migrations = counter(
            "lmi_request_migrations", "Requests moved to another worker mid-request (theirs died or stalled)"
        )
        self.deadlines = counter(
            "lmi_request_deadline_exceeded",
            "Requests ended by a deadline: predict (total), queue (waiting for a worker), stall (no token)",
            "deadline",
        )
        self.routing_decisions = counter(
            "lmi_routing_decisions",
            "Requests dispatched, by why that worker: prefix, session, port, adapter, load",
            "reason",
        )
        self.lora_requests = counter("lmi_lora_requests", "Generations by LoRA adapter", "adapter")
        self.tenant_requests = Counter(
            "lmi_tenant_requests",
            "Generations by tenant and outcome: served, rejected (429: over a budget), error, cancelled",
            ["tenant", "outcome"],
            registry=self.registry,
        )
        self.tenant_tokens = Counter(
            "lmi_tenant_tokens",
            "Tokens served by tenant: prompt, generation",
            ["tenant", "kind"],
            registry=self.registry,
        )
        self.tenant_waiting = Gauge(
            "lmi_tenant_queued",
            "Requests waiting for a worker, by tenant",
            ["tenant"],
            registry=self.registry,
        )
        # Residency: cold = workers started or stopped, warm = woken from or put to sleep.
        self.model_loads = counter("lmi_model_loads", "Model loads by tier (cold, warm)", "tier")
        self.model_unloads = counter(
            "lmi_model_unloads",
            "Model unloads by reason (idle, evicted, keep_alive, api) and tier",
            "reason",
            "tier",
        )
        self.model_load_seconds = Histogram(
            "lmi_model_load_seconds",
            "Time to load a model once it has room (the wait for room is in the queue time), by tier",
            ["model", "tier"],
            buckets=LOAD_BUCKETS,
            registry=self.registry,
        )

    def collect_from(self, server: ModelService) -> None:
        """Add the engines' and pools' scrape-time metrics of ``server``'s models, and the endpoint
        picker's series when a model asks for them (``option.gie_metrics``)."""
        self.registry.register(EngineCollector(server))
        self.registry.register(PickerCollector(server, only_when_asked=True))

    # -- PoolObserver --------------------------------------------------------------------------------

    def queue_time(self, model: str, seconds: float) -> None:
        self.queue_seconds.labels(model).observe(seconds)

    def worker_restart(self, model: str) -> None:
        self.worker_restarts.labels(model).inc()

    def migration(self, model: str) -> None:
        self.migrations.labels(model).inc()

    def heartbeat(self, model: str, seconds: float) -> None:
        self.heartbeat_seconds.labels(model).observe(seconds)

    def routed(self, model: str, reason: Reason) -> None:
        self.routing_decisions.labels(model, reason).inc()

    def tenant_queued(self, model: str, tenant: str, change: int) -> None:
        self.tenant_waiting.labels(tenant).inc(change)

    def tenant_finished(
        self, model: str, tenant: str, outcome: TenantOutcome, prompt_tokens: int, generated_tokens: int
    ) -> None:
        self.tenant_requests.labels(tenant, outcome).inc()
        if prompt_tokens:
            self.tenant_tokens.labels(tenant, "prompt").inc(prompt_tokens)
        if generated_tokens:
            self.tenant_tokens.labels(tenant, "generation").inc(generated_tokens)

    def model_load(self, model: str, tier: Tier, seconds: float) -> None:
        self.model_loads.labels(model, tier).inc()
        self.model_load_seconds.labels(model, tier).observe(seconds)

    def model_unload(self, model: str, reason: UnloadReason, tier: Tier) -> None:
        self.model_unloads.labels(model, reason, tier).inc()

    async def instrument(
        self, pool: ServedModel, request: GenerationRequest, context: RequestContext | None = None
    ) -> AsyncGenerator[GenerationEvent, None]:
        """Run ``request`` on ``pool``, timing and counting it (``AppState.instrument``), and telling
        a traced request's trace (``context.trace``) what it timed: one observer per generation, not a
        wrapper of its own per token."""
        model = pool.name
        trace = None
        if context is not None:  # the HTTP request's model label
            context.model = model
            trace = context.trace
            if trace is not None:  # the worker gets the trace's traceparent
                request = trace.generation(model, request)
        started = time.monotonic()
        first = last = 0.0
        outcome = "cancelled"  # unless it finishes or fails: the consumer stopped listening
        if request.adapter is not None:
            self.lora_requests.labels(model, request.adapter.name).inc()
        events = pool.generate(request, context)
        try:
            async for event in events:
                now = time.monotonic()
                if isinstance(event, Token):
                    if not first:
                        first = now
                        self.time_to_first_token.labels(model).observe(now - started)
                    last = now
                    self.generation_tokens.labels(model).inc()
                elif isinstance(event, Finished):
                    outcome = event.finish_reason
                    if trace is not None:
                        trace.finished(event, first or None)
                    self.prompt_tokens.labels(model).inc(event.prompt_tokens)
                    self.e2e_latency.labels(model).observe(now - started)
                    if event.generated_tokens > 1:
                        self.time_per_output_token.labels(model).observe(
                            (last - first) / (event.generated_tokens - 1)
                        )
                yield event
        except Exception as exc:
            outcome = "error"
            if isinstance(exc, DeadlineError):
                self.deadlines.labels(model, exc.deadline).inc()
            if trace is not None:
                trace.fail(exc)
            raise
        finally:
            await events.aclose()
            self.finished.labels(model, outcome).inc()

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class MetricsMiddleware(HttpMiddleware):
    """Count every HTTP request by model, route template (never the raw path) and status code."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = 500  # unless a response starts: an exception escaped the app

        def started(message: Message) -> None:
            nonlocal status
            status = message["status"]

        try:
            await self.app(scope, receive, on_response_start(send, started))
        finally:
            # The context is built inside (after the API key check): none for a refused request.
            context = context_of(scope)
            model = context.model if context is not None else ""
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(model, route, str(status)).inc()
