"""The HF engine on an image-text-to-text model (the tiny random LLaVA built offline): an image
request's tokens equal transformers' own ``generate`` on the same inputs, its prompt counts the image
tokens, text-only requests keep the text path, and image and text requests decode in one batch."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from lmi_core.demo_vision import IMAGE_TOKENS, build_demo_vision
from lmi_core.engine import GenerationRequest, SamplingParams, WorkerContext
from lmi_core.errors import BadRequestError
from lmi_hf.engine import HFEngine
from lmi_hf.plugin import load_engine
from tests.lmi_hf.engines import run_request

PROMPT = [{"role": "user", "content": [{"type": "text", "text": "what is this "}, {"type": "image"}]}]


def png(color: tuple[int, int, int], size: tuple[int, int] = (80, 60)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_vision(tmp_path_factory.mktemp("models") / "vision")


def engine_for(model: Path, options: dict[str, str] | None = None) -> HFEngine:
    context = WorkerContext(
        model_id=str(model), model_dir=str(model), backend="hf", options=options or {}, max_batch_size=4
    )
    engine = load_engine(context)
    assert isinstance(engine, HFEngine)
    return engine


@pytest.fixture(scope="module")
def engine(vision_model: Path) -> Iterator[HFEngine]:
    engine = engine_for(vision_model)
    yield engine
    engine.shutdown()


def image_request(images: list[bytes], max_new_tokens: int = 8, messages: Any = None) -> GenerationRequest:
    params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=False, ignore_eos=True)
    return GenerationRequest(uuid.uuid4().hex, messages=messages or PROMPT, params=params, images=images)


def reference(model_dir: Path, image: bytes, max_new_tokens: int) -> tuple[list[int], int]:
    """transformers' own greedy generate on the same prompt and image: its new tokens, its prompt length."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = processor.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    inputs = processor(
        text=[text], images=[Image.open(io.BytesIO(image)).convert("RGB")], return_tensors="pt"
    )
    out = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens
    )
    prompt = int(inputs["input_ids"].shape[1])
    return [int(t) for t in out[0, prompt:]], prompt


def test_loads_as_an_image_model(engine: HFEngine) -> None:
    assert engine.images is not None
    assert engine.max_images == 1  # the default for an image model


def test_image_request_matches_transformers_generate(vision_model: Path, engine: HFEngine) -> None:
    image = png((200, 30, 30))
    tokens, finished = asyncio.run(run_request(engine, image_request([image])))
    expected, prompt_tokens = reference(vision_model, image, 8)
    assert [t.id for t in tokens] == expected
    assert finished.prompt_tokens == prompt_tokens
    text_only = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "what is this "}], tokenize=True, add_generation_prompt=True
    )
    # The image part is 16 image tokens (56-pixel image, 14-pixel patches) in place of nothing.
    assert finished.prompt_tokens == len(text_only["input_ids"]) + IMAGE_TOKENS


def test_images_and_text_decode_together(engine: HFEngine) -> None:
    """Concurrent image and text requests give what each gives alone (continuous batching kept)."""
    red, blue = png((200, 30, 30)), png((10, 20, 250), size=(40, 90))
    text = GenerationRequest(
        "t",
        messages=[{"role": "user", "content": "hello world"}],
        params=SamplingParams(max_new_tokens=8, do_sample=False, ignore_eos=True),
    )

    async def together() -> list[list[int]]:
        results = await asyncio.gather(
            run_request(engine, image_request([red])),
            run_request(engine, image_request([blue])),
            run_request(engine, text),
        )
        return [[t.id for t in tokens] for tokens, _ in results]

    alone = [
        [t.id for t in asyncio.run(run_request(engine, r))[0]]
        for r in (image_request([red]), image_request([blue]), text)
    ]
    assert asyncio.run(together()) == alone
    assert alone[0] != alone[1]  # the image is read: two images, two answers


def test_more_images_than_the_limit_is_a_400(engine: HFEngine) -> None:
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}]
    with pytest.raises(BadRequestError) as caught:
        asyncio.run(run_request(engine, image_request([png((1, 2, 3))] * 2, messages=two)))
    assert caught.value.param == "messages"


def test_limit_option_allows_more(vision_model: Path) -> None:
    engine = engine_for(vision_model, {"limit_mm_per_prompt": '{"image": 2}'})
    try:
        assert engine.max_images == 2
        two = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}],
            }
        ]
        _, finished = asyncio.run(run_request(engine, image_request([png((1, 2, 3))] * 2, 2, two)))
        assert finished.generated_tokens == 2
    finally:
        engine.shutdown()


def test_placeholders_that_do_not_match_the_images_are_a_400(engine: HFEngine) -> None:
    text_only = [{"role": "user", "content": "no image part"}]
    with pytest.raises(BadRequestError) as caught:
        asyncio.run(run_request(engine, image_request([png((1, 2, 3))], messages=text_only)))
    assert caught.value.param == "messages"


def test_a_text_model_refuses_images(demo_model: Path) -> None:
    engine = engine_for(demo_model)
    try:
        assert engine.max_images == 0
        with pytest.raises(BadRequestError) as caught:
            asyncio.run(run_request(engine, image_request([png((1, 2, 3))])))
        assert caught.value.param == "messages"
    finally:
        engine.shutdown()
