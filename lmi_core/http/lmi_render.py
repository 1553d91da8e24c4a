"""The native LMI API's responses: one result object, or one object per streamed token, in DJL's or
TGI's shapes, and the framings that write them (JSON, JSON lines, server-sent events).

A ``Shape`` says which: DJL's (``log_prob``, ``special_token``; details only when asked) or TGI's
(``logprob``, ``special``; stream lines with ``index``, ``top_tokens`` and null ``generated_text`` /
``details`` until the last; ``seed`` and ``prefill`` in the details), a whole result in a list (TGI's
compatibility route, DJL's ``option.tgi_compat``), and whether details are on by default (DJL's TGI
mode). Invariants: the last streamed object carries the generated text (and details when asked) and
holds the request's final token, written as soon as the ``Finished`` that follows it arrives; an
error after the headers becomes the last object, in the route's error shape. Renderers return plain
objects, so that a model's custom output formatter can run on each before it is framed.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from lmi_core.engine import Finished, GenerationEvent, Token
from lmi_core.errors import ServiceError
from lmi_core.http import errors
from lmi_core.http.lmi_protocol import LmiRequest


@dataclass(frozen=True)
class Shape:
    tgi: bool = False
    as_list: bool = False  # a whole result wrapped in a list
    details: bool = False  # details when the request does not say (DJL's TGI mode: on)


DJL = Shape()


def token_json(token: Token, lmi: LmiRequest, shape: Shape) -> dict[str, Any]:
    if shape.tgi:
        return {"id": token.id, "text": token.text, "logprob": token.log_prob, "special": token.special}
    out: dict[str, Any] = {"id": token.id, "text": token.text, "log_prob": token.log_prob}
    if token.special:
        out["special_token"] = True
    if lmi.parameters.top_n_tokens and token.top_logprobs:
        out["top_tokens"] = [{"id": i, "text": t, "log_prob": lp} for i, t, lp in token.top_logprobs]
    return out


def _top_tokens(token: Token) -> list[dict[str, Any]]:
    """TGI's alternatives of one position."""
    return [{"id": i, "text": t, "logprob": lp, "special": False} for i, t, lp in token.top_logprobs or []]


def details(finished: Finished, generated: int, lmi: LmiRequest, shape: Shape) -> dict[str, Any]:
    """The ``details`` of a result, without its tokens."""
    out: dict[str, Any] = {"finish_reason": finished.finish_reason, "generated_tokens": generated}
    key = "logprob" if shape.tgi else "log_prob"
    if shape.tgi:
        out["seed"] = lmi.parameters.seed
    else:
        out["inputs"] = finished.prompt
    if finished.prompt_logprobs is not None:  # decoder_input_details (TGI's prefill tokens)
        out["prefill"] = [{"id": i, "text": text, key: lp} for i, text, lp, _, _ in finished.prompt_logprobs]
    elif shape.tgi:
        out["prefill"] = []
    return out


def wants_details(lmi: LmiRequest, shape: Shape) -> bool:
    return shape.details if lmi.parameters.details is None else lmi.parameters.details


def result(events: list[GenerationEvent], lmi: LmiRequest, prompt: str, shape: Shape = DJL) -> dict[str, Any]:
    """The non-streamed result of one prompt."""
    tokens = [e for e in events if isinstance(e, Token)]
    finished = next((e for e in events if isinstance(e, Finished)), None)
    text = "".join(t.text for t in tokens)
    if lmi.parameters.return_full_text:
        text = prompt + text
    out: dict[str, Any] = {"generated_text": text}
    if wants_details(lmi, shape) and finished is not None:
        info = details(finished, len(tokens), lmi, shape)
        info["tokens"] = [token_json(t, lmi, shape) for t in tokens]
        if shape.tgi and lmi.parameters.top_n_tokens:
            info["top_tokens"] = [_top_tokens(t) for t in tokens]
        out["details"] = info
    return out


async def lines(
    events: AsyncGenerator[GenerationEvent, None], lmi: LmiRequest, shape: Shape, dialect: errors.Dialect
) -> AsyncGenerator[dict[str, Any], None]:
    """One object per token; the last also has ``generated_text`` (and ``details`` when asked)."""
    texts: list[str] = [lmi.prompts[0]] if lmi.parameters.return_full_text else []
    held: Token | None = None  # the last token, written together with the Finished that follows it
    count = 0
    try:
        async for event in events:
            if isinstance(event, Token):
                count += 1
                texts.append(event.text)
                if event.last:
                    held = event
                    continue
                yield _line(event, count, lmi, shape)
            elif isinstance(event, Finished):
                line = _line(held, count, lmi, shape) if held is not None else {}
                if shape.tgi and held is None:
                    line = {"index": count, "token": None, "top_tokens": None}
                line["generated_text"] = "".join(texts)
                if wants_details(lmi, shape):
                    line["details"] = details(event, count, lmi, shape)
                    if shape.tgi:
                        line["details"].pop("prefill", None)  # TGI's stream details have none
                yield line
                return
    except ServiceError as exc:
        # Headers are sent: the error becomes the last object, in the route's shape.
        yield error_line(exc, "".join(texts), count, shape, dialect)


def _line(token: Token, index: int, lmi: LmiRequest, shape: Shape) -> dict[str, Any]:
    line: dict[str, Any] = {"token": token_json(token, lmi, shape)}
    if shape.tgi:
        top = _top_tokens(token) if lmi.parameters.top_n_tokens else None
        line = {"index": index, **line, "top_tokens": top, "generated_text": None, "details": None}
    return line


def error_line(
    exc: ServiceError, text: str, count: int, shape: Shape, dialect: errors.Dialect
) -> dict[str, Any]:
    """The last streamed object of a request that failed after its headers were sent."""
    if shape.tgi:
        return errors.body(exc, "tgi")
    return {
        "token": {"id": -1, "text": "", "log_prob": -1.0, "special_token": True},
        "generated_text": text,
        "details": {"finish_reason": "error", "generated_tokens": count},
        "error": errors.body(exc, dialect),
    }


# -- framings ------------------------------------------------------------------------------------


def dumps(obj: Any) -> bytes:
    """A JSON value as bytes; a string from a custom output formatter is written as it is."""
    return obj.encode() if isinstance(obj, str) else orjson.dumps(obj)


async def jsonlines(objects: AsyncGenerator[Any, None]) -> AsyncGenerator[bytes, None]:
    async for obj in objects:
        yield dumps(obj) + b"\n"


async def sse(objects: AsyncGenerator[Any, None]) -> AsyncGenerator[bytes, None]:
    """Server-sent events, as DJL's ``sse`` formatter and TGI write them: no ``[DONE]``."""
    async for obj in objects:
        yield b"data: " + dumps(obj) + b"\n\n"


Framing = tuple[Callable[[AsyncGenerator[Any, None]], AsyncGenerator[bytes, None]], str]
JSON_LINES: Framing = (jsonlines, "application/jsonlines")
SSE: Framing = (sse, "text/event-stream")
