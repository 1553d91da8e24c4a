"""Run inside the clients' virtual environment: a LangChain retrieval pipeline against lmi-core.

``python rag_client.py URL EMBED_MODEL RERANK_MODEL`` embeds the documents with langchain-openai's
``OpenAIEmbeddings``, keeps them in langchain-core's ``InMemoryVectorStore``, retrieves for a query,
and reranks what it retrieved with a ``BaseDocumentCompressor`` over the server's ``/v1/rerank``
(Jina's and Cohere's shape). It prints one JSON object (the retrieved and the reranked documents, the
query's vector); the test in the server's environment checks them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import httpx
from langchain_core.documents import Document
from langchain_core.documents.compressor import BaseDocumentCompressor
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_openai import OpenAIEmbeddings

DOCUMENTS = [
    "Paris is the capital and largest city of France.",
    "Berlin is the capital of Germany.",
    "The cat sat on the mat and slept all afternoon.",
    "Tokyo is the capital of Japan.",
    "Bread is baked from flour, water and yeast.",
]
QUERY = "Which city is the capital of France?"


class ServerReranker(BaseDocumentCompressor):
    """Orders documents by the server's ``/v1/rerank`` relevance, best first."""

    url: str
    model: str
    top_n: int = 2

    def compress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Any = None
    ) -> Sequence[Document]:
        body = {"model": self.model, "query": query, "documents": [d.page_content for d in documents]}
        response = httpx.post(f"{self.url}/v1/rerank", json={**body, "top_n": self.top_n}, timeout=60)
        response.raise_for_status()
        return [
            Document(documents[r["index"]].page_content, metadata={"relevance_score": r["relevance_score"]})
            for r in response.json()["results"]
        ]


def main() -> None:
    base, embed_model, rerank_model = sys.argv[1:4]
    # check_embedding_ctx_length=False: send the texts, not tiktoken's ids for OpenAI's own models.
    embeddings = OpenAIEmbeddings(
        model=embed_model, base_url=f"{base}/v1", api_key="unused", check_embedding_ctx_length=False
    )
    store = InMemoryVectorStore.from_texts(DOCUMENTS, embeddings)
    retrieved = store.as_retriever(search_kwargs={"k": 3}).invoke(QUERY)
    reranked = ServerReranker(url=base, model=rerank_model).compress_documents(retrieved, QUERY)
    print(
        json.dumps(
            {
                "retrieved": [d.page_content for d in retrieved],
                "reranked": [[d.page_content, d.metadata["relevance_score"]] for d in reranked],
                "query_vector": embeddings.embed_query(QUERY),
            }
        )
    )


if __name__ == "__main__":
    main()
