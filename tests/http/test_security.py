"""Access control on the real app over a fake ``ModelService``: API key, listener split, CORS."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from lmi_core.http.security import ListenerFilter, is_management_path
from tests.http.fakes import FakeModels, app, client, model, pool, worker

KEY = "s3cret"


def models() -> FakeModels:
    return FakeModels(model("a", pool("a", worker(0))))


def test_api_key_guards_every_route_but_ping() -> None:
    http = client(models(), api_key=KEY)
    assert http.get("/ping").status_code == 200
    for path in ("/models", "/metrics", "/openapi.json"):
        refused = http.get(path)
        assert refused.status_code == 401, path
        assert refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["type"] == "AuthenticationException"  # DJL's shape off /v1
    assert http.post("/invocations", json={"inputs": "x"}).status_code == 401
    assert http.get("/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert http.get("/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert http.get("/models", headers={"Authorization": KEY}).status_code == 401  # not a bearer token


def test_api_key_errors_on_v1_are_openai_shaped() -> None:
    refused = client(models(), api_key=KEY).get("/v1/models")
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == 401 and "API key" in refused.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "management"),
    [
        ("/models", True),
        ("/models/a", True),
        ("/models/a/invoke", False),  # inference on a named model
        ("/metrics", True),
        ("/server/logging", True),
        ("/ping", False),
        ("/invocations", False),
        ("/predictions/a", False),
        ("/v1/models", False),
        ("/modelsx", False),
    ],
)
def test_is_management_path(path: str, management: bool) -> None:
    assert is_management_path(path) is management


def test_each_listener_serves_only_its_routes_and_both_serve_ping() -> None:
    inner = app(models())
    management = TestClient(ListenerFilter(inner, management=True))
    inference = TestClient(ListenerFilter(inner, management=False))
    assert management.get("/models").status_code == 200
    assert management.get("/metrics").status_code == 200
    refused = management.post("/invocations", json={"inputs": "x"})
    assert refused.status_code == 404 and "management address" in refused.json()["message"]
    assert management.get("/v1/models").json()["error"]["code"] == 404  # OpenAI's shape on /v1
    assert inference.get("/models").status_code == 404
    assert inference.get("/metrics").status_code == 404
    assert inference.post("/models/a/invoke", json={"inputs": "x"}).status_code == 200
    for http in (management, inference):
        assert http.get("/ping").status_code == 200
        assert http.get("/openapi.json").status_code == 200


def test_cors_preflight_is_answered_before_the_key_check() -> None:
    http = client(models(), api_key=KEY, cors_allowed_origins="https://ui.example, https://b.example")
    preflight = {"Origin": "https://ui.example", "Access-Control-Request-Method": "POST"}
    answer = http.options("/v1/completions", headers=preflight)
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == "https://ui.example"
    other = http.options("/v1/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    auth = {"Origin": "https://b.example", "Authorization": f"Bearer {KEY}"}
    response = http.get("/v1/models", headers=auth)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://b.example"
    assert "x-request-id" in response.headers["access-control-expose-headers"].lower()


def test_cors_is_off_unless_origins_are_configured() -> None:
    response = client(models()).get("/ping", headers={"Origin": "https://ui.example"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
