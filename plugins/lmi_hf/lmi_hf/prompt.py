"""A request's prompt as token ids for the HF engine: its chat template and ``truncate`` applied, and
checked against the model's limits, or a 400 naming the field. It runs on the engine's prompt
threads, never on the worker's event loop: its cost grows with the prompt. A prompt too long to fit
whatever its tokens is refused from its size before it is tokenized (``check_prompt_bytes``).
"""

from __future__ import annotations

from typing import Any

from lmi_core.engine import GenerationRequest
from lmi_core.errors import BadRequestError
from lmi_core.request_checks import check_prompt_bytes, check_token_ids, prompt_too_long, truncate_prompt
from lmi_hf.text import Decode


def encode_prompt(
    request: GenerationRequest,
    tokenizer: Any,
    decode: Decode,
    vocab_size: int,
    max_input_length: int,
    max_model_len: int,
    max_token_bytes: int | None,
) -> tuple[list[int], str]:
    """The prompt's token ids and text (the chat template applied, ``truncate`` applied); a 400
    naming the field when it cannot be used. Runs on a prompt thread: its cost grows with the prompt.
    ``max_token_bytes``: the most bytes of text one token stands for (``request_checks``), if known."""

    def check_size(text: str, param: str) -> None:
        if request.params.truncate is None:  # else only the last tokens count: they must be counted
            check_prompt_bytes(text, max_token_bytes, max_input_length, max_model_len, param)

    if request.prompt_ids is not None:
        if not request.prompt_ids:
            raise BadRequestError("the prompt is empty", param="inputs")
        check_token_ids(request.prompt_ids, vocab_size)
        ids, text, param = list(request.prompt_ids), decode(request.prompt_ids), "inputs"
    elif request.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise BadRequestError("this model's tokenizer has no chat template", param="messages")
        try:
            text = tokenizer.apply_chat_template(
                request.messages, tools=request.tools, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # a template that rejects these messages (raise_exception)
            raise BadRequestError(f"cannot apply the model's chat template: {exc}", "messages") from None
        check_size(text, "messages")
        ids, param = tokenizer.encode(text, add_special_tokens=False), "messages"
    elif not request.prompt:
        raise BadRequestError("the prompt is empty", param="inputs")
    else:
        text, param = request.prompt, "inputs"
        check_size(text, param)
        ids = tokenizer.encode(text)
    ids = truncate_prompt(ids, request.params)
    if len(ids) > max_input_length:
        raise prompt_too_long(len(ids), max_input_length, max_model_len, param)
    return ids, text
