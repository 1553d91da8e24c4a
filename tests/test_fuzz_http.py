"""Fuzz the HTTP API from its own OpenAPI document (schemathesis) against a live server.

Valid and invalid requests alike must never get a 5xx; invalid ones must be refused (4xx); every
status, content type and JSON body must be one the document declares.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from lmi_core.http import anthropic_api, lmi_api, openai_api, openapi, responses_api
from lmi_core.http.openapi import build_spec
from tests.conftest import ServerProcess

pytestmark = pytest.mark.slow

KEY = "fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHECKS = [
    not_a_server_error,
    negative_data_rejection,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[ServerProcess]:
    # A 32-token context bounds every generation the fuzzer asks for (chats without max_tokens).
    env = {**os.environ, "OPTION_MAX_MODEL_LEN": "32", "SERVING_API_KEY": KEY}
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    server = ServerProcess(["--model-dir", str(demo_model), "--model-name", "demo"], env, log)
    server.wait_ready()
    yield server
    server.stop()


# Built from the same document the server serves (test_the_document_is_served); schemathesis's own
# pytest integration does not run under pytest 9, so each operation is a hypothesis test here.
SCHEMA = schemathesis.openapi.from_dict(build_spec())
OPERATIONS = {op.label: op for op in (result.ok() for result in SCHEMA.get_all_operations())}


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_api_answers_bad_input_with_4xx_and_never_5xx(server: ServerProcess, label: str) -> None:
    operation = OPERATIONS[label]
    # The key is fixed: requests without it are refused before they could reach a handler.
    cases = st.one_of(*(operation.as_strategy(mode, headers=AUTH) for mode in GenerationMode))

    @given(case=cases)
    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=server.url, checks=CHECKS, timeout=60)

    fuzz()


def test_the_document_describes_every_route() -> None:
    paths = set(build_spec()["paths"])
    routes = [
        *lmi_api.routes,
        *openai_api.routes,
        *responses_api.routes,
        *anthropic_api.routes,
        *openapi.routes,
    ]
    undocumented = {r.path.replace(":path}", "}") for r in routes} - paths
    assert not undocumented and "/metrics" in paths


def test_the_document_is_served(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/openapi.json", headers=AUTH).json() == build_spec()
