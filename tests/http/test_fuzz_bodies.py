"""2,000 hostile bodies over every route that reads one, in-process (real routes and middleware,
a fake model): JSON of any shape (deep, lone surrogates, huge ints, wrong types) and non-JSON bytes.
No body may get a 5xx; every error is JSON."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.http.fakes import FakeModels, client, model, pool, worker

ROUTES = [
    "/invocations",
    "/predictions/demo",
    "/v1/completions",
    "/v1/chat/completions",
    "/models",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
]
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
    ]
)
shaped = st.dictionaries(known, values, max_size=5)  # close to a real request: reaches the validators
deep = st.integers(1, 3_000).map(lambda n: "[" * n + "]" * n)


def _encode(body: Any) -> bytes:
    return json.dumps(body).encode()  # ensure_ascii: lone surrogates become \\udcxx escapes


bodies = st.one_of(shaped.map(_encode), values.map(_encode), deep.map(str.encode), st.binary(max_size=64))
content_types = st.sampled_from(["application/json", "text/plain", "application/octet-stream", ""])

HTTP = client(FakeModels(model("demo", pool("demo", worker(0)))))


@given(route=st.sampled_from(ROUTES), body=bodies, content_type=content_types)
@settings(max_examples=CASES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_no_body_gets_a_5xx(route: str, body: bytes, content_type: str) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = HTTP.post(route, content=body, headers=headers)
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/json"
