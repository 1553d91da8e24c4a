"""The last line of defence: an exception no handler expected still gets a JSON answer.

Invariant: whatever a route raises before its response starts, the client gets a JSON error in the
route's own dialect (``errors.dialect_for``) with ``connection: close``, and the exception is logged
with its traceback. Without this, starlette answered a plain-text 500 and
uvicorn then dropped the keep-alive connection without saying so, so the client's next request on
it was reset. After the response has started nothing can be answered any more: the exception goes
on to uvicorn, which closes the connection (the client sees a truncated body, which it is).
"""

from __future__ import annotations

import logging

from starlette.types import Message, Receive, Scope, Send

from lmi_core.errors import ServiceError
from lmi_core.http import errors
from lmi_core.http.common import HttpMiddleware, on_response_start

logger = logging.getLogger(__name__)


class ErrorBoundaryMiddleware(HttpMiddleware):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        def start(message: Message) -> None:
            nonlocal started
            started = True

        try:
            await self.app(scope, receive, on_response_start(send, start))
        except Exception as exc:
            if started:
                raise
            logger.exception("unexpected error answering %s %s", scope.get("method"), scope.get("path"))
            error = ServiceError(f"internal error: {exc.__class__.__name__}", status=500)
            response = errors.render(error, errors.dialect_for(scope.get("path", "")))
            response.headers["connection"] = "close"
            await response(scope, receive, send)
