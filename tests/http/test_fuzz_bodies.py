"""2,000 hostile bodies over every POST route (read from the app: a new route is fuzzed too),
in-process (real routes and middleware, a fake model): JSON of any shape (deep, lone surrogates, huge
ints, wrong types), JSON with raw invalid UTF-8 inside its strings, and non-JSON bytes. No body may get
a 5xx; every error is JSON; no request or operation that reaches the model fails to encode for the
worker socket (the fake model encodes it)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.routing import BaseRoute, Mount, Route

from tests.http.fakes import FakeModels, app, client, model, pool, worker


def post_routes(routes: Sequence[BaseRoute], prefix: str = "") -> list[str]:
    """Every POST path of ``routes`` (mounts walked), its path parameters filled with ``demo``: a
    route added later is fuzzed too."""
    paths = []
    for route in routes:
        if isinstance(route, Mount):
            paths += post_routes(route.routes, prefix + route.path)
        elif isinstance(route, Route) and "POST" in (route.methods or ()):
            paths.append(re.sub(r"\{[^}]*\}", "demo", prefix + route.path))
    return paths


MODELS = FakeModels(model("demo", pool("demo", worker(0))))
HTTP = client(MODELS)
ROUTES = post_routes(app(MODELS).routes)
CASES = 2_000
pytestmark = pytest.mark.slow  # about 1 min on the shared 2-core machine

text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=12)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4)
)
known = st.sampled_from(
    [
        "inputs",
        "parameters",
        "messages",
        "prompt",
        "stop",
        "max_tokens",
        "stream",
        "n",
        "seed",
        "model",
        "url",
        "input",
        "texts",
        "query",
        "documents",
        "text",
        "tokens",
        "system",
        "instructions",
    ]
)
shaped = st.dictionaries(known, values, max_size=5)  # close to a real request: reaches the validators
deep = st.integers(1, 3_000).map(lambda n: "[" * n + "]" * n)


def _encode(body: Any) -> bytes:
    return json.dumps(body).encode()  # ensure_ascii: lone surrogates become \\udcxx escapes


MARK = "@RAW@"
# Where a client's raw bytes land: a prompt, a chat message, a stop sequence, a field name, a URL.
raw_places = st.sampled_from(
    [
        {"inputs": MARK},
        {"prompt": MARK},
        {"prompt": ["ok", MARK]},
        {"messages": [{"role": "user", "content": MARK}]},
        {"inputs": "hi", "parameters": {"stop": [MARK]}},
        {"stop": MARK, "prompt": "hi"},
        {"model": MARK, "prompt": "hi"},
        {MARK: 1, "inputs": "hi"},
        {"url": MARK},
    ]
)
# ED A0 80 is an encoded surrogate (what CPython's json decodes from bytes with surrogatepass), then a
# lone continuation byte, an overlong "/", a byte UTF-8 never uses, and any short byte string.
hostile_bytes = st.sampled_from(
    [b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\x80", b"\xc0\xaf", b"\xff"]
) | st.binary(min_size=1, max_size=4)


def _raw_in_string(place: dict[str, Any], extra: dict[str, Any], raw: bytes) -> bytes:
    """A body with ``raw`` bytes inside one of its strings: JSON, except that it is not UTF-8."""
    return _encode({**extra, **place}).replace(MARK.encode(), b"x" + raw + b"y")


raw_strings = st.builds(_raw_in_string, raw_places, shaped, hostile_bytes)
bodies = st.one_of(
    shaped.map(_encode), values.map(_encode), deep.map(str.encode), st.binary(max_size=64), raw_strings
)
content_types = st.sampled_from(
    ["application/json", "text/plain", "application/octet-stream", "application/x-www-form-urlencoded", ""]
)


@given(route=st.sampled_from(ROUTES), body=bodies, content_type=content_types)
@settings(max_examples=CASES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_no_body_gets_a_5xx(route: str, body: bytes, content_type: str) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = HTTP.post(route, content=body, headers=headers)
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/json"
