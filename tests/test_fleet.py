"""lmi-core in a fleet, end to end on a real ``lmi serve``: the endpoint picker's scrape under load, and
one request's trace across the server and its worker as an OTLP/HTTP collector receives it.

The picker is ``tests/picker_rules.py`` (its parsing rules in Python) polling the metrics port while
requests stream; the collector is an in-test HTTP server that decodes what OpenTelemetry's OTLP/HTTP
exporter posts (``opentelemetry-proto``), so every span is read as a real collector would read it.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import http.server
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from lmi_core.launch.launchers import free_ports
from tests import picker_rules
from tests.conftest import ServerProcess, link_model, wait_for
from tests.lora_adapters import build_adapter
from tests.test_migration import settled, stream_killing_its_worker

pytestmark = pytest.mark.slow

KEY = "fleet-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def properties(**extra: str) -> str:
    return "".join(f"{k}={v}\n" for k, v in extra.items())


def test_the_picker_reads_a_loaded_server_with_no_key_on_its_metrics_port(
    start_server: Callable[..., ServerProcess], long_demo_model: Path, demo_model: Path, tmp_path: Path
) -> None:
    model = link_model(
        long_demo_model,
        tmp_path / "model",
        properties(
            **{"option.gie_metrics": "true", "option.enable_lora": "true", "option.max_loras": "2"},
            **{"option.max_rolling_batch_size": "2", "minWorkers": "2", "maxWorkers": "2"},
        ),
    )
    metrics_port, worker_ports = free_ports(), [free_ports(), free_ports()]
    ports = ",".join(map(str, worker_ports))
    server = start_server(
        "--model-dir", str(model), "--model-name", "demo", "--api-key", KEY,
        "--metrics-port", str(metrics_port), "--worker-ports", ports,
    )  # fmt: skip

    def scrape(port: int = metrics_port) -> picker_rules.PickerMetrics:
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)  # no key: the picker has none
        assert response.status_code == 200
        read = picker_rules.read(response.text)
        assert 0.0 <= read.kv_cache_usage_percent <= 1.0
        return read

    assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 401  # the main port keeps its key
    assert (
        httpx.post(f"{server.url}/v1/completions", json={"model": "demo", "prompt": "x"}).status_code == 401
    )
    idle = scrape()
    assert (idle.running_requests_size, idle.waiting_queue_size, idle.max_active_models) == (0, 0, 4)
    assert idle.cache_block_size == 0  # HF has no paged cache: the picker keeps its own block size

    def generate(index: int) -> int:
        body = {"model": "demo", "prompt": f"request {index}", "max_tokens": 1500, "ignore_eos": True}
        port = worker_ports[index % 2]  # as the picker sends them: to a worker's port, with the key
        return httpx.post(
            f"http://127.0.0.1:{port}/v1/completions", json=body, headers=AUTH, timeout=300
        ).status_code

    # 8 long requests on 2 workers of 2 slots each: 4 run and 4 wait, and the picker sees both.
    def loaded() -> bool:
        # The pool's queue shows at once, the engines' running count and KV use with their next
        # heartbeat: a scrape in between sees requests waiting and none running yet.
        busy = scrape()
        return min(busy.waiting_queue_size, busy.running_requests_size, busy.kv_cache_usage_percent) > 0

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(generate, i) for i in range(8)]
        wait_for(loaded, 60, "requests waiting and running, and KV in use")
        per_worker = [scrape(port) for port in worker_ports]
        assert all(read.running_requests_size <= 2 for read in per_worker)  # each port shows its worker
        assert [f.result() for f in futures] == [200] * 8
    wait_for(lambda: scrape().running_requests_size == 0, 30, "the workers to drain")
    assert scrape().waiting_queue_size == 0

    build_adapter(demo_model, tmp_path / "sql", seed=1)
    registered = httpx.post(
        f"{server.url}/v1/load_lora_adapter",
        json={"lora_name": "sql", "lora_path": str(tmp_path / "sql")},
        headers=AUTH,
        timeout=60,
    )
    assert registered.status_code == 200, registered.text
    wait_for(lambda: "sql" in scrape().active_models, 5, "the LoRA info to list the adapter")


class Collector(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver: the spans of every ``POST /v1/traces``, with their resources."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, Any], Any]] = []  # (resource attributes, span)
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), CollectorHandler)

    def in_trace(self, trace_id: str) -> list[tuple[dict[str, Any], Any]]:
        with self.lock:
            return [(res, span) for res, span in self.spans if span.trace_id.hex() == trace_id]


class CollectorHandler(http.server.BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest.FromString(body)
        with self.server.lock:
            for resource_spans in request.resource_spans:
                resource = attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    self.server.spans.extend((resource, span) for span in scope_spans.spans)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def attributes(pairs: Any) -> dict[str, Any]:
    """OTLP key-values as a dict (the scalar kinds, and string arrays)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        kind = pair.value.WhichOneof("value")
        value = getattr(pair.value, kind)
        out[pair.key] = [v.string_value for v in value.values] if kind == "array_value" else value
    return out


