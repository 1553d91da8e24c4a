"""Every error lmi-core raises, in one place: configuration errors and request errors.

A request error (``ServiceError``) carries the HTTP ``status``, a ``type`` (DJL's exception name) and
optionally the ``param`` at fault; the HTTP layer renders it in the route's own shape. Engine errors
are request errors raised inside a worker; they cross the socket with ``to_wire``/``from_wire``.
Standard library only: worker processes import this module.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key, the value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        super().__init__(f"invalid configuration {key}={value!r}: expected {allowed}")
        self.key = key
        self.value = value
        self.allowed = allowed


class ServiceError(Exception):
    """A request-level failure that maps to an HTTP status code (and maybe names a field)."""

    status: int = 500
    type: str = "InternalServerError"
    param: str | None = None
    # Seconds after which the client may try again (the ``Retry-After`` header); None: no header.
    retry_after: int | None = None

    def __init__(
        self, message: str, status: int | None = None, type: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        if param is not None:
            self.param = param

    def to_wire(self) -> dict[str, Any]:
        """The error as a worker sends it (``EngineError.from_wire`` reads it in the server)."""
        return {"status": self.status, "type": self.type, "message": str(self), "param": self.param}


# -- raised by the server ------------------------------------------------------------------------


class BadRequestError(ServiceError):
    """400: the request is invalid; ``param`` names the field."""

    status = 400
    type = "BadRequestException"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message, param=param)


class PromptTooLongError(BadRequestError):
    """400: the prompt does not fit the model's context (or ``option.max_input_length``). DJL answers it
    with 424 on its own routes, so the native API does too (``lmi_core.http.errors``)."""

    type = "PromptTooLongException"


class SessionError(ServiceError):
    """424: a SageMaker stateful-session request that cannot be served (an unknown or expired session,
    sessions disabled, a bad ``requestType``), as DJL answers it."""

    status = 424
    type = "SessionException"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message, param=param)


class AuthenticationError(ServiceError):
    status = 401
    type = "AuthenticationException"


class NotFoundError(ServiceError):
    status = 404
    type = "NotFoundException"


class ModelNotFoundError(ServiceError):
    status = 404
    type = "ModelNotFoundException"


class PayloadTooLargeError(ServiceError):
    status = 413
    type = "PayloadTooLargeException"


class UnsupportedMediaTypeError(ServiceError):
    status = 415
    type = "UnsupportedMediaTypeException"


class ModelNotReadyError(ServiceError):
    status = 503
    type = "ServiceUnavailableException"


class QueueFullError(ServiceError):
    """503: the server itself is overloaded (its queue is full); the client should come back."""

    status = 503
    type = "ServiceUnavailableException"
    retry_after = 1


class TenantBudgetError(ServiceError):
    """429: one tenant is over one of its budgets; ``param`` names it (``max_concurrency``,
    ``tokens_per_minute``) and ``retry_after`` says when it will have room again."""

    status = 429
    type = "TooManyRequestsException"

    def __init__(self, message: str, param: str, retry_after: int) -> None:
        super().__init__(message, param=param)
        self.retry_after = retry_after


class NoRoomError(QueueFullError):
    """503 with ``Retry-After``: a model's load found no room under the residency budget (only pinned
    or busy models hold it) within its wait."""


class DeadlineError(ServiceError):
    """A request ran out of one of its deadlines; ``deadline`` names which (a metric label)."""

    deadline: str = "predict"


class QueueTimeoutError(DeadlineError, QueueFullError):
    """503 with ``Retry-After``: no worker took the request within ``option.queue_timeout``."""

    deadline = "queue"


class WorkerFailedError(ServiceError):
    """The worker serving a request died or hung; the request cannot complete."""

    status = 503
    type = "WorkerFailedException"


class PreflightError(ServiceError):
    """Hosts of a multi-host MPI job failed the preflight; one line per host and check."""

    def __init__(self, failures: list[str]) -> None:
        super().__init__("preflight failed before any rank started:\n" + "\n".join(failures))
        self.failures = failures


class RequestTimeoutError(DeadlineError):
    """504: the request waited and ran longer than ``option.predict_timeout`` (or x-request-timeout)."""

    status = 504
    type = "RequestTimeoutException"
    deadline = "predict"


class WorkerStalledError(DeadlineError, WorkerFailedError):
    """503: the request produced no token within ``option.stall_timeout``; its worker is restarted."""

    deadline = "stall"


# -- raised by engines (inside a worker) ---------------------------------------------------------


class EngineError(ServiceError):
    """An error an engine reports for one request (424 unless it says otherwise).

    Any ``ServiceError`` an engine raises crosses the socket as ``to_wire()`` and arrives in the
    server as an ``EngineError`` with the same status, type, message and param.
    """

    status = 424
    type = "EngineException"

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> EngineError:
        status = int(data.get("status") or cls.status)
        kind = data.get("type") or ("BadRequestException" if status == 400 else cls.type)
        error_class = EngineFailedError if kind == EngineFailedError.type else cls
        return error_class(str(data.get("message", "")), status=status, type=kind, param=data.get("param"))


class EngineFailedError(EngineError):
    """The engine itself broke (its scheduler died, a collective with a dead rank failed), not the
    request: the request migrates to another worker like one whose worker died."""

    status = 503
    type = "EngineFailedException"


class EngineOutOfMemoryError(EngineError):
    """The engine ran out of (device) memory for this request."""

    status = 507
