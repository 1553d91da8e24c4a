"""SageMaker's stateful sessions, as DJL Serving serves them (``option.enable_stateful_sessions``).

On the native API of a model with sessions on (DJL's default): ``{"requestType": "NEW_SESSION"}``
starts a session, a directory ``<option.sessions_path>/<id>`` holding its expiry, and answers
``X-Amzn-SageMaker-New-Session-Id: <id>; Expires=<UTC time>`` (SageMaker's header; DJL's own
``X-Amzn-SageMaker-Session-Id`` too, with the same value, which DJL's clients read).
``{"requestType": "CLOSE"}`` with the session's ``X-Amzn-SageMaker-Session-Id`` removes it and answers
``X-Amzn-SageMaker-Closed-Session-Id: <id>``. Any other request naming a session in that header must
name a live one, else a 424 (``SessionError``, DJL's status for it); the router keeps a session's
requests on one worker (``serving.routing``). lmi's own ``x-session-id`` only routes.

Invariants: the directory is the only record, so models and servers that share a sessions path share
its sessions, and sessions outlive a restart, as DJL's do; a session id is a UUID (a header never
names another path); an expired session's directory is removed when it is next named and at every
``NEW_SESSION`` (DJL's sweep).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmi_core.errors import SessionError
from lmi_core.http.state import ServedModel

SESSION_HEADER = "X-Amzn-SageMaker-Session-Id"
NEW_SESSION_HEADER = "X-Amzn-SageMaker-New-Session-Id"
CLOSED_SESSION_HEADER = "X-Amzn-SageMaker-Closed-Session-Id"
EXPIRY_FILE = ".expiration_ts"
SESSION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
REQUEST_TYPES = ("NEW_SESSION", "CLOSE")


@dataclass(frozen=True)
class SessionStore:
    """The sessions of one sessions path."""

    path: Path
    expiration: int  # seconds a session lives

    def create(self, now: float) -> tuple[str, float]:
        """A new session's id and its expiry (expired ones swept first)."""
        self.sweep(now)
        session_id = str(uuid.uuid4())
        expires = now + self.expiration
        directory = self.path / session_id
        directory.mkdir(parents=True)
        (directory / EXPIRY_FILE).write_text(repr(expires))
        return session_id, expires

    def expiry(self, session_id: str) -> float | None:
        """The session's expiry; None for no such session."""
        if not SESSION_ID.fullmatch(session_id):
            return None
        try:
            return float((self.path / session_id / EXPIRY_FILE).read_text())
        except (OSError, ValueError):
            return None

    def check(self, session_id: str, now: float) -> None:
        """A 424 unless ``session_id`` is live; an expired one is removed."""
        expires = self.expiry(session_id)
        if expires is None:
            raise SessionError(
                f"session {session_id!r} is unknown: start one with NEW_SESSION", SESSION_HEADER
            )
        if now > expires:
            self.remove(session_id)
            raise SessionError(f"session {session_id!r} expired: start one with NEW_SESSION", SESSION_HEADER)

    def remove(self, session_id: str) -> None:
        shutil.rmtree(self.path / session_id, ignore_errors=True)

    def sweep(self, now: float) -> None:
        if not self.path.is_dir():
            return
        for entry in self.path.iterdir():
            expires = self.expiry(entry.name)
            if expires is not None and now > expires:
                self.remove(entry.name)


def store_of(model: ServedModel) -> SessionStore | None:
    """The model's session store; None with sessions off."""
    options = model.config.djl
    return (
        SessionStore(Path(options.sessions_path), options.sessions_expiration) if options.sessions else None
    )


def check(request: Request, model: ServedModel) -> None:
    """A request in a session (SageMaker's header) must name a live session of a model with sessions."""
    session_id = request.headers.get(SESSION_HEADER)
    store = store_of(model) if session_id is not None else None
    if store is not None and session_id is not None:
        store.check(session_id, time.time())


async def answer(request: Request, model: ServedModel, body: dict[str, Any]) -> Response:
    """Serve a ``{"requestType": ...}`` request: start or close a session."""
    kind = body["requestType"]
    store = store_of(model)
    if store is None:
        message = f"stateful sessions are off for model {model.name} (option.enable_stateful_sessions=false)"
        raise SessionError(message, "requestType")
    if kind == "NEW_SESSION":
        session_id, expires = await asyncio.to_thread(store.create, time.time())
        when = datetime.fromtimestamp(expires, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        value = f"{session_id}; Expires={when}"
        headers = {NEW_SESSION_HEADER: value, SESSION_HEADER: value}
        return JSONResponse({"result": f"Session {session_id} created"}, headers=headers)
    if kind == "CLOSE":
        closing = request.headers.get(SESSION_HEADER)
        if closing is None:
            raise SessionError(f"CLOSE needs the session to close in {SESSION_HEADER}", SESSION_HEADER)
        store.check(closing, time.time())
        await asyncio.to_thread(store.remove, closing)
        headers = {CLOSED_SESSION_HEADER: closing}
        return JSONResponse({"result": f"Session {closing} closed"}, headers=headers)
    raise SessionError(f"requestType must be one of {', '.join(REQUEST_TYPES)}, not {kind!r}", "requestType")
