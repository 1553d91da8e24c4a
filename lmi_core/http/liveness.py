"""``GET /live``: liveness for orchestrators (a Kubernetes livenessProbe).

Invariant: 200 whenever the server's event loop answers, whatever the models do (loading, restarting
workers, FAILED): the loop is where every worker's supervisor, heartbeat and the pools' scalers run,
so an answer means supervision runs; a blocked or dead loop answers nothing and the probe times out.
Readiness is ``/ping`` (every model) or ``/health`` (vLLM's); neither belongs in a liveness probe,
which would kill a server that is only loading or restarting a worker.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


async def live(request: Request) -> Response:
    return JSONResponse({"status": "alive"})


routes = [Route("/live", live, methods=["GET"])]
