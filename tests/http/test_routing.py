"""``x-session-id`` in, ``x-lmi-worker`` out, over a fake ``ModelService`` (no worker processes).

The fake model appends a decision for worker 0 to the request's hint when it starts, as the pool
does; with real workers and real decisions: ``tests/test_routing_http.py``.
"""

from __future__ import annotations

from lmi_core.http.routing import response_headers
from lmi_core.serving.routing import Decision, RouteHint
from tests.http.fakes import FakeModels, client, model, pool, worker


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
    models = FakeModels(model("a", pool("a", worker(0))))
    api = client(models)
    body = {"inputs": "hi"}
    api.post("/invocations", json=body, headers={"x-session-id": "s1"})
    api.post("/invocations", json=body, headers={"X-Amzn-SageMaker-Session-Id": "s2"})
    api.post("/invocations", json=body)
    hints = models.served_models["a"].hints
    assert [h.session_id if h is not None else "no hint" for h in hints] == ["s1", "s2", None]


def test_headers_list_each_worker_once_and_name_the_worker_a_session_left() -> None:
    hint = RouteHint("s", [Decision(1, "load", moved_from=0), Decision(2, "load"), Decision(1, "session")])
    assert response_headers(hint) == [(b"x-lmi-worker", b"1,2"), (b"x-lmi-session-moved", b"0")]
    assert response_headers(RouteHint("s")) == []
