"""Shared HTTP plumbing: request ids, JSON bodies with a size cap, cancellation on disconnect, fan-in
of concurrent generations (``merge``), streaming, and the middlewares' ASGI prologue."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmi_core.errors import BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError
from lmi_core.http.json_guard import MAX_DEPTH, check_body

T = TypeVar("T")


def new_request_id() -> str:
    """The id of one generation (a request with ``n`` choices starts ``n``), unique across workers."""
    return uuid.uuid4().hex


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


def _int64(text: str) -> int:
    """A JSON integer; one beyond 64 bits fits no field and cannot reach a worker (msgpack): 400."""
    value = int(text)
    if not -(2**63) <= value < 2**64:
        raise BadRequestError(f"integer {text[:40]} does not fit in 64 bits", param="body")
    return value


def is_json(content_type: str) -> bool:
    """``application/json`` or a ``+json`` type; no content type at all counts as JSON (curl --data-raw)."""
    return content_type in ("", "application/json") or content_type.endswith("+json")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, whatever its type; 413 beyond ``limit`` bytes (before reading, when declared)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body of {declared} bytes exceeds max_request_size={limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"request body exceeds max_request_size={limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int, allow_text: bool = True) -> Any:
    """The request body as JSON; 413 beyond ``limit`` bytes, 415 for a content type that is not JSON
    (``text/plain`` is DJL's bare prompt where ``allow_text``), 400 for a body that is not valid JSON."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (is_json(content_type) or (allow_text and content_type == "text/plain")):
        # A form-encoded body (curl -d without -H) is not JSON; vLLM refuses it too.
        raise UnsupportedMediaTypeError(
            f"unsupported content type {content_type!r}: send application/json", param="content-type"
        )
    body = await read_body(request, limit)
    if content_type == "text/plain":
        return {"inputs": body.decode(errors="replace")}
    try:
        value = json.loads(body, parse_int=_int64)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"request body is not valid JSON: {exc}", param="body") from None
    except RecursionError:  # the C decoder's own limit (~1,000 levels): a body nested 10,000 deep
        raise BadRequestError(f"request body is nested deeper than {MAX_DEPTH} levels", "body") from None
    check_body(body, value)
    return value


async def query_and_body(request: Request, limit: int) -> dict[str, Any]:
    """A management call's parameters: the query's, overridden by a JSON body's fields (DJL accepts
    either)."""
    params: dict[str, Any] = dict(request.query_params)
    if request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
        body = await read_json(request, limit)
        if not isinstance(body, dict):
            raise BadRequestError("request body must be a JSON object", param="body")
        params.update(body)
    return params


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first; then cancel it (and so the engine's request)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.wait({task})  # its cleanup (the engine-side cancel) is done when we return
    raise ClientDisconnected()


async def collect(events: AsyncGenerator[T, None]) -> list[T]:
    """Every event of a stream (closing it properly if cancelled)."""
    out = []
    try:
        async for event in events:
            out.append(event)
    finally:
        await events.aclose()
    return out


_END = object()


async def merge(streams: list[AsyncGenerator[T, None]]) -> AsyncGenerator[tuple[int, T], None]:
    """The events of every stream as they come, tagged with the stream's index; closing it (or a
    failure of one stream) closes them all, which cancels their generations."""
    if len(streams) == 1:  # n=1, nearly every request: no task and no queue hop per token
        (stream,) = streams
        try:
            async for event in stream:
                yield 0, event
        finally:
            await stream.aclose()
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[T, None]) -> None:
        try:
            async for event in stream:
                queue.put_nowait((index, event))
        except Exception as exc:
            queue.put_nowait((index, exc))
        finally:
            await stream.aclose()
            queue.put_nowait((index, _END))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is _END:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)


async def collect_each(events: AsyncGenerator[tuple[int, T], None], count: int) -> list[list[T]]:
    """Every event of ``count`` streams merged into ``events`` (``merge``), in a list per stream."""
    results: list[list[T]] = [[] for _ in range(count)]
    for index, event in await collect(events):
        results[index].append(event)
    return results


class Stopped(Exception):
    """A stop flag ended a request's events before they ended (a cancelled stored response)."""


async def until_set(events: AsyncGenerator[T, None], flag: asyncio.Event) -> AsyncGenerator[T, None]:
    """``events`` until ``flag`` is set, checked at each event (a generation stops at its next token);
    then ``Stopped``, and ``events`` is closed, which cancels its generations."""
    try:
        async for event in events:
            if flag.is_set():
                raise Stopped()
            yield event
    finally:
        await events.aclose()


class HttpMiddleware(abc.ABC):
    """An ASGI middleware of HTTP requests: they go to ``handle``; lifespan events pass through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.handle(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    @abc.abstractmethod
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None: ...


def on_response_start(send: Send, hook: Callable[[Message], None]) -> Send:
    """``send`` that first shows ``hook`` the response's start message: its status, and its headers,
    which ``hook`` may extend."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            hook(message)
        await send(message)

    return wrapped


class ClosingStreamingResponse(StreamingResponse):
    """A streaming response that always closes its body, whether it ended, failed or the client left.

    Starlette leaves the body generator suspended when the client disconnects between two chunks;
    closing it here runs its ``finally`` at once, which cancels the generation in the engine.
    """

    def __init__(self, content: AsyncGenerator[bytes, None], media_type: str) -> None:
        super().__init__(content, media_type=media_type)
        self._content = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._content.aclose()


async def stream_response(
    request: Request,
    events: AsyncGenerator[T, None],
    render: Callable[[AsyncGenerator[T, None]], AsyncGenerator[bytes, None]],
    media_type: str,
) -> Response:
    """Start streaming only once the first event exists, so early errors still get a status code.

    A client that disconnects before the first event, or at any point after, cancels ``events``.
    """
    try:
        first = await until_disconnected(request, anext(events))
    except StopAsyncIteration:
        first = None
    except BaseException:
        await events.aclose()
        raise

    async def replay() -> AsyncGenerator[T, None]:
        if first is not None:
            yield first
        async for event in events:
            yield event

    async def body() -> AsyncGenerator[bytes, None]:
        source = replay()
        try:
            async with contextlib.aclosing(render(source)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            await source.aclose()
            await events.aclose()

    return ClosingStreamingResponse(body(), media_type=media_type)
