"""Tenants end to end, on real servers: a stub engine of fixed speed (``tests.stall_engine``'s
``slow`` prompt: a token every 50 ms) and the HF backend on the demo model.

Every assertion is an order or a count, never a time: the queue's state is read from
``lmi_tenant_queued`` before the request whose place is asserted is sent, and with one place per
worker the order requests end in is the order they were dispatched. The timed figures (B's TTFT
under a flood, token shares over a minute, CPU per token) are ``benchmarks/bench_tenants.py``'s.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmi_core.serving.tenants import key_digest
from tests.conftest import ServerProcess, link_model, wait_for

pytestmark = pytest.mark.slow

KEYS = {"a": "key-a", "b": "key-b", "c": "key-c"}
SLOW = {"inputs": "slow", "parameters": {"max_new_tokens": 10}}  # 0.5 s on the stub engine
# 10 s: while it runs, the requests whose order or refusal is asserted are sent (each send waits
# until /metrics shows it placed, a few scrapes on a busy machine).
LONG = {"inputs": "slow", "parameters": {"max_new_tokens": 200}}
ONE_WORKER = "minWorkers=1\nmaxWorkers=1\n"  # no scale-up: requests contend for one worker's places
AUTH = {"Authorization": f"Bearer {KEYS['a']}"}


def tenants_yaml(*names: str, a: str = "max_concurrency: 2") -> str:
    lines = ["tenants:"]
    for name in names:
        settings = f", {a}" if name == "a" else ""
        lines.append(f'  {name}: {{api_keys: ["{key_digest(KEYS[name])}"]{settings}}}')
    return "\n".join(lines) + "\n"


def serve(tmp_path: Path, source: Path | None, properties: str, tenants: str) -> ServerProcess:
    (tmp_path / "tenants.yaml").write_text(tenants)
    if source is None:  # the stub engine needs no weights
        directory = tmp_path / "stub"
        directory.mkdir()
        (directory / "serving.properties").write_text(properties)
    else:
        directory = link_model(source, tmp_path / "demo", properties)
    env = {
        **os.environ,
        "LMI_EXTRA_PLUGINS": "tests.stall_engine",
        "SERVING_TENANTS_FILE": str(tmp_path / "tenants.yaml"),
    }
    server = ServerProcess(["--model-dir", str(directory)], env, tmp_path / "server.log")
    server.wait_ready()
    return server


def post(server: ServerProcess, tenant: str, body: dict[str, Any]) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"}
    return httpx.post(f"{server.url}/invocations", json=body, headers=headers, timeout=120)


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    """The sum of ``name``'s series that have ``labels``."""
    text = httpx.get(
        f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEYS['a']}"}, timeout=10
    ).text
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1).split(",") for k, v in labels.items()):
            total += float(match.group(2))
    return total


