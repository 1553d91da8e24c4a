"""A request's prompt as token ids for the HF engine: encoded as every engine encodes it
(``lmi_core.prompts``), then ``truncate`` applied and checked against the model's limits, or a 400
naming the field. It runs on the engine's prompt threads, never on the worker's event loop: its cost
grows with the prompt.
"""

from __future__ import annotations

from typing import Any

from lmi_core.engine import GenerationRequest
from lmi_core.prompts import encode_prompt as encode
from lmi_core.request_checks import check_prompt_length, truncate_prompt
from lmi_hf.text import Decode


def encode_prompt(
    request: GenerationRequest,
    tokenizer: Any,
    decode: Decode,
    vocab_size: int,
    max_input_length: int,
    max_model_len: int,
) -> tuple[list[int], str]:
    """The prompt's token ids and text (the chat template applied, ``truncate`` applied); a 400
    naming the field when it cannot be used. Runs on a prompt thread: its cost grows with the prompt."""
    prompt = encode(request, tokenizer, decode, vocab_size)
    ids = truncate_prompt(prompt.ids, request.params)
    check_prompt_length(len(ids), max_input_length, max_model_len, prompt.param)
    return ids, prompt.text
