"""Tenants at the HTTP edge, over a fake ``ModelService``: which tenant a request is for, its
``priority`` field, and a tenant's 429 in every route's shape."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lmi_core.errors import TenantBudgetError
from lmi_core.http.errors import render
from lmi_core.http.metrics import Metrics
from lmi_core.serving.tenants import key_digest
from tests.http.fakes import FakeModel, FakeModels, client, model, pool, worker

KEY_A = "secret-of-a"
FILE = f"""\
tenants:
  a:
    api_keys: ["{key_digest(KEY_A)}"]
    priority: [0, 10]
  batch: {{weight: 0.5}}
"""


def models(fake: FakeModel) -> FakeModels:
    found = FakeModels(model("m", pool("m", worker(0))))
    found.served_models["m"] = fake
    return found


def tenants_file(tmp_path: Path, text: str = FILE) -> str:
    path = tmp_path / "tenants.yaml"
    path.write_text(text)
    return str(path)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_tenants_key_names_its_tenant_and_other_keys_are_refused(tmp_path: Path) -> None:
    fake = FakeModel("m")
    http = client(models(fake), tenants_file=tenants_file(tmp_path), api_key="server-key")
    assert http.post("/invocations", json={"inputs": "x"}, headers=bearer(KEY_A)).status_code == 200
    assert http.post("/invocations", json={"inputs": "x"}, headers=bearer("server-key")).status_code == 200
    assert [c.tenant.name for c in fake.contexts if c is not None and c.tenant] == ["a", "default"]
    for headers in (bearer("wrong"), {}):
        refused = http.post("/v1/completions", json={"prompt": "x"}, headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    assert http.get("/ping").status_code == 200  # open paths stay open


def test_a_key_may_come_as_x_api_key_and_the_first_valid_key_counts(tmp_path: Path) -> None:
    fake = FakeModel("m")
    http = client(models(fake), tenants_file=tenants_file(tmp_path), api_key="server-key")
    assert http.post("/invocations", json={"inputs": "x"}, headers={"x-api-key": KEY_A}).status_code == 200
    both = {**bearer("server-key"), "x-api-key": KEY_A}
    assert http.post("/invocations", json={"inputs": "x"}, headers=both).status_code == 200
    wrong_bearer = {**bearer("wrong"), "x-api-key": KEY_A}
    assert http.post("/invocations", json={"inputs": "x"}, headers=wrong_bearer).status_code == 200
    assert [c.tenant.name for c in fake.contexts if c is not None and c.tenant] == ["a", "default", "a"]
    assert http.post("/invocations", json={"inputs": "x"}, headers={"x-api-key": "wrong"}).status_code == 401


def test_tenant_keys_alone_turn_the_key_check_on(tmp_path: Path) -> None:
    http = client(models(FakeModel("m")), tenants_file=tenants_file(tmp_path))
    assert http.post("/invocations", json={"inputs": "x"}).status_code == 401
    assert http.post("/invocations", json={"inputs": "x"}, headers=bearer(KEY_A)).status_code == 200


def test_with_no_key_needed_a_trusted_fairness_header_names_the_tenant(tmp_path: Path) -> None:
    fake = FakeModel("m")
    path = tenants_file(tmp_path, "tenants:\n  batch: {weight: 0.5}\n")
    header = {"x-llm-d-inference-fairness-id": "batch"}
    client(models(fake), tenants_file=path).post("/invocations", json={"inputs": "x"}, headers=header)
    client(models(fake), tenants_file=path, trust_tenant_header=True).post(
        "/invocations", json={"inputs": "x"}, headers=header
    )
    assert [c.tenant.name for c in fake.contexts if c is not None and c.tenant] == ["default", "batch"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "x", "priority": -3}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "priority": -3}),
        ("/invocations", {"inputs": "x", "parameters": {"priority": -3}}),
        ("/invocations", {"inputs": ["x", "y"], "parameters": {"priority": -3}}),
    ],
)
def test_the_priority_field_reaches_the_generation(path: str, body: dict[str, object]) -> None:
    fake = FakeModel("m")
    assert client(models(fake)).post(path, json=body).status_code == 200
    assert {r.priority for r in fake.requests} == {-3}  # the pool clamps it to the tenant's range


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "x", "priority": "high"}, "priority"),
        ("/v1/completions", {"prompt": "x", "priority": 2**40}, "priority"),
        ("/invocations", {"inputs": "x", "parameters": {"priority": 1.5}}, "parameters.priority"),
    ],
)
def test_a_bad_priority_is_a_400_naming_it(path: str, body: dict[str, object], param: str) -> None:
    response = client(models(FakeModel("m"))).post(path, json=body)
    assert response.status_code == 400
    found = response.json().get("error", response.json())
    assert found["param"] == param


BUDGET = TenantBudgetError("tenant 'a' is over its max_concurrency budget", "max_concurrency", 3)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
        ("/invocations", {"inputs": "x"}),
        ("/invocations", {"inputs": "x", "stream": True}),
        ("/v1/messages", {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}),
        ("/v1/responses", {"model": "m", "input": "x"}),
        ("/generate", {"inputs": "x"}),
    ],
)
def test_a_tenant_over_its_budget_gets_429_with_retry_after_in_the_routes_shape(
    path: str, body: dict[str, object]
) -> None:
    response = client(models(FakeModel("m", error=BUDGET))).post(path, json=body)
    assert response.status_code == 429 and response.headers["retry-after"] == "3"
    if path == "/generate":  # TGI's body: its 429 is "overloaded"
        assert response.json() == {"error": str(BUDGET), "error_type": "overloaded"}
    elif path == "/v1/messages":  # Anthropic's envelope has no param: the message names the budget
        assert response.json()["error"] == {"type": "rate_limit_error", "message": str(BUDGET)}
    elif path.startswith("/v1/"):
        error = response.json()["error"]
        assert (error["type"], error["code"], error["param"]) == ("rate_limit_error", 429, "max_concurrency")
    else:
        assert response.json() == {
            "code": 429,
            "type": "TooManyRequestsException",
            "message": str(BUDGET),
            "param": "max_concurrency",
        }


def test_the_vllm_dialect_keeps_retry_after_too() -> None:
    response = render(BUDGET, "vllm")
    assert response.status_code == 429 and response.headers["retry-after"] == "3"


def test_tenant_metrics_count_outcomes_tokens_and_the_queue_by_tenant() -> None:
    metrics = Metrics()
    metrics.tenant_queued("m1", "a", 1)
    metrics.tenant_queued("m2", "a", 1)
    metrics.tenant_queued("m1", "a", -1)
    metrics.tenant_finished("m1", "a", "served", 12, 30)
    metrics.tenant_finished("m2", "other", "rejected", 0, 0)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in family.samples
        if s.name.startswith("lmi_tenant_")
    }
    assert samples[("lmi_tenant_queued", (("tenant", "a"),))] == 1
    assert samples[("lmi_tenant_requests_total", (("outcome", "served"), ("tenant", "a")))] == 1
    assert samples[("lmi_tenant_requests_total", (("outcome", "rejected"), ("tenant", "other")))] == 1
    assert samples[("lmi_tenant_tokens_total", (("kind", "prompt"), ("tenant", "a")))] == 12
    assert samples[("lmi_tenant_tokens_total", (("kind", "generation"), ("tenant", "a")))] == 30
