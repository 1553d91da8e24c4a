"""The endpoint picker's series (``http.gie_metrics``) from a fake ``ModelService``'s snapshots, read
by the picker's own rules (``tests/picker_rules.py``), and the listeners that serve them."""

from __future__ import annotations

import dataclasses
import time

import pytest
from starlette.testclient import TestClient

from lmi_core.config import ModelConfig
from lmi_core.engine import EngineStats
from lmi_core.http.gie_metrics import ModelLoad, picker_load
from lmi_core.http.listeners import MetricsListener, WorkerPortListener
from lmi_core.serving.supervisor import WorkerState
from tests import picker_rules
from tests.http.fakes import FakeModels, app, model, pool, worker

BUSY = EngineStats(running=3, waiting=1, kv_cache_usage=0.5, kv_cache_tokens=4096, kv_block_size=16)
IDLE = EngineStats(running=1, kv_cache_usage=0.25, kv_cache_tokens=4096, kv_block_size=16)


def models(gie: bool = True, lora: bool = False, queued: int = 2) -> FakeModels:
    snapshot = dataclasses.replace(
        pool("a", worker(0, stats=BUSY), worker(1, stats=dataclasses.replace(IDLE, adapters=["x"]))),
        queued=queued,
    )
    fakes = FakeModels(model("a", snapshot))
    options = {"enable_lora": "true", "max_loras": "3"} if lora else {}
    fakes.served_models["a"].config = ModelConfig(name="a", model_id="/m", gie_metrics=gie, options=options)
    return fakes


def test_the_picker_reads_one_pod_level_series_each() -> None:
    text = TestClient(app(models())).get("/metrics").text
    read = picker_rules.read(text)
    assert read.waiting_queue_size == 2 + 1  # the pool's queue, and what waits inside the engines
    assert read.running_requests_size == 4
    assert read.kv_cache_usage_percent == pytest.approx(0.375)  # the mean over the workers
    assert (read.cache_block_size, read.cache_num_blocks) == (16, 2 * 4096 // 16)
    assert read.active_models == {} and read.max_active_models == 0  # no LoRA: no info series
    for name in (picker_rules.QUEUED, picker_rules.RUNNING, picker_rules.KV_USAGE, picker_rules.CACHE):
        family = picker_rules.families(text)[name]
        assert family.type == "gauge" and len(family.samples) == 1  # the first-series rule reads the pod
        assert set(family.samples[0].labels) <= {"block_size", "num_gpu_blocks"}  # no model label


def test_the_lora_info_lists_the_adapters_held_and_its_value_is_when_it_was_set() -> None:
    before = time.time()
    text = TestClient(app(models(lora=True))).get("/metrics").text
    read = picker_rules.read(text)
    assert read.active_models == {"x": 0} and read.waiting_models == {}
    assert read.max_active_models == 2 * 3  # option.max_loras on each of 2 workers
    (sample,) = picker_rules.families(text)[picker_rules.LORA].samples
    assert before <= sample.value <= time.time()


def test_without_option_gie_metrics_the_main_scrape_has_no_vllm_series() -> None:
    text = TestClient(app(models(gie=False))).get("/metrics").text
    assert "vllm:" not in text and "lmi_requests_running" in text
    with pytest.raises(picker_rules.PickerError):
        picker_rules.read(text)


def test_a_worker_port_serves_its_own_workers_series_with_no_key() -> None:
    fakes = models(gie=False)  # a worker port exports them whatever the option says
    inner = app(fakes, api_key="secret")
    for slot, (running, kv) in enumerate([(3, 0.5), (1, 0.25), (0, 0.0)]):
        port = TestClient(WorkerPortListener(inner, fakes, slot), raise_server_exceptions=False)
        read = picker_rules.read(port.get("/metrics").text)
        assert (read.running_requests_size, read.kv_cache_usage_percent) == (running, kv)
        assert read.waiting_queue_size == 2 + (1 if slot == 0 else 0)  # the pool's queue is everyone's
        # Anything else is the app's, key and all, marked with the port's slot.
        assert port.get("/v1/models").status_code == 401
        ok = port.post(
            "/v1/completions",
            json={"model": "a", "prompt": "hi"},
            headers={"Authorization": "Bearer secret", "x-session-token": "s1"},
        )
        assert ok.status_code == 200
        context = fakes.served_models["a"].contexts[-1]
        assert context is not None and context.worker_slot == slot and context.session_id == "s1"


def test_the_metrics_listener_serves_only_metrics_and_needs_no_key() -> None:
    inner = app(models(), api_key="secret")
    assert TestClient(inner).get("/metrics").status_code == 401
    listener = TestClient(MetricsListener(inner.state.metrics.registry))
    scrape = listener.get("/metrics")
    assert scrape.status_code == 200 and "lmi_requests_running" in scrape.text
    assert picker_rules.read(scrape.text).running_requests_size == 4
    refused = listener.post("/v1/completions", json={"prompt": "hi"})
    assert refused.status_code == 404 and "metrics port" in refused.text


def test_failed_and_retiring_workers_are_skipped_when_ports_name_workers() -> None:
    snapshot = pool(
        "a",
        worker(0, WorkerState.FAILED, stats=BUSY),
        worker(1, retiring=True, stats=BUSY),
        worker(2, stats=IDLE),
        max_workers=3,
    )
    load = picker_load([ModelLoad(snapshot, None)], slot=0)
    assert (load.running, load.kv_cache_usage) == (1, 0.25)  # worker 2 is the first that serves
    assert picker_load([ModelLoad(snapshot, None)], slot=1).running == 0
    assert picker_load([ModelLoad(snapshot, None)]).running == 3 + 3 + 1  # the pod: every worker's load
