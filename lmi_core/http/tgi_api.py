"""Text Generation Inference's routes: ``POST /generate``, ``/generate_stream`` and ``/``.

TGI's request is the LMI request (``{"inputs", "parameters", "stream"}``, with TGI's parameters:
``details``, ``decoder_input_details``, ``top_n_tokens``, ``grammar``, ``adapter_id``...), so these
routes run the native API's ``predict`` with TGI's shapes fixed: ``/generate`` answers one result
object, ``/generate_stream`` server-sent events of TGI's stream objects, and ``/`` (TGI's
compatibility route, which ``huggingface_hub``'s ``InferenceClient`` calls at a base URL) a list of
one result, or the events when ``stream`` is true. Errors are TGI's ``{"error", "error_type"}``
(``lmi_core.http.errors``). The model is the one the query or ``model_name`` header names, else the
only one.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from lmi_core.http.common import read_json
from lmi_core.http.lmi_api import RouteStyle, model_for, predict
from lmi_core.http.lmi_render import Shape
from lmi_core.http.state import AppState

GENERATE = RouteStyle(Shape(tgi=True), stream=False)
GENERATE_STREAM = RouteStyle(Shape(tgi=True), stream=True)
COMPAT = RouteStyle(Shape(tgi=True, as_list=True))


async def _tgi(request: Request, style: RouteStyle) -> Response:
    state: AppState = request.app.state.lmi
    body = await read_json(request, state.config.max_request_size, allow_text=False)
    return await predict(request, model_for(request, body), body, style)


async def generate(request: Request) -> Response:
    return await _tgi(request, GENERATE)


async def generate_stream(request: Request) -> Response:
    return await _tgi(request, GENERATE_STREAM)


async def compat_generate(request: Request) -> Response:
    return await _tgi(request, COMPAT)


routes = [
    Route("/generate", generate, methods=["POST"]),
    Route("/generate_stream", generate_stream, methods=["POST"]),
    Route("/", compat_generate, methods=["POST"]),
]
