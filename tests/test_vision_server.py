"""``lmi serve`` with the tiny random LLaVA (built offline) beside the text demo model, through the
``openai`` SDK: an image chat answers what transformers' own ``generate`` answers on the same inputs,
deterministically, with the image tokens in ``usage.prompt_tokens``; the image count limit and a
text-only model are 400s naming the part; the Responses API's ``input_image`` takes the same path."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from PIL import Image

from lmi_core.demo_vision import IMAGE_TOKENS, build_demo_vision
from tests.conftest import ServerProcess, link_model, serving
from tests.lmi_hf.test_vision import PROMPT, reference

pytestmark = pytest.mark.slow

MAX_TOKENS = 8


def png(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (80, 60), color).save(out, format="PNG")
    return out.getvalue()


def b64(image: bytes) -> str:
    return base64.b64encode(image).decode()


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + b64(image)


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_vision(tmp_path_factory.mktemp("models") / "vision")


@pytest.fixture(scope="module")
def server(
    vision_model: Path, demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    store = tmp_path_factory.mktemp("store")
    link_model(vision_model, store / "vision", "engine=Python\nmaxWorkers=1\n")
    link_model(demo_model, store / "chat", "engine=Python\nmaxWorkers=1\n")
    env = {**os.environ, "SERVING_HEALTH_CHECK_INTERVAL": "0.5"}
    with serving(store, env) as process:
        yield process


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def image_messages(*urls: str) -> list[dict[str, object]]:
    text = PROMPT[0]["content"][0]  # the engine test's prompt: "what is this " then the image
    return [
        {"role": "user", "content": [text, *({"type": "image_url", "image_url": {"url": u}} for u in urls)]}
    ]


def test_an_image_chat_equals_transformers_generate(server: ServerProcess, vision_model: Path) -> None:
    from transformers import AutoTokenizer

    image = png((200, 30, 30))
    answers = [
        client(server).chat.completions.create(
            model="vision",
            messages=image_messages(data_url(image)),  # type: ignore[arg-type]
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        for _ in range(2)
    ]
    expected, prompt_tokens = reference(vision_model, image, MAX_TOKENS)
    tokenizer = AutoTokenizer.from_pretrained(vision_model)
    assert answers[0].choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert answers[1].choices[0].message.content == answers[0].choices[0].message.content  # deterministic
    usage = answers[0].usage
    assert usage is not None and usage.prompt_tokens == prompt_tokens
    assert usage.completion_tokens == MAX_TOKENS
    text_only = tokenizer.apply_chat_template(
        [{"role": "user", "content": "what is this "}], tokenize=True, add_generation_prompt=True
    )
    assert usage.prompt_tokens == len(text_only["input_ids"]) + IMAGE_TOKENS


def test_streamed_usage_counts_the_image_tokens(server: ServerProcess, vision_model: Path) -> None:
    image = png((10, 200, 30))
    chunks = list(
        client(server).chat.completions.create(
            model="vision",
            messages=image_messages(data_url(image)),  # type: ignore[arg-type]
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens == reference(vision_model, image, 1)[1]


def test_more_images_than_the_default_limit_is_a_400(server: ServerProcess) -> None:
    url = data_url(png((1, 2, 3)))
    with pytest.raises(openai.BadRequestError) as caught:
        client(server).chat.completions.create(
            model="vision",
            messages=image_messages(url, url),  # type: ignore[arg-type]
            max_tokens=2,
        )
    assert caught.value.body["param"] == "messages.0.content.2.image_url"  # type: ignore[index]


def test_an_image_to_the_text_model_is_a_400(server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(server).chat.completions.create(
            model="chat",
            messages=image_messages(data_url(png((1, 2, 3)))),  # type: ignore[arg-type]
            max_tokens=2,
        )
    assert caught.value.body["param"] == "messages.0.content.1.image_url"  # type: ignore[index]
    assert "text-only" in caught.value.body["message"]  # type: ignore[index]
    answer = client(server).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hello"}], max_tokens=2
    )
    assert answer.usage is not None and answer.usage.completion_tokens >= 1


def test_responses_input_image_takes_the_chat_path(server: ServerProcess, vision_model: Path) -> None:
    image = png((200, 30, 30))
    response = client(server).responses.create(
        model="vision",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "what is this "},
                    {"type": "input_image", "image_url": data_url(image), "detail": "auto"},
                ],
            }
        ],
        max_output_tokens=MAX_TOKENS,
        temperature=0,
        store=False,
    )
    assert response.usage is not None
    assert response.usage.input_tokens == reference(vision_model, image, 1)[1]


def test_anthropic_image_blocks_take_the_chat_path(server: ServerProcess, vision_model: Path) -> None:
    import anthropic

    image = png((200, 30, 30))
    sdk = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=120)
    blocks: list[dict[str, object]] = [
        {"type": "text", "text": "what is this "},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(image)}},
    ]
    message = sdk.messages.create(
        model="vision",
        max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": blocks}],  # type: ignore[typeddict-item]
        extra_body={"temperature": 0},  # this SDK leaves it out of its signature; the API takes it
    )
    chat = client(server).chat.completions.create(
        model="vision",
        messages=image_messages(data_url(image)),  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert message.usage.input_tokens == reference(vision_model, image, 1)[1]  # the image's tokens too
    text = "".join(block.text for block in message.content if block.type == "text")
    assert text == chat.choices[0].message.content
    loopback = {"type": "image", "source": {"type": "url", "url": "http://127.0.0.1:1/x.png"}}
    with pytest.raises(anthropic.BadRequestError) as caught:  # refused before any connection
        sdk.messages.create(
            model="vision",
            max_tokens=2,
            messages=[{"role": "user", "content": [loopback]}],  # type: ignore[list-item]
        )
    assert "fetches no image URLs" in caught.value.message  # option.allowed_media_domains is unset


def test_tokenize_and_count_tokens_count_the_image_tokens(server: ServerProcess, vision_model: Path) -> None:
    import anthropic
    import httpx

    image = png((200, 30, 30))
    expected = reference(vision_model, image, 1)[1]  # the generation's prompt tokens
    body = {"model": "vision", "messages": image_messages(data_url(image))}
    counted = httpx.post(f"{server.url}/tokenize", json=body, timeout=60)
    assert counted.status_code == 200, counted.text
    assert counted.json()["count"] == expected
    sdk = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=120)
    source = {"type": "base64", "media_type": "image/png", "data": b64(image)}
    blocks = [{"type": "text", "text": "what is this "}, {"type": "image", "source": source}]
    tokens = sdk.messages.count_tokens(model="vision", messages=[{"role": "user", "content": blocks}])  # type: ignore[list-item,misc]
    assert tokens.input_tokens == expected
    refused = httpx.post(f"{server.url}/tokenize", json={**body, "add_generation_prompt": False}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages.0.content.1.image_url"
    text_only = httpx.post(f"{server.url}/tokenize", json={**body, "model": "chat"}, timeout=60)
    assert text_only.status_code == 400 and "text-only" in text_only.json()["error"]["message"]
