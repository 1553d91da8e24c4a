"""Checks every engine applies to a request around tokenizing its prompt, and the server before it.

Pure functions (standard library and ``lmi_core.errors`` only, so any backend's virtual environment
can import them): what the HTTP layer cannot check because it needs the vocabulary or the prompt's
length, and which ``SamplingParams`` fields a backend cannot honour. Each failure is a 400 whose
``param`` names the field, as vLLM answers.

A prompt's length is known only once it is tokenized, which grows with the prompt (30 MB of text took
the demo model's tokenizer over 120 s). But a tokenizer that covers every input byte (byte-level BPE,
or byte fallback) turns N bytes of prompt into at least N / ``max_token_bytes`` tokens, so a prompt
that cannot fit is refused from its size alone (``check_prompt_bytes``): by the engine before it
tokenizes, and by the server before the prompt crosses the worker socket (``refuse_unfit_prompt``,
with the limits the worker reported when it loaded).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lmi_core.engine import GenerationRequest, SamplingParams
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


def check_prompt_length(length: int, max_input_length: int, max_model_len: int | None, param: str) -> None:
    """A prompt longer than ``option.max_input_length`` (the context less one token by default) is a
    ``PromptTooLongError`` naming ``param``."""
    if length > max_input_length:
        raise prompt_too_long(length, max_input_length, max_model_len, param)


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


# -- prompt length before tokenizing ------------------------------------------------------------------

# Normalizers that may shrink text, and by how much at most in UTF-8 bytes: NFKC makes the 4-byte
# U+1D400 MATHEMATICAL BOLD CAPITAL A the 1-byte "A"; NFC composes 3 jamo (9 bytes) into a 3-byte
# syllable; lowercasing makes the 3-byte KELVIN SIGN a 1-byte "k". The others only add text.
SHRINKING_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase"}
GROWING_NORMALIZERS = {"Prepend"}
NORMALIZER_SHRINK = 4
# Pre-tokenizers that keep every character (splitting, or mapping a byte to a character); the others
# (Whitespace, WhitespaceSplit, BertPreTokenizer, CharDelimiterSplit) drop some, and a Split drops
# its matches when its behavior is "Removed".
KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts", "Split"}


def _parts(component: Mapping[str, Any] | None, key: str) -> list[Mapping[str, Any]]:
    """A tokenizer component and, for a ``Sequence``, its members (flattened)."""
    if component is None:
        return []
    if component.get("type") == "Sequence":
        return [part for member in component.get(key, []) for part in _parts(member, key)]
    return [component]


def max_token_bytes(tokenizer: Mapping[str, Any]) -> int | None:
    """The most UTF-8 bytes of prompt text one token can stand for, read from a ``tokenizer.json``
    (a fast tokenizer's ``backend_tokenizer.to_str()``); None when no such bound holds because the
    tokenizer can map text to fewer tokens: unknown characters fused into one ``<unk>`` (BPE or
    Unigram without byte fallback, WordPiece, WordLevel), characters dropped (whitespace splitting,
    regex replacements, SentencePiece's precompiled map, which also folds whitespace runs).

    A token's stored string is at least as long in UTF-8 as the text it matches (byte-level BPE
    stores each byte as one character of 1 or 2 bytes; ``<0x0A>`` stands for one byte; ``▁`` is the
    normalized space), and Unicode normalization shrinks text at most ``NORMALIZER_SHRINK`` times.
    """
    model = tokenizer.get("model") or {}
    pre_tokenizers = _parts(tokenizer.get("pre_tokenizer"), "pretokenizers")
    byte_level = any(p.get("type") == "ByteLevel" for p in pre_tokenizers)
    if model.get("type") not in ("BPE", "Unigram") or not (model.get("byte_fallback") or byte_level):
        return None
    if any(
        p.get("type") not in KEEPING_PRE_TOKENIZERS or str(p.get("behavior", "")).lower() == "removed"
        for p in pre_tokenizers
    ):
        return None
    shrink = 1
    for normalizer in _parts(tokenizer.get("normalizer"), "normalizers"):
        kind = normalizer.get("type")
        if kind in SHRINKING_NORMALIZERS:
            shrink = NORMALIZER_SHRINK
        elif kind == "Replace":  # a plain string made no shorter, like Llama 2's " " -> "▁"
            pattern = (normalizer.get("pattern") or {}).get("String")
            if pattern is None or len(pattern.encode()) > len(str(normalizer.get("content", "")).encode()):
                return None
        elif kind not in GROWING_NORMALIZERS:
            return None
    vocab = model.get("vocab") or {}
    pieces = [p[0] for p in vocab] if isinstance(vocab, list) else list(vocab)  # Unigram: [piece, score]
    pieces += [str(t.get("content", "")) for t in tokenizer.get("added_tokens") or []]
    longest = max((len(p.encode("utf-8", "surrogatepass")) for p in pieces), default=0)
    return longest * shrink if longest else None


def tokenizer_token_bytes(tokenizer: Any) -> int | None:
    """``max_token_bytes`` of a Hugging Face fast tokenizer (read from its ``backend_tokenizer``, once
    at load: a 128k vocabulary takes about 0.1 s); None for a tokenizer without one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return max_token_bytes(json.loads(backend.to_str()))


def prompt_too_long(
    tokens: int, max_input_length: int, max_model_len: int | None, param: str, at_least: bool = False
) -> PromptTooLongError:
    """The error for a prompt of ``tokens`` tokens (``at_least``: a lower bound, not a count)."""
    context = ""
    if max_model_len is not None:
        context = f"; this model's context is {max_model_len}, one token is left for the output"
    return PromptTooLongError(
        f"the prompt has {'at least ' if at_least else ''}{tokens} tokens; at most {max_input_length} fit "
        f"(option.max_input_length{context})",
        param=param,
    )


def check_prompt_bytes(
    text: str, max_token_bytes: int | None, max_input_length: int, max_model_len: int | None, param: str
) -> None:
    """Before tokenizing ``text``: a 400 when even at ``max_token_bytes`` bytes a token it has more
    tokens than fit. Constant time for any prompt of at most ``max_input_length * max_token_bytes / 4``
    characters (a character is at most 4 bytes), and for ASCII (``isascii`` is a flag of the string);
    other text is measured in UTF-8 (30 MB: 0.1 s on the loaded 2-core test machine)."""
    if max_token_bytes is None or 4 * len(text) <= max_input_length * max_token_bytes:
        return
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    tokens = -(-size // max_token_bytes)
    if tokens > max_input_length:
        raise prompt_too_long(tokens, max_input_length, max_model_len, param, at_least=True)


def refuse_unfit_prompt(
    request: GenerationRequest, max_input_length: int, max_token_bytes: int | None, max_model_len: int | None
) -> None:
    """The server's check before it sends ``request`` to a worker whose engine reported these
    limits: a token-id prompt is counted, a text prompt bounded by its size. Chat messages are left
    to the engine (its template decides how much of them is prompt), and so is a request with
    ``truncate`` (the engine keeps only the prompt's last tokens)."""
    if request.params.truncate is not None:
        return
    if request.prompt_ids is not None:
        check_prompt_length(len(request.prompt_ids), max_input_length, max_model_len, "inputs")
    elif request.prompt is not None:
        check_prompt_bytes(request.prompt, max_token_bytes, max_input_length, max_model_len, "inputs")
