"""A model's custom formatters on the native API: DJL's ``@input_formatter`` / ``@output_formatter``.

They run in one of the model's workers, beside the engine and its tokenizer, as DJL runs them in its
Python engine process (``lmi_core.custom_code``): the request body goes through ``FormatInput`` once,
whose answer also says whether there is an output formatter; only then does each response object
go through ``FormatOutput`` (the whole result, or each streamed line, before it is framed). The files
are the request's adapter's ``model.py`` (an adapter named by SageMaker's header or the body's
``adapters``, whose directory has one) before the model's custom code file, formatter by formatter.

Invariants: a model without custom code costs no operation at all; a formatter that fails fails its
request only, with a 424 naming it (``CustomFormatterException``), in the route's error shape, or as
the stream's last object once the headers are sent.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request

from lmi_core.custom_code import DEFAULT_FILE
from lmi_core.errors import ServiceError
from lmi_core.http.adapters import ADAPTER_HEADER
from lmi_core.http.context import request_context
from lmi_core.http.state import ServedModel
from lmi_core.operations import FormatInput, FormatOutput
from lmi_core.serving.routing import RequestContext


def code_files(request: Request, model: ServedModel, body: dict[str, Any]) -> list[str]:
    """The custom code files of this request, the adapter's first; empty for a model without any."""
    files = []
    name = request.headers.get(ADAPTER_HEADER) or body.get("adapters")
    if isinstance(name, str) and model.adapters is not None and (entry := model.adapters.find(name)):
        adapter_code = Path(entry.lora.path, DEFAULT_FILE)
        if adapter_code.is_file():
            files.append(str(adapter_code.resolve()))
    if model.config.entry_point is not None:
        files.append(model.config.entry_point)
    return files


@dataclass
class OutputFormatter:
    """The output formatter of one request, run in a worker of its model."""

    model: ServedModel
    code: list[str]
    context: RequestContext | None

    async def __call__(self, data: Any) -> Any:
        return await self.model.perform(FormatOutput(data, self.code), self.context)

    async def each(
        self, objects: AsyncGenerator[Any, None], failed: Callable[[ServiceError], Any]
    ) -> AsyncGenerator[Any, None]:
        """Each streamed object, formatted; a formatter failure ends the stream with ``failed(error)``
        (the headers are sent: the error is the last object)."""
        try:
            async for obj in objects:
                try:
                    formatted = await self(obj)
                except ServiceError as exc:
                    yield failed(exc)
                    return
                yield formatted
        finally:
            await objects.aclose()


async def format_input(
    request: Request, model: ServedModel, body: dict[str, Any]
) -> tuple[dict[str, Any], OutputFormatter | None]:
    """The body after the request's input formatter, and its output formatter (None without one)."""
    code = code_files(request, model, body)
    if not code:
        return body, None
    context = request_context(request)
    formatted = await model.perform(FormatInput(body, code), context)
    return formatted.payload, OutputFormatter(model, code, context) if formatted.output_formatter else None
