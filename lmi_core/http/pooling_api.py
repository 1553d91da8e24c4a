"""The pooling routes: embeddings, scores and reranking, in the shapes their clients parse.

OpenAI's ``POST /v1/embeddings``; vLLM's ``/score`` and ``/v1/score``; the Jina/Cohere ``/rerank`` and
``/v1/rerank`` (TEI's body with ``texts`` gets TEI's bare list); TEI's ``POST /embed``; and DJL's
``{"inputs": str | [str]}`` on ``/invocations`` for an embedding model (``pooling_invocation``).

Invariant: each request is one operation (``Embed`` or ``Score``) run by the model's pool, which
refuses a model of another task with a 400 naming the model's task; this module only turns bodies
into operations and results into answers. Vectors arrive as float32 bytes and leave as OpenAI's
base64 without a conversion, or as JSON numbers written by orjson.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any, cast

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from lmi_core.errors import BadRequestError
from lmi_core.http.common import until_disconnected
from lmi_core.http.context import request_context
from lmi_core.http.openai_api import parse_body, unknown_fields, with_ignored
from lmi_core.http.pooling_protocol import (
    EmbeddingsRequest,
    RerankRequest,
    ScoreRequest,
    TeiEmbedRequest,
)
from lmi_core.http.state import ServedModel
from lmi_core.operations import Embed, EmbedResult, Score, ScoreResult
from lmi_core.pooling import unpack_vectors


def json_response(body: Any) -> Response:
    # orjson: a batch of 32 vectors of 1024 floats is 32k numbers; json.dumps takes ~10x longer.
    return Response(orjson.dumps(body), media_type="application/json")


async def _parse(request: Request, kind: type[Any]) -> tuple[ServedModel, Any, list[str]]:
    """The body as ``kind``, the model it names (the only one if none) and its unknown fields."""
    pool, adapter, body = await parse_body(request, kind)
    if adapter is not None:
        raise BadRequestError("pooling requests take no LoRA adapter", param="model")
    return pool, body, unknown_fields(pool, body)


async def _perform(request: Request, pool: ServedModel, operation: Embed | Score) -> Any:
    context = request_context(request)
    if context is not None:  # the HTTP request's model label (lmi_http_requests), as a generation's
        context.model = pool.name
    return await until_disconnected(request, pool.perform(operation, context))


def _inputs(value: str | list[str] | list[int] | list[list[int]]) -> list[str] | list[list[int]]:
    """One input or a list of them, as a list: a list of ints is one input of token ids."""
    if isinstance(value, str):
        return [value]
    if value and isinstance(value[0], int):
        return [value]  # a list of ints (validated): one token-id input
    return cast(list[str] | list[list[int]], value)


def _usage(tokens: int) -> dict[str, int]:
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def vectors(result: EmbedResult) -> list[list[float]]:
    return unpack_vectors(result.data, result.dimensions)


def base64_vectors(result: EmbedResult) -> list[str]:
    """Each vector as OpenAI's base64: its little-endian float32 bytes, as the worker sent them."""
    size = 4 * result.dimensions
    data = result.data
    return [base64.b64encode(data[i : i + size]).decode("ascii") for i in range(0, len(data), size)]


async def embeddings(request: Request) -> Response:
    pool, body, ignored = await _parse(request, EmbeddingsRequest)
    embed = Embed(_inputs(body.input), normalize=body.use_activation, dimensions=body.dimensions)
    result: EmbedResult = await _perform(request, pool, embed)
    items = base64_vectors(result) if body.encoding_format == "base64" else vectors(result)
    answer = {
        "id": f"embd-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": body.model or pool.name,
        "data": [{"index": i, "object": "embedding", "embedding": v} for i, v in enumerate(items)],
        "usage": _usage(result.prompt_tokens),
    }
    return with_ignored(json_response(answer), ignored)


async def tei_embed(request: Request) -> Response:
    """TEI's ``/embed``: a bare list of vectors, one per input."""
    pool, body, ignored = await _parse(request, TeiEmbedRequest)
    embed = Embed(_inputs(body.inputs), body.truncate, body.normalize, body.dimensions, param="inputs")
    result: EmbedResult = await _perform(request, pool, embed)
    return with_ignored(json_response(vectors(result)), ignored)


def score_pairs(first: list[str], second: list[str], name: str) -> list[tuple[str, str]]:
    """vLLM's pairing: one first text against each second (1:N), else pair by pair (N:N)."""
    if len(first) == 1:
        return [(first[0], text) for text in second]
    if len(first) != len(second):
        raise BadRequestError(
            f"{len(first)} first texts and {len(second)} second texts: give one first text, or as many "
            "as second texts (1:N or N:N)",
            param=name,
        )
    return list(zip(first, second, strict=True))


async def score(request: Request) -> Response:
    pool, body, ignored = await _parse(request, ScoreRequest)
    first, second, name = body.sides()
    result: ScoreResult = await _perform(request, pool, Score(score_pairs(first, second, name), param=name))
    answer = {
        "id": f"score-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": body.model or pool.name,
        "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(result.scores)],
        "usage": _usage(result.prompt_tokens),
    }
    return with_ignored(json_response(answer), ignored)


def ranked(scores: list[float], top_n: int | None) -> list[int]:
    """Document indices by score, best first (ties in input order), cut to ``top_n`` (0/None: all)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return order[:top_n] if top_n else order


async def rerank(request: Request) -> Response:
    pool, body, ignored = await _parse(request, RerankRequest)
    documents: list[str] = body.documents if body.documents is not None else body.texts
    name = "documents" if body.documents is not None else "texts"
    pairs = [(body.query, document) for document in documents]
    result: ScoreResult = await _perform(request, pool, Score(pairs, body.truncate, param=name))
    order = ranked(result.scores, body.top_n)
    if body.texts is not None:  # TEI's answer: a bare list, best first
        tei = [
            {"index": i, "score": result.scores[i], **({"text": documents[i]} if body.return_text else {})}
            for i in order
        ]
        return with_ignored(json_response(tei), ignored)
    results = [
        {
            "index": i,
            "relevance_score": result.scores[i],
            **({"document": {"text": documents[i]}} if body.return_documents else {}),
        }
        for i in order
    ]
    answer = {
        "id": f"rerank-{uuid.uuid4().hex}",
        "model": body.model or pool.name,
        "usage": _usage(result.prompt_tokens),
        "results": results,
    }
    return with_ignored(json_response(answer), ignored)


async def pooling_invocation(request: Request, pool: ServedModel, body: dict[str, Any]) -> Response:
    """DJL's embedding request on ``/invocations``: ``{"inputs": str | [str]}`` gives a bare vector (one
    string) or a list of them."""
    inputs = body.get("inputs")
    single = isinstance(inputs, str)
    texts = [inputs] if single else inputs
    if not isinstance(texts, list) or not texts or not all(isinstance(x, str) for x in texts):
        raise BadRequestError('"inputs" must be a string or a non-empty list of strings', param="inputs")
    result: EmbedResult = await _perform(request, pool, Embed(texts, param="inputs"))
    rows = vectors(result)
    return json_response(rows[0] if single else rows)


routes = [
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/embed", tei_embed, methods=["POST"]),
    Route("/score", score, methods=["POST"]),
    Route("/v1/score", score, methods=["POST"]),
    Route("/rerank", rerank, methods=["POST"]),
    Route("/v1/rerank", rerank, methods=["POST"]),
]
