"""Worker-side checks every engine applies to a request once its prompt is tokenized.

Pure functions (standard library and ``lmi_core.errors`` only, so any backend's virtual environment
can import them): what the HTTP layer cannot check because it needs the vocabulary or the prompt's
length, and which ``SamplingParams`` fields a backend cannot honour. Each failure is a 400 whose
``param`` names the field, as vLLM answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from lmi_core.engine import SamplingParams
from lmi_core.errors import BadRequestError, PromptTooLongError

# Neutral value of every optional SamplingParams feature: a backend that lacks one refuses a request
# that sets it to anything else (a silently ignored parameter is a wrong answer the client cannot see).
NEUTRAL: dict[str, object] = {
    "stop_token_ids": [],
    "logit_bias": [],
    "repetition_penalty": 1.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "min_tokens": 0,
    "min_p": 0.0,
    "typical_p": 1.0,
    "prompt_logprobs": None,
    "truncate": None,
}


def refuse_unsupported(params: SamplingParams, unsupported: Iterable[str], backend: str) -> None:
    """400 naming the first of ``unsupported`` that ``params`` sets away from its neutral value."""
    for name in unsupported:
        if getattr(params, name) != NEUTRAL[name]:
            raise BadRequestError(f"{name} is not supported by the {backend} backend", param=name)


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str = "prompt") -> None:
    """A token-id prompt must index the vocabulary: 400 naming the first bad position."""
    for index, token in enumerate(ids):
        if not 0 <= token < vocab_size:
            raise BadRequestError(
                f"token id {token} at {param}[{index}] is out of the vocabulary (size {vocab_size})",
                param=param,
            )


def check_logit_bias(params: SamplingParams, vocab_size: int) -> None:
    for token, _ in params.logit_bias:
        if not 0 <= token < vocab_size:
            raise BadRequestError(
                f"logit_bias token id {token} is out of the vocabulary (size {vocab_size})",
                param="logit_bias",
            )


def truncate_prompt(ids: list[int], params: SamplingParams) -> list[int]:
    """The last ``params.truncate`` tokens of the prompt (DJL/TGI ``truncate``)."""
    if params.truncate is None or params.truncate >= len(ids):
        return ids
    return ids[len(ids) - params.truncate :]


def check_prompt_length(length: int, max_input_length: int, max_model_len: int, param: str) -> None:
    """A prompt longer than ``option.max_input_length`` (the context less one token by default) is a
    ``PromptTooLongError`` naming ``param``."""
    if length > max_input_length:
        raise PromptTooLongError(
            f"the prompt has {length} tokens; at most {max_input_length} fit "
            f"(option.max_input_length; this model's context is {max_model_len}, one token is left "
            "for the output)",
            param=param,
        )


def token_budget(
    prompt_tokens: int, max_model_len: int, params: SamplingParams, param: str = "inputs"
) -> int:
    """How many tokens this request may generate: max_new_tokens, within the room the context leaves.

    A prompt that fills the context is a 400. A max_new_tokens past the room is a 400 with the numbers
    when ``params.strict_max_tokens`` (vLLM's answer to an explicit max_tokens), else clamped.
    ``max_new_tokens`` 0 (prompt scoring, OpenAI ``echo`` with ``max_tokens=0``) stays 0.
    """
    room = max_model_len - prompt_tokens
    if room <= 0:
        raise PromptTooLongError(
            f"the prompt has {prompt_tokens} tokens; this model's context is {max_model_len}", param=param
        )
    if params.max_new_tokens > room and params.strict_max_tokens:
        raise BadRequestError(
            f"this model's maximum context length is {max_model_len} tokens; the request asks for "
            f"{prompt_tokens + params.max_new_tokens} ({prompt_tokens} in the prompt, "
            f"{params.max_new_tokens} to generate): reduce max_tokens to at most {room}",
            param="max_tokens",
        )
    return min(params.max_new_tokens, room)
