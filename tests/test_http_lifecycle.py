"""A request's life over HTTP: cancellation on disconnect, backpressure, timeouts, graceful shutdown,
request size, API key, separate management address and CORS, against real servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from lmi_core.launch.launchers import free_ports
from tests.conftest import ServerProcess, link_model, ping, wait_for
from tests.test_metrics import LONG, metric

pytestmark = pytest.mark.slow

MODEL = "demo"
SHORT = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
SHORT_STREAM = {**SHORT, "stream": True}
IMPATIENT = httpx.Timeout(60, read=1)  # a client that gives up after 1 s without an answer
HEALTH_ENV = {"SERVING_HEALTH_CHECK_INTERVAL": "0.3", "SERVING_HEALTH_CHECK_TIMEOUT": "3"}
MAX_REQUEST_SIZE = 4096
KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "https://ui.example"


def serve(model: Path, log: Path, **env: str) -> ServerProcess:
    args = ["--model-dir", str(model), "--model-name", MODEL]
    server = ServerProcess(args, {**os.environ, **HEALTH_ENV, **env}, log)
    server.wait_ready()
    return server


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, long_demo_model: Path) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("plain") / "server.log"
    server = serve(long_demo_model, log, SERVING_MAX_REQUEST_SIZE=str(MAX_REQUEST_SIZE))
    yield server
    server.stop()


@dataclass
class Guarded:
    server: ServerProcess
    management: str  # the management listener's base URL

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, long_demo_model: Path) -> Iterator[Guarded]:
    """API key, management on its own address, CORS for one origin, a 1 s predict_timeout."""
    management = f"http://127.0.0.1:{free_ports()}"
    env = {
        "SERVING_API_KEY": KEY,
        "SERVING_MANAGEMENT_ADDRESS": management,
        "SERVING_CORS_ALLOWED_ORIGINS": ORIGIN,
        "OPTION_PREDICT_TIMEOUT": "1",
    }
    server = serve(long_demo_model, tmp_path_factory.mktemp("guarded") / "server.log", **env)
    yield Guarded(server, management)
    server.stop()


# -- cancellation --------------------------------------------------------------------------------


def _disconnect_lmi(server: ServerProcess) -> None:
    with pytest.raises(httpx.ReadTimeout):  # the client gives up: httpx closes the connection
        httpx.post(f"{server.url}/invocations", json=LONG, timeout=IMPATIENT)


def _disconnect_lmi_stream(server: ServerProcess) -> None:
    with httpx.stream(
        "POST", f"{server.url}/invocations", json={**LONG, "stream": True}, timeout=60
    ) as response:
        lines = response.iter_lines()
        next(lines)  # it runs; leaving the block closes the connection mid-stream


def _client(server: ServerProcess, timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=timeout)


def _disconnect_openai(server: ServerProcess) -> None:
    with pytest.raises(openai.APITimeoutError):
        _client(server, timeout=1).completions.create(
            model=MODEL, prompt="Hi", max_tokens=8000, extra_body=IGNORE
        )


def _disconnect_openai_stream(server: ServerProcess) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    stream = _client(server).chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=8000,
        stream=True,
        extra_body=IGNORE,  # type: ignore[arg-type]
    )
    next(iter(stream))
    stream.close()


IGNORE = {"ignore_eos": True}


@pytest.mark.parametrize(
    "disconnect", [_disconnect_lmi, _disconnect_lmi_stream, _disconnect_openai, _disconnect_openai_stream]
)
def test_client_disconnect_cancels_the_request_in_the_engine(
    plain: ServerProcess, disconnect: Callable[[ServerProcess], None]
) -> None:
    def engine_cancelled() -> float:
        return metric(plain.url, "lmi_engine_cancelled_requests_total", model=MODEL)

    before = engine_cancelled()
    disconnect(plain)
    # The engine's own counter (heartbeat): it stopped generating this request. Uncancelled, the
    # request would run thousands of tokens more and finish as "length".
    wait_for(lambda: engine_cancelled() == before + 1, 30, "the engine to count the cancellation")
    wait_for(lambda: metric(plain.url, "lmi_requests_running", model=MODEL) == 0, 30, "no request running")
    assert metric(plain.url, "lmi_requests_finished_total", model=MODEL, finish_reason="length") == 0


# -- backpressure and timeouts -------------------------------------------------------------------


async def test_full_queue_is_a_503_and_accepted_requests_complete(
    start_server: Callable[..., ServerProcess], long_demo_model: Path, tmp_path: Path
) -> None:
    model = link_model(long_demo_model, tmp_path / MODEL, "maxWorkers=1\noption.max_rolling_batch_size=1\n")
    server = start_server("--model-dir", str(model), env={"SERVING_JOB_QUEUE_SIZE": "1"})

    async def waiting(count: int) -> None:
        def check() -> bool:
            return metric(server.url, "lmi_requests_waiting", model=MODEL) == count

        await asyncio.to_thread(wait_for, check, 30, f"{count} queued request(s)")

    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
        async with http.stream("POST", "/invocations", json={**LONG, "stream": True}) as running:
            lines = running.aiter_lines()
            await anext(lines)  # it holds the only slot
            # A queued streaming client that gives up before its first token leaves the queue.
            with pytest.raises(httpx.ReadTimeout):
                async with http.stream("POST", "/invocations", json=SHORT_STREAM, timeout=IMPATIENT):
                    pass
            await waiting(0)
            queued = asyncio.ensure_future(http.post("/invocations", json=SHORT))
            await waiting(1)
            refused = await http.post("/invocations", json=SHORT)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert "queue is full" in refused.json()["message"]
            openai_refused = await http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi"})
            assert openai_refused.status_code == 503 and openai_refused.headers["retry-after"] == "1"
            assert openai_refused.json()["error"]["type"] == "service_unavailable_error"
            assert not queued.done()
        # The running client leaves; the accepted, queued request gets the slot and completes.
        answer = await queued
        assert answer.status_code == 200 and answer.json()["generated_text"] is not None


def test_predict_timeout_ends_a_request_with_a_clear_error(guarded: Guarded) -> None:
    def engine_cancelled() -> float:
        return metric(guarded.management, "lmi_engine_cancelled_requests_total", AUTH, model=MODEL)

    before = engine_cancelled()
    response = httpx.post(f"{guarded.url}/invocations", json=LONG, headers=AUTH, timeout=30)
    assert response.status_code == 504
    assert "option.predict_timeout=1" in response.json()["message"]
    openai_response = httpx.post(
        f"{guarded.url}/v1/completions",
        json={"model": MODEL, "prompt": "Hi", "max_tokens": 8000, **IGNORE},
        headers=AUTH,
        timeout=30,
    )
    assert openai_response.status_code == 504
    assert openai_response.json()["error"]["type"] == "timeout_error"
    with httpx.stream(
        "POST", f"{guarded.url}/invocations", json={**LONG, "stream": True}, headers=AUTH, timeout=30
    ) as stream:
        last = json.loads([line for line in stream.iter_lines() if line][-1])
    assert last["details"]["finish_reason"] == "error" and last["error"]["code"] == 504
    # The engine stopped each of them too (the management listener serves /metrics).
    wait_for(lambda: engine_cancelled() == before + 3, 30, "the engine to cancel the timed-out requests")


# -- graceful shutdown ---------------------------------------------------------------------------


def test_sigterm_stops_accepting_and_lets_an_in_flight_stream_finish(
    start_server: Callable[..., ServerProcess], long_demo_model: Path
) -> None:
    # A drain timeout far above the stream's length, even on a loaded machine.
    server = start_server("--model-dir", str(long_demo_model), env={"SERVING_DRAIN_TIMEOUT": "240"})
    body = {"inputs": "Hi", "stream": True, "parameters": {"max_new_tokens": 1000, "ignore_eos_token": True}}
    with httpx.stream("POST", f"{server.url}/invocations", json=body, timeout=240) as response:
        lines = response.iter_lines()
        next(lines)  # the other 999 tokens take seconds: the request is in flight at the signal
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: ping(server) == -1, 30, "the listener to close")  # no new connection
        rest = [json.loads(line) for line in lines if line]
    assert len(rest) == 999 and len(rest[-1]["generated_text"]) > 0
    assert server.proc.wait(timeout=60) == 0
    log = server.log()
    assert "received SIGTERM" in log and "Waiting for connections to close" in log


# -- request size --------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True])
def test_body_over_max_request_size_is_a_413(plain: ServerProcess, chunked: bool) -> None:
    body = json.dumps({"inputs": "x" * MAX_REQUEST_SIZE}).encode()
    content = iter([body]) if chunked else body  # chunked: no content-length to refuse it by
    response = httpx.post(f"{plain.url}/invocations", content=content, timeout=10)
    assert response.status_code == 413 and "max_request_size" in response.json()["message"]
    body = json.dumps({"model": MODEL, "prompt": "x" * MAX_REQUEST_SIZE}).encode()
    response = httpx.post(
        f"{plain.url}/v1/completions", content=iter([body]) if chunked else body, timeout=10
    )
    assert response.status_code == 413 and "max_request_size" in response.json()["error"]["message"]


# -- API key, management address, CORS -----------------------------------------------------------


def test_api_key_guards_every_route_but_ping(guarded: Guarded) -> None:
    inference = [
        ("POST", "/invocations"),
        ("POST", f"/predictions/{MODEL}"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", "/openapi.json"),
    ]
    management = [("GET", "/metrics"), ("GET", "/models"), ("GET", f"/models/{MODEL}")]
    for base, routes in ((guarded.url, inference), (guarded.management, management)):
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                response = httpx.request(method, base + path, json=SHORT, headers=headers, timeout=10)
                assert response.status_code == 401, (path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
                body = response.json()
                message = body["error"]["message"] if path.startswith("/v1/") else body["message"]
                assert "API key" in message
        assert httpx.get(f"{base}/ping", timeout=10).status_code == 200
    assert httpx.post(f"{guarded.url}/invocations", json=SHORT, headers=AUTH, timeout=30).status_code == 200


def test_openai_client_sends_the_key(guarded: Guarded) -> None:
    client = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage is not None
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_management_routes_are_served_only_on_the_management_address(guarded: Guarded) -> None:
    def status(base: str, method: str, path: str) -> int:
        return httpx.request(method, base + path, json=SHORT, headers=AUTH, timeout=30).status_code

    assert status(guarded.management, "GET", "/metrics") == 200
    for path in ("/metrics", "/models", f"/models/{MODEL}"):
        assert status(guarded.url, "GET", path) == 404
    for method, path in (
        ("POST", "/invocations"),
        ("GET", "/v1/models"),
        ("POST", f"/models/{MODEL}/invoke"),
    ):
        assert status(guarded.management, method, path) == 404
        assert status(guarded.url, method, path) == 200


def test_cors_allows_only_the_configured_origin(guarded: Guarded, plain: ServerProcess) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(f"{guarded.url}/v1/completions", headers={"Origin": ORIGIN, **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    response = httpx.get(f"{guarded.url}/v1/models", headers={"Origin": ORIGIN, **AUTH})
    assert response.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(
        f"{guarded.url}/v1/completions", headers={"Origin": "https://evil.example", **preflight}
    )
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    # Off by default.
    default = httpx.get(f"{plain.url}/v1/models", headers={"Origin": ORIGIN})
    assert default.status_code == 200 and "access-control-allow-origin" not in default.headers
    assert (
        httpx.options(f"{plain.url}/v1/completions", headers={"Origin": ORIGIN, **preflight}).status_code
        == 405
    )


# -- connections that send no request ------------------------------------------------------------

HEAD_TIMEOUT = "1"
MAX_CONNECTIONS = 60


def closed(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (what it sent before, if anything, is read and dropped)."""
    sock.setblocking(False)
    try:
        while data := sock.recv(4096):
            del data
    except BlockingIOError:
        return False
    except ConnectionError:
        return True
    return True


