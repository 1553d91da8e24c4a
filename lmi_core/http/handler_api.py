"""Requests to a ``handle(inputs)`` model (DJL's Python engine) on the native API's routes.

A handler takes any body, not only JSON: the request goes to one of the model's workers as it came
(``Invoke``: its headers as DJL's ``Input`` properties, with SageMaker's custom attributes split into
properties as DJL splits them; its query parameters, then its body as ``data``), and the handler's
``Output`` comes back as the response: its code, its properties as headers, its body. What the handler
raises is its response (424 with DJL's body), written by the worker; a handler model has no LLM routes.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from lmi_core.http.common import read_body, until_disconnected
from lmi_core.http.context import request_context
from lmi_core.http.state import AppState, ServedModel
from lmi_core.operations import Invoke

CUSTOM_ATTRIBUTES = "x-amzn-sagemaker-custom-attributes"
BACKEND = "handler"  # lmi_core.worker.handler.NAME (the worker side is not imported here)


def serves_handle(model: ServedModel) -> bool:
    return model.config.backend == BACKEND


def properties(request: Request) -> dict[str, str]:
    """The request's headers as DJL's ``Input`` properties; ``k1=v1;k2=v2`` custom attributes split."""
    props: dict[str, str] = {}
    for key, value in request.headers.items():
        if key == CUSTOM_ATTRIBUTES:
            pairs = (token.split("=", 1) for token in value.split(";"))
            props.update((pair[0].strip(), pair[1].strip()) for pair in pairs if len(pair) == 2)
        else:
            props[key] = value
    return props


async def invoke(request: Request, model: ServedModel, body: bytes | None = None) -> Response:
    """Serve one request with the model's handler (``body``: the body, when already read)."""
    state: AppState = request.app.state.lmi
    data = body if body is not None else await read_body(request, state.config.max_request_size)
    content = [(key, value.encode()) for key, value in request.query_params.multi_items()]
    operation = Invoke(properties(request), [*content, ("data", data)])
    result = await until_disconnected(request, model.perform(operation, request_context(request)))
    return Response(result.body, status_code=result.code, headers=result.properties)
