"""The shared HTTP plumbing: JSON bodies (size cap, bad JSON, 64-bit ints), fan-in, streaming."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from lmi_core.errors import QueueFullError, ServiceError
from lmi_core.http import errors
from lmi_core.http.common import Stopped, collect_each, merge, read_json, stream_response, until_set
from tests.http.fakes import FakeModels, client, model, pool, worker

LIMIT = 64


async def echo(request: Request) -> Response:
    return JSONResponse({"body": await read_json(request, LIMIT)})


async def _error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    return errors.render(exc, errors.dialect_for(request.url.path))


def plumbing(*routes: Route) -> TestClient:
    return TestClient(
        Starlette(
            routes=[Route("/echo", echo, methods=["POST"]), *routes],
            exception_handlers={ServiceError: _error},
        )
    )


def test_read_json_parses_json_and_plain_text() -> None:
    http = plumbing()
    assert http.post("/echo", json={"a": [1, 2.5, None]}).json() == {"body": {"a": [1, 2.5, None]}}
    text = http.post("/echo", content=b"hello", headers={"content-type": "text/plain; charset=utf-8"})
    assert text.json() == {"body": {"inputs": "hello"}}


def test_read_json_refuses_a_body_over_the_limit_declared_or_streamed() -> None:
    http = plumbing()
    declared = http.post("/echo", content=b"1" * (LIMIT + 1))
    assert declared.status_code == 413 and declared.json()["type"] == "PayloadTooLargeException"

    def chunks() -> Iterator[bytes]:  # no content-length: the cap is counted as the body arrives
        yield b"[" + b"1," * LIMIT

    streamed = http.post("/echo", content=chunks())
    assert streamed.status_code == 413 and "exceeds" in streamed.json()["message"]


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"\xff\xfe", b"", b"[1, 2"],
)
def test_read_json_refuses_what_is_not_json(body: bytes) -> None:
    response = plumbing().post("/echo", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["param"] == "body" and "not valid JSON" in response.json()["message"]


def test_read_json_refuses_integers_beyond_64_bits() -> None:
    http = plumbing()
    assert http.post("/echo", content=str(2**64 - 1).encode()).json() == {"body": 2**64 - 1}
    assert http.post("/echo", content=str(-(2**63)).encode()).json() == {"body": -(2**63)}
    for value in (2**64, -(2**63) - 1):
        response = http.post("/echo", content=f'{{"seed": {value}}}'.encode())
        assert response.status_code == 400 and "64 bits" in response.json()["message"]


def test_the_app_answers_unknown_routes_and_models_in_the_path_s_shape() -> None:
    http = client(FakeModels(model("a", pool("a", worker(0)))))
    djl = http.get("/no/such/route")
    assert djl.status_code == 404 and djl.json() == {"code": 404, "type": "NotFound", "message": "Not Found"}
    openai = http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert openai.status_code == 404
    assert openai.json()["error"]["param"] == "model" and openai.json()["error"]["code"] == 404
    djl_model = http.post("/predictions/nope", json={"inputs": "x"})
    assert djl_model.json()["type"] == "ModelNotFoundException"
    wrong_method = http.delete("/invocations")
    assert wrong_method.status_code == 405 and wrong_method.json()["code"] == 405


async def lines(events: AsyncIterator[str]) -> AsyncIterator[bytes]:
    async for event in events:
        yield event.encode() + b"\n"


def streaming(events: list[str | ServiceError]) -> TestClient:
    async def source() -> AsyncIterator[str]:
        for event in events:
            if isinstance(event, ServiceError):
                raise event
            yield event

    async def handler(request: Request) -> Response:
        return await stream_response(request, source(), lines, "application/jsonlines")

    return plumbing(Route("/stream", handler, methods=["GET"]))


def test_stream_response_streams_every_event() -> None:
    response = streaming(["a", "b", "c"]).get("/stream")
    assert response.status_code == 200 and response.text == "a\nb\nc\n"
    assert response.headers["content-type"].startswith("application/jsonlines")
    assert streaming([]).get("/stream").text == ""


def test_stream_response_gives_an_error_before_the_first_event_its_status_code() -> None:
    response = streaming([QueueFullError("the queue is full"), "never"]).get("/stream")
    assert response.status_code == 503 and response.json()["message"] == "the queue is full"


async def test_collect_each_keeps_each_stream_s_events_and_one_failure_closes_the_rest() -> None:
    closed: list[str] = []

    async def stream(name: str, count: int, fail: bool = False) -> AsyncGenerator[str, None]:
        try:
            for i in range(count):
                await asyncio.sleep(0)
                yield f"{name}{i}"
            if fail:
                raise QueueFullError("gone")
            await asyncio.Event().wait()  # never ends by itself: only closing stops it
        finally:
            closed.append(name)

    async def finite(name: str, count: int) -> AsyncGenerator[str, None]:
        for i in range(count):
            await asyncio.sleep(0)
            yield f"{name}{i}"

    assert await collect_each(merge([finite("a", 2), finite("b", 3)]), 2) == [
        ["a0", "a1"],
        ["b0", "b1", "b2"],
    ]
    with pytest.raises(QueueFullError):
        await collect_each(merge([stream("a", 1), stream("b", 2, fail=True), stream("c", 3)]), 3)
    assert sorted(closed) == ["a", "b", "c"]


async def test_until_set_stops_at_the_next_event_and_closes_the_events() -> None:
    closed: list[str] = []
    flag = asyncio.Event()

    async def tokens() -> AsyncGenerator[int, None]:
        try:
            for i in range(10):
                yield i
        finally:
            closed.append("tokens")

    seen = []
    with pytest.raises(Stopped):
        async for i in until_set(tokens(), flag):
            seen.append(i)
            if i == 2:
                flag.set()
    assert seen == [0, 1, 2] and closed == ["tokens"]
