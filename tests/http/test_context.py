"""The request context: ``x-session-id`` and ``x-request-timeout`` in, ``x-lmi-worker`` out, over a
fake ``ModelService`` (no worker processes).

The fake model appends a decision for worker 0 to the request's context when it starts, as the pool
does; with real workers and real decisions: ``tests/test_routing_http.py``.
"""

from __future__ import annotations

import math

import pytest

from lmi_core.errors import BadRequestError
from lmi_core.http.context import parse_context, response_headers
from lmi_core.serving.routing import Decision, RequestContext
from tests.http.fakes import FakeModels, client, model, pool, worker

EMBED = {"task": "text-embedding"}


def test_every_inference_response_names_its_worker_streamed_or_not() -> None:
    models = FakeModels(model("a", pool("a", worker(0))))
    api = client(models)
    lmi = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
    assert api.post("/invocations", json=lmi).headers["x-lmi-worker"] == "0"
    with api.stream("POST", "/invocations", json={**lmi, "stream": True}) as response:
        assert response.headers["x-lmi-worker"] == "0"
    chat = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    with api.stream("POST", "/v1/chat/completions", json=chat) as response:
        assert response.headers["x-lmi-worker"] == "0"
    assert "x-lmi-worker" not in api.get("/ping").headers  # not an inference response


def test_the_session_header_reaches_the_model() -> None:
    # Without DJL's session lifecycle, SageMaker's header only routes, as lmi's own does.
    models = FakeModels(model("a", pool("a", worker(0))))
    models.served_models["a"].config.options["enable_stateful_sessions"] = "false"
    api = client(models)
    body = {"inputs": "hi"}
    api.post("/invocations", json=body, headers={"x-session-id": "s1"})
    api.post("/invocations", json=body, headers={"X-Amzn-SageMaker-Session-Id": "s2"})
    api.post("/invocations", json=body)
    contexts = models.served_models["a"].contexts
    assert [c.session_id if c is not None else "no context" for c in contexts] == ["s1", "s2", None]


def test_with_djls_sessions_an_unknown_sagemaker_session_never_reaches_the_model() -> None:
    models = FakeModels(model("a", pool("a", worker(0))))
    response = client(models).post(
        "/invocations", json={"inputs": "hi"}, headers={"X-Amzn-SageMaker-Session-Id": "s2"}
    )
    assert response.status_code == 424 and response.json()["type"] == "SessionException"
    assert models.served_models["a"].contexts == []


def test_headers_list_each_worker_once_and_name_the_worker_a_session_left() -> None:
    served = [Decision(1, "load", moved_from=0), Decision(2, "load"), Decision(1, "session")]
    context = RequestContext("s", served=served)
    assert response_headers(context) == [(b"x-lmi-worker", b"1,2"), (b"x-lmi-session-moved", b"0")]
    assert response_headers(RequestContext("s")) == []


def test_the_context_holds_the_session_and_the_client_s_timeout() -> None:
    assert parse_context({}) == RequestContext()
    headers = {b"x-amzn-sagemaker-session-id": b"s2", b"x-session-id": b"s1", b"x-request-timeout": b"2.5"}
    assert parse_context(headers) == RequestContext("s1", 2.5)
    for bad in (b"0", b"-1", b"inf", b"nan", b"soon", b""):
        with pytest.raises(BadRequestError) as info:
            parse_context({b"x-request-timeout": bad})
        assert info.value.param == "x-request-timeout"


def test_one_context_per_request_reaches_every_generation_and_labels_its_metrics() -> None:
    models = FakeModels(model("a", pool("a", worker(0))))
    api = client(models)
    body = {"prompt": "hi", "n": 2, "max_tokens": 2}
    assert api.post("/v1/completions", json=body, headers={"x-request-timeout": "30"}).status_code == 200
    first, second = models.served_models["a"].contexts
    assert first is second and first is not None and first.client_timeout == 30.0 and first.model == "a"
    assert len(first.served) == 2  # each choice's dispatch
    bad = api.post("/v1/completions", json=body, headers={"x-request-timeout": "-1"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-request-timeout"
    assert "x-request-id" in bad.headers
    metrics = api.get("/metrics").text
    assert 'lmi_http_requests_total{model="a",route="/v1/completions",status="200"} 1.0' in metrics
    assert 'lmi_http_requests_total{model="",route="unmatched",status="400"} 1.0' in metrics


def test_keep_alive_reaches_the_model_from_every_body_that_names_a_model_and_a_bad_one_is_a_400() -> None:
    models = FakeModels(model("a", pool("a", worker(0))))
    api = client(models)
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert api.post("/v1/completions", json={"prompt": "hi", "keep_alive": "5m"}).status_code == 200
    assert api.post("/v1/chat/completions", json={**chat, "keep_alive": 0}).status_code == 200
    assert api.post("/invocations", json={**chat, "keep_alive": -1}).status_code == 200  # chat, DJL's route
    lmi = {"inputs": "hi", "parameters": {"keep_alive": "10s"}}
    assert api.post("/invocations", json=lmi).status_code == 200
    assert api.post("/invocations", json={"inputs": "hi"}).status_code == 200
    kept = [c.keep_alive if c is not None else "no context" for c in models.served_models["a"].contexts]
    assert kept == [300.0, 0.0, math.inf, 10.0, None]
    bad = api.post("/v1/completions", json={"prompt": "hi", "keep_alive": "soon"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "keep_alive"
    bad = api.post("/invocations", json={"inputs": "hi", "parameters": {"keep_alive": True}})
    assert bad.status_code == 400 and bad.json()["param"] == "parameters.keep_alive"
    lmi_on_openai = api.post("/v1/completions", json={"prompt": "hi", "keep_alive": "1m"})
    assert "x-lmi-ignored-fields" not in lmi_on_openai.headers  # a known field, not an ignored one


def test_keep_alive_reaches_the_model_from_the_responses_messages_and_pooling_bodies() -> None:
    models = FakeModels(
        model("a", pool("a", worker(0))), model("e", pool("e", worker(0))), options={"e": EMBED}
    )
    api = client(models)
    user = [{"role": "user", "content": "hi"}]
    responses = api.post("/v1/responses", json={"model": "a", "input": "hi", "keep_alive": "2m"})
    assert responses.status_code == 200, responses.text
    messages = {"model": "a", "max_tokens": 4, "messages": user, "keep_alive": 0}
    assert api.post("/v1/messages", json=messages).status_code == 200
    kept = [c.keep_alive if c is not None else "no context" for c in models.served_models["a"].contexts]
    assert kept == [120.0, 0.0]
    for path, body in [
        ("/v1/embeddings", {"model": "e", "input": "hi", "keep_alive": -1}),
        ("/embed", {"model": "e", "inputs": "hi", "keep_alive": "1h"}),
        ("/score", {"model": "e", "text_1": "a", "text_2": "b", "keep_alive": 5}),
        ("/rerank", {"model": "e", "query": "a", "documents": ["b"], "keep_alive": "30s"}),
    ]:
        response = api.post(path, json=body)
        assert response.status_code == 200 and "x-lmi-ignored-fields" not in response.headers, response.text
    contexts = models.served_models["e"].operation_contexts
    kept = [c.keep_alive if c is not None else "no context" for c in contexts]
    assert kept == [math.inf, 3600.0, 5.0, 30.0]
    bad = api.post("/v1/embeddings", json={"model": "e", "input": "hi", "keep_alive": "later"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "keep_alive", bad.text
