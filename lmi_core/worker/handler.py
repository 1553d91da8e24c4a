"""DJL's Python engine: a model served by its custom code's ``handle(inputs)``, not by an LLM engine.

Backend ``handler``, which the server picks when the model's custom code file (``model.py`` or
``option.entryPoint``) defines the handler function (``option.handler``, default ``handle``;
``lmi_core.config``); always Python mode. The worker imports the file, calls the handler once with an
empty ``djl_python.Input`` carrying the model's properties (DJL's initialization: a failure or an error
status fails the load), then answers each ``Invoke`` with one call. A plain ``def`` handler runs on a
thread, one request at a time, as in DJL (more workers serve more at once); an ``async def`` handler
runs on the worker's loop, concurrently up to ``option.max_rolling_batch_size``. What the handler
raises becomes its request's response, as DJL writes it (424 ``invoke handler failure``, 507 when out
of memory); the worker stays up. Standard library only, as every worker-side module.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any

from djl_python import Input, Output
from lmi_core import custom_code
from lmi_core.backends import BackendSpec
from lmi_core.engine import EngineStats, GenerationEvent, GenerationRequest, WorkerContext
from lmi_core.errors import BadRequestError, ConfigError, EngineError
from lmi_core.hookspecs import hookimpl
from lmi_core.operations import Invoke, InvokeResult

if TYPE_CHECKING:
    from lmi_core.config import ModelConfig

logger = logging.getLogger(__name__)

NAME = "handler"
# DJL answers one request at a time per Python worker (its batch_size 1): the default capacity here.
DEFAULT_CAPACITY = 1


@hookimpl
def register_backends() -> list[BackendSpec]:
    description = "a model.py handle(inputs) function (DJL's Python engine)"
    return [BackendSpec(NAME, description=description, auto=False)]


@hookimpl
def validate_config(config: ModelConfig) -> None:
    """Every ``option.*`` is the handler's to read (DJL passes them all); only Python mode serves it."""
    if config.backend != NAME:
        return
    if config.mode != "python":
        raise ConfigError("option.mpi_mode", "true", "false: a handle() model runs in Python mode")
    if config.entry_point is None:
        raise ConfigError("option.backend", NAME, "a model with a model.py (or option.entryPoint) to serve")
    if "max_rolling_batch_size" not in config.model_fields_set:
        config.max_rolling_batch_size = DEFAULT_CAPACITY


@hookimpl
def load_engine(context: WorkerContext) -> HandlerEngine | None:
    if context.backend != NAME:
        return None
    if context.entry_point is None:
        raise EngineError("the handler backend needs a custom code file", status=500)
    return HandlerEngine(context, context.entry_point)


def properties(context: WorkerContext) -> dict[str, str]:
    """What every call's ``Input`` carries besides the request: the model's options and directory."""
    props = {key: str(value) for key, value in context.options.items()}
    props.update(model_dir=context.model_dir or "", model_id=context.model_id, device_id="0")
    return props


class HandlerEngine:
    """Serves ``Invoke`` requests with the custom code's handler; refuses generation requests."""

    def __init__(self, context: WorkerContext, path: str) -> None:
        self.context = context
        name = str(context.options.get("handler", "handle"))
        code = custom_code.load(path)
        handler = code.function(name)
        if handler is None:
            raise EngineError(f"{path} has no function {name}()", status=500)
        self.handler: Callable[[Input], Any] = handler
        self.is_async = inspect.iscoroutinefunction(handler)
        self.lock = asyncio.Lock()  # a plain handler serves one request at a time (DJL's sync engine)
        self.running = 0
        self.finished = 0
        # DJL's initialization: the handler with the model's properties and no content (is_empty()).
        init = Input(properties(context))
        result = asyncio.run(self.handler(init)) if self.is_async else self.handler(init)
        if isinstance(result, Output) and result.code >= 300:
            raise EngineError(f"{name}() failed to initialize: {result.code} {result.message}", status=500)

    async def invoke(self, operation: Invoke) -> InvokeResult:
        inputs = Input({**properties(self.context), **operation.properties}, operation.content)
        self.running += 1
        try:
            if self.is_async:
                output = await self.handler(inputs)
            else:
                async with self.lock:
                    output = await asyncio.to_thread(self.handler, inputs)
        except Exception as exc:
            logger.exception("handler failed")
            output = failure(exc)
        finally:
            self.running -= 1
            self.finished += 1
        return result_of(output)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        raise BadRequestError(
            "this model is served by its handle() function, not by an LLM engine: send its requests to "
            "/invocations or /predictions/{model}",
            param="model",
        )
        yield  # an async generator, for the Engine protocol

    def stats(self) -> EngineStats:
        return EngineStats(running=self.running, finished_total=self.finished)

    def shutdown(self) -> None:
        pass


def failure(exc: BaseException) -> Output:
    """DJL's response to a handler that raised: 507 when out of memory, else 424 with the message."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return Output(code=507, message=str(exc))
    return Output().error(str(exc))


def result_of(output: Any) -> InvokeResult:
    """The handler's return value as the response: an ``Output``; None is 204 (DJL's "No content")."""
    if output is None:
        output = Output(code=204, message="No content")
    elif not isinstance(output, Output):
        output = Output().error(f"Invalid output type: {type(output)}")
    return InvokeResult(output.code, output.message, dict(output.properties), output.body())
