"""Errors the server raises before a request reaches an engine."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key, the value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        super().__init__(f"invalid configuration {key}={value!r}: expected {allowed}")
        self.key = key
        self.value = value
        self.allowed = allowed


class ServiceError(Exception):
    """A request-level failure that maps to an HTTP status code."""

    status: int = 500
    type: str = "InternalServerError"

    def __init__(self, message: str, status: int | None = None, type: str | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type


class ModelNotFoundError(ServiceError):
    status = 404
    type = "ModelNotFoundException"


class ModelNotReadyError(ServiceError):
    status = 503
    type = "ServiceUnavailableException"


class QueueFullError(ServiceError):
    status = 503
    type = "ServiceUnavailableException"


class WorkerFailedError(ServiceError):
    """The worker serving a request died or hung; the request cannot complete."""

    status = 503
    type = "WorkerFailedException"


class RequestTimeoutError(ServiceError):
    status = 504
    type = "RequestTimeoutException"


class EngineRequestError(ServiceError):
    """The engine rejected or failed one request (status from the engine: 400, 424, 507...)."""

    type = "EngineException"

    def __init__(self, message: str, status: int = 424, param: str | None = None) -> None:
        super().__init__(message, status=status, type="BadRequestException" if status == 400 else None)
        self.param = param