class Ends:
    """Requests sent in threads; ``order`` lists their names as their responses complete."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.order: list[str] = []
        self.responses: dict[str, httpx.Response] = {}
        self.threads: list[threading.Thread] = []

    def send(self, name: str, tenant: str, body: dict[str, Any]) -> None:
        """Send, and wait until it runs (the first) or waits in the queue (the next ones)."""
        dispatched = metric(self.server, "lmi_request_queue_time_seconds_count")
        waiting = metric(self.server, "lmi_tenant_queued")

        def run() -> None:
            response = post(self.server, tenant, body)
            self.responses[name] = response
            self.order.append(name)

        thread = threading.Thread(target=run)
        thread.start()
        self.threads.append(thread)

        def placed() -> bool:
            return (
                metric(self.server, "lmi_request_queue_time_seconds_count") > dispatched
                or metric(self.server, "lmi_tenant_queued") > waiting
            )

        wait_for(placed, what=f"{name} in")

    def join(self) -> None:
        for thread in self.threads:
            thread.join(600)


def test_stub_a_flooding_tenant_is_refused_past_max_concurrency_and_the_other_is_served_first(
    tmp_path: Path,
) -> None:
    properties = f"option.backend=stall\noption.max_rolling_batch_size=1\n{ONE_WORKER}"
    server = serve(tmp_path, None, properties, tenants_yaml("a", "b", a="max_concurrency: 3"))
    try:
        ends = Ends(server)
        ends.send("a0", "a", LONG)  # runs
        ends.send("a1", "a", SLOW)  # waits
        ends.send("a2", "a", SLOW)
        refused = [post(server, "a", SLOW) for _ in range(3)]  # over max_concurrency: 429
        ends.send("b0", "b", SLOW)  # b is under no budget, and has been served nothing
        ends.join()
        assert [r.status_code for r in refused] == [429] * 3
        assert all(
            r.headers["retry-after"] == "1" and r.json()["param"] == "max_concurrency" for r in refused
        )
        assert {name: r.status_code for name, r in ends.responses.items()} == dict.fromkeys(ends.order, 200)
        assert ends.order == ["a0", "b0", "a1", "a2"]  # b0 did not wait behind a's backlog
        assert metric(server, "lmi_tenant_requests_total", tenant="a", outcome="rejected") == 3
        assert metric(server, "lmi_tenant_requests_total", tenant="b", outcome="rejected") == 0
        assert metric(server, "lmi_tenant_tokens_total", tenant="b", kind="generation") == 10
    finally:
        server.stop()


def test_stub_a_tenant_at_its_share_leaves_a_place_free_for_the_other_active_tenant(tmp_path: Path) -> None:
    properties = f"option.backend=stall\noption.max_rolling_batch_size=4\n{ONE_WORKER}"
    server = serve(tmp_path, None, properties, tenants_yaml("a", "b", a="weight: 1"))
    try:
        assert post(server, "b", SLOW).status_code == 200  # b is active from now on
        ends = Ends(server)
        for i in range(3):
            ends.send(f"a{i}", "a", LONG)  # 3 of the 4 places: over a's share of 2
        ends.send("a3", "a", SLOW)  # waits: the last place is kept while b is active
        assert metric(server, "lmi_tenant_queued", tenant="a") == 1
        ends.send("b1", "b", SLOW)  # takes the kept place at once, ahead of a's LONG requests
        ends.join()
        assert {name: r.status_code for name, r in ends.responses.items()} == dict.fromkeys(ends.order, 200)
        assert ends.order[0] == "b1"
        # a3 started only once one of a's LONG requests ended (they end in any order on a busy host).
        assert ends.order.index("a3") > min(ends.order.index(f"a{i}") for i in range(3))
    finally:
        server.stop()


def test_stub_a_tenants_file_reload_mid_traffic_loses_nothing(tmp_path: Path) -> None:
    properties = f"option.backend=stall\noption.max_rolling_batch_size=2\n{ONE_WORKER}"
    server = serve(tmp_path, None, properties, tenants_yaml("a", "b"))
    try:
        assert post(server, "c", SLOW).status_code == 401  # not a tenant yet
        ends = Ends(server)
        for i in range(4):  # 2 run, 2 wait
            ends.send(f"{'ab'[i % 2]}{i}", "ab"[i % 2], LONG if i < 2 else SLOW)
        (tmp_path / "tenants.yaml").write_text(tenants_yaml("a", "b", "c", a="weight: 3"))
        os.kill(server.proc.pid, signal.SIGHUP)
        wait_for(lambda: post(server, "c", SLOW).status_code == 200, what="tenant c after the reload")
        ends.join()
        assert sorted(ends.order) == ["a0", "a2", "b1", "b3"]
        for name, response in ends.responses.items():
            tokens = len(response.json()["generated_text"].split())
            assert response.status_code == 200 and tokens == (200 if name in ("a0", "b1") else 10)
        assert "reloaded" in server.log() and server.proc.poll() is None
    finally:
        server.stop()


@pytest.fixture
def hf(tmp_path: Path) -> Any:
    from lmi_core.demo_model import build_demo_model

    # A 4k context: the request holding the only place can run long enough for any host.
    model = build_demo_model(tmp_path / "long", max_position_embeddings=4096)
    properties = f"option.max_rolling_batch_size=1\n{ONE_WORKER}"
    server = serve(tmp_path, model, properties, tenants_yaml("a", "b", a="max_concurrency: 5"))
    yield server
    server.stop()


def test_hf_priorities_reorder_a_backlog_and_a_tenant_over_its_budget_alone_gets_429(
    hf: ServerProcess,
) -> None:
    def body(priority: int, tokens: int = 96) -> dict[str, Any]:
        return {
            "inputs": "Hello",
            "parameters": {"max_new_tokens": tokens, "ignore_eos_token": True, "priority": priority},
        }

    ends = Ends(hf)
    # The first holds the only place while the backlog queues behind it: 3,000 tokens take seconds
    # even on a fast host. The others run 96 each, so that a client thread's delay on a loaded host
    # cannot reorder their responses.
    ends.send("busy", "a", body(0, 3000))
    for name, priority in (("later", 5), ("default", 0), ("urgent", -1), ("sooner", 1)):
        ends.send(name, "a", body(priority))
    refused = post(hf, "a", body(0))  # its 6th in flight
    ends.join()
    assert refused.status_code == 429 and refused.json()["param"] == "max_concurrency"
    assert post(hf, "b", body(0)).status_code == 200
    assert all(r.status_code == 200 for r in ends.responses.values())
    assert ends.order == ["busy", "urgent", "default", "sooner", "later"]


def test_hf_embeddings_are_charged_to_their_tenants_token_budget(tmp_path: Path) -> None:
    from lmi_core.demo_encoder import build_demo_encoder

    encoder = build_demo_encoder(tmp_path / "encoder")
    properties = f"option.task=text-embedding\n{ONE_WORKER}"
    server = serve(tmp_path, encoder, properties, tenants_yaml("a", "b", a="tokens_per_minute: 20"))

    def embed(tenant: str, text: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEYS[tenant]}"}
        return httpx.post(f"{server.url}/v1/embeddings", json={"input": text}, headers=headers, timeout=60)

    try:
        first = embed("a", "hello world " * 5)  # charged its estimate, refunded to the tokens counted
        assert first.status_code == 200
        used = first.json()["usage"]["prompt_tokens"]
        assert used > 5  # what is left of 20 takes a refill of a minute's third to reach 20 again
        refused = embed("a", "word " * 40)  # estimated 41 tokens: the whole budget, not there
        assert refused.status_code == 429 and refused.json()["error"]["param"] == "tokens_per_minute"
        assert refused.headers["retry-after"]
        assert embed("b", "word " * 40).status_code == 200  # b has no budget
        assert metric(server, "lmi_tenant_tokens_total", tenant="a", kind="prompt") == used
        assert metric(server, "lmi_tenant_requests_total", tenant="a", outcome="served") == 1
        assert metric(server, "lmi_tenant_requests_total", tenant="a", outcome="rejected") == 1
    finally:
        server.stop()