def tracing_to(collector: Collector) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.server_address[1]}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: the spans reach the collector while the test waits
    }


@pytest.fixture
def collector() -> Iterator[Collector]:
    receiver = Collector()
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    yield receiver
    receiver.shutdown()
    receiver.server_close()


def test_one_streamed_chat_is_one_trace_across_the_server_and_its_worker(
    start_server: Callable[..., ServerProcess], demo_model: Path, collector: Collector
) -> None:
    server = start_server("--model-dir", str(demo_model), "--model-name", "demo", env=tracing_to(collector))
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 12,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usage: dict[str, int] = {}
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json=body,
        headers={"traceparent": TRACEPARENT},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[len("data: ") :]).get("usage") or usage
    assert usage["completion_tokens"] > 0

    def complete() -> bool:
        names = {span.name for _, span in collector.in_trace(TRACE_ID)}
        return {"chat demo", "lmi.queue", "lmi.route", "lmi.worker.generate"} <= names

    wait_for(complete, 30, "the request's spans at the collector")
    spans = collector.in_trace(TRACE_ID)
    assert len(spans) >= 4
    by_name = {span.name: (resource, span) for resource, span in spans}
    server_resource, root = by_name["chat demo"]
    assert root.parent_span_id.hex() == TRACEPARENT.split("-")[2]  # the client's span is its parent
    assert root.kind == root.SPAN_KIND_SERVER
    root_attributes = attributes(root.attributes)
    assert root_attributes["gen_ai.operation.name"] == "chat"
    assert root_attributes["gen_ai.request.model"] == "demo"
    assert root_attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert root_attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert root_attributes["gen_ai.response.finish_reasons"] == ["length"]
    assert (
        0
        < root_attributes["gen_ai.server.time_to_first_token"]
        <= root_attributes["gen_ai.server.request.duration"]
    )
    assert root_attributes["http.response.status_code"] == 200
    for name in ("lmi.queue", "lmi.route"):
        assert by_name[name][1].parent_span_id == root.span_id
    assert attributes(by_name["lmi.route"][1].attributes)["lmi.route.reason"] == "load"
    worker_resource, worker_span = by_name["lmi.worker.generate"]
    assert worker_span.parent_span_id == root.span_id  # its context came over the socket
    assert server_resource["process.pid"] == server.proc.pid
    assert worker_resource["process.pid"] in server.worker_pids()  # another process: the worker
    worker_attributes = attributes(worker_span.attributes)
    assert worker_attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert worker_attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    # Probes are not traced.
    assert httpx.get(f"{server.url}/ping", timeout=10).status_code == 200
    assert not any(span.name.endswith("/ping") for _, span in collector.in_trace(TRACE_ID))


def test_a_migrated_stream_has_a_migration_span_and_the_next_workers_span(
    start_server: Callable[..., ServerProcess], demo_model: Path, collector: Collector, tmp_path: Path
) -> None:
    model = link_model(demo_model, tmp_path / "demo", properties(minWorkers="2", maxWorkers="2"))
    server = start_server("--model-dir", str(model), "--model-name", "demo", env=tracing_to(collector))
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 300, "ignore_eos_token": True}, "stream": True}
    wait_for(lambda: settled(server, 2), 120, "both workers ready")
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    traced = {"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"}
    lines, _, victim = stream_killing_its_worker(server, "/invocations", body, after=5, headers=traced)
    assert len(lines) == 300 and "error" not in json.loads(lines[-1])  # the client saw no break

    def spans(name: str) -> list[Any]:
        return [span for _, span in collector.in_trace(trace_id) if span.name == name]

    wait_for(lambda: len(spans("lmi.worker.generate")) >= 1 and len(spans("lmi.migration")) == 1, 30, "spans")
    (migration,) = spans("lmi.migration")
    moved = attributes(migration.attributes)
    assert moved["lmi.migration.from_worker"] == victim and moved["lmi.migration.delivered_tokens"] >= 5
    assert moved["error.type"] and migration.status.code == migration.status.STATUS_CODE_UNSET
    routes = [attributes(span.attributes)["lmi.route.worker"] for span in spans("lmi.route")]
    assert len(routes) == 2 and victim in routes and len(set(routes)) == 2  # the first worker, then the other
    # The killed worker's span died with it; the next worker's says it resumed.
    (resumed,) = [s for s in spans("lmi.worker.generate") if any(e.name == "migrated" for e in s.events)]
    assert attributes(resumed.attributes)["gen_ai.usage.output_tokens"] > 0
