"""A tiny random LLaVA built offline: a CLIP vision tower over the demo Llama (``lmi_core.demo_model``).

No hub: the language model and its tokenizer are the demo model's, with one ``<image>`` token added;
the vision tower (56-pixel images, 14-pixel patches: 16 patches, so 16 image tokens per image with
the CLS feature dropped) and the projector are random (seeded). A ``LlavaProcessor`` (CLIP's image
processor) and a chat template that writes ``<image>`` for each image part are saved beside it, so
``AutoProcessor`` and ``AutoModelForImageTextToText`` load the directory. Shapes and the whole image
path, in seconds; the answers mean nothing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from lmi_core.demo_model import build_demo_model

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 56
PATCH_SIZE = 14
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # per image: one per patch (the CLS feature is dropped)
# The demo template with content parts: text as it is, an image part as the processor's placeholder.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}" + IMAGE_TOKEN + "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_demo_vision(path: str | Path, *, seed: int = 0) -> Path:
    """Write a random LLaVA, its processor and a ``serving.properties`` into ``path``."""
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        base = build_demo_model(scratch, seed=seed)
        tokenizer = AutoTokenizer.from_pretrained(base)
        text_config = LlamaConfig.from_pretrained(base)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    text_config.vocab_size = len(tokenizer)
    vision_config = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=64,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.get_vocab()[IMAGE_TOKEN],
        vision_feature_select_strategy="default",  # drop the CLS feature: one token per patch
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # as the demo Llama: a wide logit spread keeps greedy choices stable
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(out, safe_serialization=True)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS feature, dropped by the strategy above
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    (out / "serving.properties").write_text(
        "# lmi-core demo vision model: a tiny random LLaVA built offline by `lmi demo-model --kind vision`.\n"
        "engine=Python\n"
        "option.max_rolling_batch_size=32\n"
    )
    return out
