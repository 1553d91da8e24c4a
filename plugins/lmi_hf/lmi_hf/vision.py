"""Image-text-to-text models on the HF engine: loading one (``AutoProcessor`` and
``AutoModelForImageTextToText``; ``load_generator`` chooses it or a causal LM, in either mode) and
encoding a request with images.

Invariant: an image request's prompt ids are the processor's, its image placeholders expanded to
the model's image tokens, so ``len(ids)`` (the usage's ``prompt_tokens``) counts them; its pixel
values go to the prefill forward only (decode steps read the KV cache), so the request then decodes
in the running batch like any other. Text-only requests to the same model take the text path
(``lmi_core.prompts``) unchanged.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch

from lmi_core.engine import GenerationRequest, WorkerContext
from lmi_core.errors import BadRequestError
from lmi_core.option_values import image_limit
from lmi_core.prompts import chat_text
from lmi_hf.loading import load_model, load_with


def reads_images(context: WorkerContext) -> bool:
    """Whether the model's config is one of transformers' image-text-to-text models."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    config = AutoConfig.from_pretrained(context.model_id, trust_remote_code=context.trust_remote_code)
    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


@dataclass(frozen=True)
class ImageInputs:
    """A model's processor and the images one prompt may hold (``option.limit_mm_per_prompt``, 1 by
    default)."""

    processor: Any
    max_images: int

    def encode(self, request: GenerationRequest, tokenizer: Any) -> tuple[list[int], str, dict[str, Any]]:
        """The prompt ids (image tokens expanded), its text, and the forward's image inputs
        (``pixel_values``...); a 400 naming ``messages`` when the images do not fit the prompt."""
        if request.messages is None:
            raise BadRequestError("images come with chat messages", param="inputs")
        if len(request.images) > self.max_images:
            message = f"this model reads at most {self.max_images} images per prompt"
            raise BadRequestError(message, param="messages")
        parts = [p for m in request.messages if isinstance(m.get("content"), list) for p in m["content"]]
        if sum(p.get("type") == "image" for p in parts) != len(request.images):
            raise BadRequestError(
                "the messages' image parts and the images differ in number", param="messages"
            )
        if request.params.truncate is not None:  # cutting the prompt could cut an image's tokens
            raise BadRequestError("truncate does not apply to a prompt with images", param="messages")
        # A processor with its own chat template (llava-hf's) renders the image parts; else the tokenizer's.
        templates = self.processor if getattr(self.processor, "chat_template", None) else tokenizer
        text = chat_text(request, templates)
        images = [_image(data) for data in request.images]
        try:
            # The template writes the special tokens, as on the text path (add_special_tokens=False).
            encoded = self.processor(
                text=[text], images=images, return_tensors="pt", add_special_tokens=False
            )
        except ValueError as exc:  # the template's image placeholders and the images do not match
            raise BadRequestError(f"the images do not fit the prompt: {exc}", param="messages") from None
        ids = [int(i) for i in encoded.pop("input_ids")[0]]
        token = getattr(self.processor, "image_token_id", None)
        if token is not None and ids.count(token) < len(request.images):  # a template that drops images
            raise BadRequestError("the chat template wrote no place for the images", param="messages")
        encoded.pop("attention_mask", None)
        return ids, text, dict(encoded)


def _image(data: bytes) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def load_generator(
    context: WorkerContext, tensor_parallel: bool = False
) -> tuple[Any, Any, ImageInputs | None]:
    """A generating model, its tokenizer and, for an image-text-to-text model, its ``ImageInputs``.

    The one choice between the two for every mode: a rank of an MPI job (``tensor_parallel``, its
    shard from the model's ``tp_plan``: the language model split, the vision tower whole on each
    rank) reads images as a Python-mode worker does.
    """
    if not reads_images(context):
        return (*load_model(context, tensor_parallel), None)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, tokenizer = load_with(AutoModelForImageTextToText, context, tensor_parallel)
    processor = AutoProcessor.from_pretrained(context.model_id, trust_remote_code=context.trust_remote_code)
    limit = image_limit(context.options)
    return model, tokenizer, ImageInputs(processor, 1 if limit is None else limit)


def to_device(inputs: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The image inputs on the model's device, floating ones in its dtype."""
    moved: dict[str, Any] = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype=dtype if value.is_floating_point() else value.dtype)
        moved[key] = value
    return moved
