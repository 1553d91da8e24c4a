"""A LangChain retrieval pipeline against lmi-core end to end: embed documents with langchain-openai,
store them in memory, retrieve, rerank (``tests/clients/rag_client.py``, run in the clients' own
environment), against one server with an embedding model and a reranker."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from lmi_core.demo_encoder import build_demo_encoder
from tests.clients.test_clients import CLIENTS_VENV, client, run_client
from tests.conftest import ServerProcess, link_model
from tests.lmi_hf.test_pooling import minilm_dir

pytestmark = [pytest.mark.clients, pytest.mark.slow, pytest.mark.timeout(900)]
QUERY = "Which city is the capital of France?"  # rag_client.py's


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    store = tmp_path_factory.mktemp("rag")
    link_model(Path(minilm_dir()), store / "embed", "option.task=text-embedding\n")
    build_demo_encoder(store / "rerank", "reranker")
    process = ServerProcess(["--model-dir", str(store)], dict(os.environ), store / "server.log")
    try:
        process.wait_ready(timeout=180)
        yield process
    finally:
        process.stop()


def test_langchain_embeds_retrieves_and_reranks(server: ServerProcess, tmp_path: Path) -> None:
    script = Path(__file__).with_name("rag_client.py")
    printed = run_client([client(CLIENTS_VENV, "python"), script, server.url, "embed", "rerank"], tmp_path)
    answer = json.loads(printed.strip().splitlines()[-1])
    assert answer["retrieved"][0] == "Paris is the capital and largest city of France."
    assert len(answer["retrieved"]) == 3
    # The reranker's order is the server's /rerank order of what was retrieved, cut to top_n.
    body = {"model": "rerank", "query": QUERY, "documents": answer["retrieved"], "top_n": 2}
    results = httpx.post(f"{server.url}/rerank", json=body, timeout=60).json()["results"]
    assert answer["reranked"] == [[answer["retrieved"][r["index"]], r["relevance_score"]] for r in results]
    # The vector LangChain got (the SDK's base64, decoded) is the server's float one.
    direct = httpx.post(f"{server.url}/v1/embeddings", json={"model": "embed", "input": QUERY}, timeout=60)
    vector = direct.json()["data"][0]["embedding"]
    assert torch.allclose(torch.tensor(answer["query_vector"]), torch.tensor(vector), atol=1e-6)
