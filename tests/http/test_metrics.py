"""The scrape-time gauges (``EngineCollector``) rendered from a fake ``ModelService``'s snapshots."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from lmi_core.engine import EngineStats
from lmi_core.serving.pool import ModelStatus
from lmi_core.serving.registry import ModelState
from lmi_core.serving.supervisor import WorkerState
from tests.http.fakes import FakeModels, client, model, pool, worker


def scrape(models: FakeModels) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = client(models).get("/metrics").text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_engine_gauges_sum_the_workers_and_workers_are_counted_by_their_management_status() -> None:
    busy = EngineStats(running=2, waiting=1, finished_total=5, cancelled_total=1)
    snapshot = pool(
        "a",
        worker(0, stats=busy),
        worker(1, stats=EngineStats(running=1, finished_total=2)),
        worker(2, retiring=True),
        worker(3, WorkerState.STARTING),
        max_workers=4,
    )
    samples = scrape(FakeModels(model("a", snapshot)))

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, frozenset({"model": "a", **labels}.items())))

    assert value("lmi_requests_running") == 3
    assert value("lmi_requests_waiting") == 1
    assert value("lmi_engine_finished_requests_total") == 7
    assert value("lmi_engine_cancelled_requests_total") == 1
    assert value("lmi_workers", state="READY") == 2
    assert value("lmi_workers", state="UNLOADING") == 1  # as GET /models/a shows it
    assert value("lmi_workers", state="STARTING") == 1


def test_models_without_workers_have_no_gauges() -> None:
    models = FakeModels(
        model("w", state=ModelState.REGISTERED),
        model("f", state=ModelState.FAILED, error="bad"),
        model("p", pool("p", worker(0, WorkerState.STARTING), status=ModelStatus.PENDING)),
    )
    running = [dict(labels) for name, labels in scrape(models) if name == "lmi_requests_running"]
    assert [labels["model"] for labels in running] == ["p"]


def test_prefix_cache_counters_come_from_the_engines_typed_stats_per_worker() -> None:
    # A third-party engine's stats as the server receives them (through the heartbeat's codec);
    # worker 1's engine knows nothing of a prefix cache and has no sample, not a zero.
    reported = EngineStats(prefix_cache_hits=120, prefix_cache_queries=500, extra={"prefix_cache_hits": 7.0})
    snapshot = pool("a", worker(0, stats=EngineStats.from_wire(reported.to_wire())), worker(1))
    samples = scrape(FakeModels(model("a", snapshot)))

    def value(name: str, worker_id: str) -> float | None:
        return samples.get((name, frozenset({"model": "a", "worker": worker_id}.items())))

    assert value("lmi_prefix_cache_hits_total", "0") == 120  # the typed field, not extra's display value
    assert value("lmi_prefix_cache_queries_total", "0") == 500
    assert value("lmi_prefix_cache_queries_total", "1") is None
