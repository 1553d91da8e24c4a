"""The pooling routes over the fake service: each API's body in, the operation sent, its answer and its
errors out (OpenAI's /v1/embeddings, TEI's /embed, vLLM's /score, Jina/Cohere's and TEI's /rerank,
DJL's /invocations), and a model of another task refused with a 400 naming it."""

from __future__ import annotations

import base64
import struct
from typing import Any

import pytest

from lmi_core.operations import Embed, Score
from tests.http.fakes import FakeModels, client, model, pool, worker

EMBED = {"task": "text-embedding"}
RERANK = {"task": "rerank"}


def models(**options: dict[str, str]) -> FakeModels:
    """Served models by name, each with its options (a model named but given none generates)."""
    names = options or {"m": EMBED}
    return FakeModels(*(model(n, pool(n, worker(0))) for n in names), options=options or {"m": EMBED})


def sent(fake: FakeModels, name: str = "m") -> Any:
    (operation,) = fake.served_models[name].operations
    return operation


def test_embeddings_answer_openais_list_in_input_order_with_usage() -> None:
    fake = models()
    response = client(fake).post("/v1/embeddings", json={"input": ["ab", "cde"], "model": "m"})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list" and body["model"] == "m" and body["id"].startswith("embd-")
    assert body["data"] == [
        {"index": 0, "object": "embedding", "embedding": [0.0, 2.0, 0.5, 1.0]},
        {"index": 1, "object": "embedding", "embedding": [1.0, 3.0, 0.5, 1.0]},
    ]
    assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    assert sent(fake) == Embed(["ab", "cde"], param="input")


def test_base64_is_each_vectors_little_endian_float32_bytes() -> None:
    fake = models()
    body = {"input": "abc", "encoding_format": "base64", "dimensions": 3, "use_activation": False}
    (item,) = client(fake).post("/v1/embeddings", json=body).json()["data"]
    assert struct.unpack("<3f", base64.b64decode(item["embedding"])) == (0.0, 3.0, 0.5)
    assert sent(fake) == Embed(["abc"], normalize=False, dimensions=3)


