"""Shared HTTP plumbing: JSON bodies with a size cap, error bodies, cancellation on disconnect."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse

from lmi_core.errors import QueueFullError, ServiceError
from lmi_core.http.protocol import BadRequest

T = TypeVar("T")

RETRY_AFTER_SECONDS = "1"


class PayloadTooLarge(ServiceError):
    status = 413
    type = "PayloadTooLargeException"


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON; 413 beyond ``limit`` bytes, 400 for anything but JSON."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds max_request_size={limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds max_request_size={limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if content_type == "text/plain":
        return {"inputs": body.decode(errors="replace")}
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", param="body") from None


def error_response(exc: ServiceError) -> JSONResponse:
    """DJL's error body: ``{"code", "type", "message"}`` (plus ``param`` when a field is at fault)."""
    body: dict[str, Any] = {"code": exc.status, "type": exc.type, "message": str(exc)}
    param = getattr(exc, "param", None)
    if param:
        body["param"] = param
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if isinstance(exc, QueueFullError) else None
    return JSONResponse(body, status_code=exc.status, headers=headers)


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
    raise ClientDisconnected()


async def collect(events: AsyncIterator[T]) -> list[T]:
    """Every event of a stream (closing it properly if cancelled)."""
    out = []
    try:
        async for event in events:
            out.append(event)
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    return out