def ping_over(sock: socket.socket) -> bytes:
    """The status line of ``GET /ping`` sent over an open socket."""
    sock.settimeout(30)
    sock.sendall(b"GET /ping HTTP/1.1\r\nhost: lmi\r\n\r\n")
    return sock.recv(4096).split(b"\r\n", 1)[0]


@pytest.fixture(scope="module")
def head_timeout(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("head") / "server.log"
    server = serve(demo_model, log, SERVING_REQUEST_HEAD_TIMEOUT=HEAD_TIMEOUT)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("bounded") / "server.log"
    server = serve(demo_model, log, SERVING_MAX_CONNECTIONS=str(MAX_CONNECTIONS))
    yield server
    server.stop()


def test_idle_and_slowloris_connections_are_closed_after_the_head_timeout(
    head_timeout: ServerProcess,
) -> None:
    """Before: 50 idle connections were all still open after 30 s (uvicorn arms no timer until a
    response), and so was one that trickles its head; each held a file descriptor for ever."""
    port = head_timeout.port
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    trickling = socket.create_connection(("127.0.0.1", port))
    kept_alive = socket.create_connection(("127.0.0.1", port))
    assert ping_over(kept_alive) == b"HTTP/1.1 200 OK"
    kept_alive.sendall(b"GET /ping HTTP/1.1\r\n")  # a second request whose head never ends

    def trickle() -> bool:  # a byte of a header that never ends, every 0.1 s while it is open
        with contextlib.suppress(OSError):
            trickling.send(b"GET /ping HTTP/1.1\r\nx-slow: a" if not trickled else b"a")
        trickled.append(1)
        return closed(trickling)

    trickled: list[int] = []
    wait_for(trickle, timeout=60, what="the slowloris connection to be closed")
    wait_for(lambda: all(closed(s) for s in [*idle, kept_alive]), timeout=60, what="idle connections closed")
    assert httpx.post(f"{head_timeout.url}/invocations", json=SHORT, timeout=60).status_code == 200
    for sock in [*idle, trickling, kept_alive]:
        sock.close()


def test_connections_over_the_bound_are_refused_at_once_while_requests_still_work(
    bounded: ServerProcess,
) -> None:
    held = [socket.create_connection(("127.0.0.1", bounded.port)) for _ in range(MAX_CONNECTIONS)]
    assert ping_over(held[0]) == b"HTTP/1.1 200 OK"  # a request on a held connection is served
    extra = socket.create_connection(("127.0.0.1", bounded.port))
    extra.settimeout(30)
    refused = extra.recv(4096)  # sent at once, before any request: never queued
    assert refused.startswith(b"HTTP/1.1 503 ") and b"SERVING_MAX_CONNECTIONS=60" in refused
    assert extra.recv(4096) == b""  # and closed
    held.pop().close()

    def served() -> bool:  # once the server has seen the close, a new connection is served
        with socket.create_connection(("127.0.0.1", bounded.port)) as sock:
            return ping_over(sock) == b"HTTP/1.1 200 OK"

    wait_for(served, what="a connection under the bound to be served")
    for sock in [*held, extra]:
        sock.close()
