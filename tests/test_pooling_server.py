"""One ``lmi serve`` with a chat model, an embedding model and a reranker (a model store directory),
each with its own workers, through real clients: the ``openai`` SDK's ``embeddings.create`` (float and
base64, ``dimensions``), the pooling routes, DJL's ``/invocations``, auth and the per-model metrics."""

from __future__ import annotations

import base64
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

from lmi_core.demo_encoder import build_demo_encoder
from tests.conftest import ServerProcess, link_model
from tests.lmi_hf.test_pooling import minilm_dir

pytestmark = pytest.mark.slow

KEY = "pooling-test-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
DOCUMENTS = ["Berlin is the capital of Germany.", "Paris is the capital of France.", "Cats sleep a lot."]
QUERY = "What is the capital of France?"


@pytest.fixture(scope="module")
def server(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    store = tmp_path_factory.mktemp("store")
    link_model(demo_model, store / "chat", "engine=Python\n")
    link_model(Path(minilm_dir()), store / "embed", "option.task=text-embedding\nmaxWorkers=1\n")
    build_demo_encoder(store / "rerank", "reranker")
    env = {**os.environ, "SERVING_HEALTH_CHECK_INTERVAL": "0.5", "SERVING_API_KEY": KEY}
    process = ServerProcess(["--model-dir", str(store)], env, store / "server.log")
    try:
        process.wait_ready(timeout=180)
        yield process
    finally:
        process.stop()
        if sys.exc_info()[0] is None:
            shutil.rmtree(store, ignore_errors=True)


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_three_models_each_with_its_task_and_workers(server: ServerProcess) -> None:
    cards = client(server).models.list().data
    assert {c.id: c.model_extra["task"] for c in cards if c.model_extra} == {
        "chat": "text-generation",
        "embed": "text-embedding",
        "rerank": "rerank",
    }
    described = httpx.get(f"{server.url}/models/embed", headers=HEADERS, timeout=10).json()
    assert described[0]["models"][0]["workerGroups"][0]["workers"], described
    reply = client(server).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert reply.choices[0].message.content is not None


def test_the_sdk_embeds_as_float_and_base64_matching_sentence_transformers(server: ServerProcess) -> None:
    from sentence_transformers import SentenceTransformer

    texts = ["a", "b"]
    sdk = client(server)
    floats = sdk.embeddings.create(model="embed", input=texts, encoding_format="float")
    # Asked for base64, the SDK hands the strings over; unasked, it asks for base64 and decodes them.
    packed = sdk.embeddings.create(model="embed", input=texts, encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(str(d.embedding)), dtype="<f4").tolist() for d in packed.data]
    default = [d.embedding for d in sdk.embeddings.create(model="embed", input=texts).data]
    for rows in ([d.embedding for d in floats.data], decoded, default):
        vectors = torch.tensor(rows)
        assert vectors.shape == (2, 384)
        assert torch.allclose(vectors.norm(dim=-1), torch.ones(2), atol=1e-5)
        assert torch.allclose(vectors, torch.tensor([d.embedding for d in floats.data]))
    model = SentenceTransformer(minilm_dir(), device="cpu")
    reference = model.encode(texts, convert_to_tensor=True)
    assert torch.allclose(torch.tensor([d.embedding for d in floats.data]), reference, atol=1e-4)
    tokens = sum(len(model.tokenizer(t)["input_ids"]) for t in texts)
    assert floats.usage.prompt_tokens == tokens == floats.usage.total_tokens
    cut = sdk.embeddings.create(model="embed", input="a", dimensions=64)
    vector = torch.tensor(cut.data[0].embedding)
    assert vector.shape == (64,) and abs(float(vector.norm()) - 1) < 1e-5


def test_rerank_by_a_cross_encoder_and_by_the_embedding_models_cosine(server: ServerProcess) -> None:
    body = {"query": QUERY, "documents": DOCUMENTS, "top_n": 2}
    by_embeddings = httpx.post(f"{server.url}/v1/rerank", json={**body, "model": "embed"}, headers=HEADERS)
    assert by_embeddings.status_code == 200, by_embeddings.text
    results = by_embeddings.json()["results"]
    assert results[0]["index"] == 1 and len(results) == 2
    by_cross_encoder = httpx.post(f"{server.url}/rerank", json={**body, "model": "rerank"}, headers=HEADERS)
    scores = [r["relevance_score"] for r in by_cross_encoder.json()["results"]]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)
    score = httpx.post(
        f"{server.url}/score", json={"model": "rerank", "text_1": QUERY, "text_2": DOCUMENTS}, headers=HEADERS
    ).json()
    assert sorted(d["score"] for d in score["data"])[::-1][:2] == scores


def test_djl_and_tei_shapes_answer_bare_vectors(server: ServerProcess) -> None:
    djl = httpx.post(
        f"{server.url}/invocations?model_name=embed", json={"inputs": ["a", "b"]}, headers=HEADERS, timeout=30
    )
    assert djl.status_code == 200 and [len(v) for v in djl.json()] == [384, 384]
    tei = httpx.post(
        f"{server.url}/embed", json={"model": "embed", "inputs": "a"}, headers=HEADERS, timeout=30
    )
    assert tei.status_code == 200 and len(tei.json()) == 1
    assert torch.allclose(torch.tensor(tei.json()[0]), torch.tensor(djl.json()[0]), atol=1e-6)


def test_a_model_of_another_task_and_a_missing_key_are_refused(server: ServerProcess) -> None:
    sdk = client(server)
    with pytest.raises(openai.BadRequestError, match=r"option\.task=text-generation"):
        sdk.embeddings.create(model="chat", input="x")
    with pytest.raises(openai.BadRequestError, match=r"option\.task=text-embedding"):
        sdk.chat.completions.create(model="embed", messages=[{"role": "user", "content": "x"}])
    anonymous = httpx.post(f"{server.url}/v1/embeddings", json={"model": "embed", "input": "x"}, timeout=10)
    assert anonymous.status_code == 401


def test_pooling_requests_are_counted_by_model_and_route(server: ServerProcess) -> None:
    client(server).embeddings.create(model="embed", input="counted")
    metrics = httpx.get(f"{server.url}/metrics", headers=HEADERS, timeout=10).text
    assert 'lmi_http_requests_total{model="embed",route="/v1/embeddings",status="200"}' in metrics