@pytest.mark.parametrize(
    ("given", "inputs"),
    [
        ("one", ["one"]),
        (["a", "b"], ["a", "b"]),
        ([5, 6, 7], [[5, 6, 7]]),  # a list of ints is one input of token ids
        ([[5], [6, 7]], [[5], [6, 7]]),
    ],
)
def test_input_is_a_string_strings_token_ids_or_lists_of_them(given: Any, inputs: Any) -> None:
    fake = models()
    assert client(fake).post("/v1/embeddings", json={"input": given}).status_code == 200
    assert sent(fake).inputs == inputs


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "input"),
        ({"input": []}, "input"),
        ({"input": 5}, "input"),
        ({"input": [-1]}, "input"),
        ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
    ],
)
def test_bad_embedding_bodies_are_openai_400s_naming_the_field(body: dict[str, Any], param: str) -> None:
    response = client(models()).post("/v1/embeddings", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"].startswith(param)


def test_tei_embed_answers_bare_vectors_and_passes_normalize_truncate() -> None:
    fake = models()
    body = {"inputs": ["ab", "c"], "normalize": False, "truncate": True, "dimensions": 2}
    response = client(fake).post("/embed", json=body)
    assert response.status_code == 200 and response.json() == [[0.0, 2.0], [1.0, 1.0]]
    assert sent(fake) == Embed(["ab", "c"], truncate=True, normalize=False, dimensions=2, param="inputs")


def test_tei_errors_are_teis_shape() -> None:
    response = client(models()).post("/embed", json={"inputs": 3})
    assert response.status_code == 400
    assert response.json()["error_type"] == "Validation" and "inputs" in response.json()["error"]


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank"])
def test_rerank_sorts_by_relevance_and_cuts_to_top_n(path: str) -> None:
    fake = models(m=RERANK)
    documents = ["a", "abcd", "ab", "abc"]
    response = client(fake).post(path, json={"query": "q", "documents": documents, "top_n": 3})
    assert response.status_code == 200
    body = response.json()
    assert [r["index"] for r in body["results"]] == [1, 3, 2]
    assert [r["relevance_score"] for r in body["results"]] == [0.04, 0.03, 0.02]
    assert body["results"][0]["document"] == {"text": "abcd"}
    assert body["model"] == "m" and body["usage"] == {"prompt_tokens": 14, "total_tokens": 14}
    assert sent(fake) == Score([("q", d) for d in documents], param="documents")


def test_rerank_without_documents_in_the_answer_and_all_by_default() -> None:
    body = {"query": "q", "documents": ["a", "ab"], "return_documents": False}
    results = client(models(m=RERANK)).post("/rerank", json=body).json()["results"]
    assert results == [{"index": 1, "relevance_score": 0.02}, {"index": 0, "relevance_score": 0.01}]


def test_teis_rerank_body_gets_teis_bare_list() -> None:
    fake = models(m=RERANK)
    body = {"query": "q", "texts": ["a", "abc"], "return_text": True, "truncate": True}
    response = client(fake).post("/rerank", json=body)
    assert response.json() == [
        {"index": 1, "score": 0.03, "text": "abc"},
        {"index": 0, "score": 0.01, "text": "a"},
    ]
    assert sent(fake) == Score([("q", "a"), ("q", "abc")], truncate=True, param="texts")


@pytest.mark.parametrize(
    ("body", "pairs"),
    [
        ({"text_1": "q", "text_2": ["a", "bb"]}, [("q", "a"), ("q", "bb")]),
        ({"text_1": ["x", "y"], "text_2": ["a", "bb"]}, [("x", "a"), ("y", "bb")]),
        ({"text_1": "q", "text_2": "a"}, [("q", "a")]),
        ({"queries": "q", "documents": ["a"]}, [("q", "a")]),
    ],
)
def test_score_pairs_one_to_many_or_pair_by_pair(body: dict[str, Any], pairs: list[tuple[str, str]]) -> None:
    fake = models(m=RERANK)
    response = client(fake).post("/score", json=body)
    assert response.status_code == 200
    answer = response.json()
    assert answer["object"] == "list" and answer["model"] == "m"
    assert answer["data"] == [
        {"index": i, "object": "score", "score": len(b) / 100} for i, (_, b) in enumerate(pairs)
    ]
    assert sent(fake).pairs == pairs


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"text_1": ["x", "y"], "text_2": ["a", "b", "c"]}, "text_2"),
        ({"text_1": "x"}, "body"),  # a missing side: the body's validator names no one field
        ({"query": "q"}, "body"),
    ],
)
def test_bad_score_bodies_are_vllm_400s(body: dict[str, Any], param: str) -> None:
    response = client(models(m=RERANK)).post("/score", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "BadRequestError" and error["param"] == param


def test_djl_invocations_on_an_embedding_model_answer_bare_vectors() -> None:
    fake = models()
    http = client(fake)
    assert http.post("/invocations", json={"inputs": "ab"}).json() == [0.0, 2.0, 0.5, 1.0]
    both = http.post("/invocations", json={"inputs": ["ab", "c"]}).json()
    assert both == [[0.0, 2.0, 0.5, 1.0], [1.0, 1.0, 0.5, 1.0]]
    bad = http.post("/invocations", json={"inputs": [1]})
    assert bad.status_code == 400 and bad.json()["param"] == "inputs"


def test_each_model_card_names_its_task() -> None:
    fake = models(chat={}, m=EMBED, r=RERANK)
    cards = client(fake).get("/v1/models").json()["data"]
    assert {c["id"]: c["task"] for c in cards} == {
        "chat": "text-generation",
        "m": "text-embedding",
        "r": "rerank",
    }


@pytest.mark.parametrize(
    ("path", "body", "task"),
    [
        ("/v1/embeddings", {"model": "chat", "input": "x"}, "text-generation"),
        ("/rerank", {"model": "chat", "query": "q", "documents": ["d"]}, "text-generation"),
        ("/v1/embeddings", {"model": "r", "input": "x"}, "rerank"),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": "x"}]},
            "text-embedding",
        ),
        ("/v1/completions", {"model": "m", "prompt": "x"}, "text-embedding"),
    ],
)
def test_a_model_of_another_task_is_a_400_naming_its_task(path: str, body: dict[str, Any], task: str) -> None:
    response = client(models(chat={}, m=EMBED, r=RERANK)).post(path, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert f"option.task={task}" in error["message"] and error["param"] == "model"
