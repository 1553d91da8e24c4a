"""A request's prompt as token ids, encoded the one way every engine encodes it (backend kit).

Invariant: an engine's generation and its ``Tokenize`` operation (``PromptCodec``) encode a prompt
through the same ``encode_prompt``, so ``/tokenize`` and ``count_tokens`` give exactly the prompt
tokens a generation of the same request counts: token ids as they are (checked against the
vocabulary), chat messages through the tokenizer's chat template (``chat_text``: with the request's
tools and chat_template_kwargs; TensorRT-LLM, which tokenizes itself, uses it alone), whose
text is then encoded without special tokens (the template writes its own, as vLLM's chat path
does), text with them. Each failure is a 400 naming the request's field. ``tokenizer`` is a Hugging
Face tokenizer (``apply_chat_template``, ``encode``); no import of transformers here, so any
backend's environment can use it. A pooling model's inputs and pairs are encoded here too
(``pooling_inputs``, ``pooling_pairs``), the same way on every backend.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from lmi_core.engine import GenerationRequest
from lmi_core.errors import BadRequestError
from lmi_core.operations import Embed, Score, Tokenize, TokenizeResult
from lmi_core.request_checks import check_prompt_bytes, check_token_ids


@dataclass(frozen=True)
class PromptLimits:
    """What of a prompt fits an engine: ``max_input_length`` tokens; ``max_token_bytes``, the most
    bytes of text one token stands for (None: no bound holds, ``request_checks.max_token_bytes``);
    ``max_model_len``, named in the error."""

    max_input_length: int
    max_model_len: int | None
    max_token_bytes: int | None


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str
    param: str  # the request field a problem with the prompt is named after: inputs or messages


def encode_prompt(
    request: GenerationRequest,
    tokenizer: Any,
    decode: Callable[[Sequence[int]], str],
    vocab_size: int,
    *,
    add_special_tokens: bool | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    fits: PromptLimits | None = None,
) -> Prompt:
    """``request``'s prompt; ``decode`` gives the text of a token-id prompt (the engine's own choice
    of special tokens). ``add_special_tokens=None``: for text, not for a chat template's text.
    ``fits``: the engine's limits, by which a text too long to fit whatever its tokens is refused
    before it is tokenized (``check_prompt_bytes``; not with ``truncate``, which keeps the last tokens)."""

    def check_size(text: str, param: str) -> None:
        if fits is not None and request.params.truncate is None:
            check_prompt_bytes(text, fits.max_token_bytes, fits.max_input_length, fits.max_model_len, param)

    if request.prompt_ids is not None:
        check_token_ids(request.prompt_ids, vocab_size)
        ids, text, param = list(request.prompt_ids), decode(request.prompt_ids), "inputs"
    elif request.messages is not None:
        text, param = chat_text(request, tokenizer, add_generation_prompt, continue_final_message), "messages"
        check_size(text, param)
        ids = list(tokenizer.encode(text, add_special_tokens=bool(add_special_tokens)))
    elif request.prompt:
        text, param = request.prompt, "inputs"
        check_size(text, param)
        ids = list(tokenizer.encode(text, add_special_tokens=add_special_tokens is not False))
    else:
        raise BadRequestError("the prompt is empty", param="inputs")
    if not ids:
        raise BadRequestError("the prompt is empty", param=param)
    return Prompt(ids, str(text), param)


def chat_text(
    request: GenerationRequest,
    tokenizer: Any,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> str:
    """``request.messages`` through the tokenizer's chat template, with the request's tools and its
    ``chat_template_kwargs`` as template variables; a 400 naming ``messages`` when the model has no
    template or the template refuses the messages (its ``raise_exception``)."""
    if not getattr(tokenizer, "chat_template", True):  # a wrapper without the attribute may still have one
        raise BadRequestError("this model's tokenizer has no chat template", param="messages")
    try:
        text = tokenizer.apply_chat_template(
            request.messages,
            tools=request.tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **(request.chat_template_kwargs or {}),
        )
    except Exception as exc:
        raise BadRequestError(f"cannot apply the model's chat template: {exc}", param="messages") from None
    return str(text)


@dataclass(frozen=True)
class PromptCodec:
    """``TokenizerEngine``'s two methods for an engine with a Hugging Face tokenizer: each runs on the
    engine's prompt threads (``executor``), never on the worker's event loop."""

    tokenizer: Any
    decode: Callable[[Sequence[int]], str]  # the engine's text of a token-id prompt
    vocab_size: int
    executor: Executor

    async def tokenize(self, operation: Tokenize) -> TokenizeResult:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._tokenize, operation)

    async def detokenize(self, ids: list[int]) -> str:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._detokenize, ids)

    def _tokenize(self, operation: Tokenize) -> TokenizeResult:
        if operation.request.images:  # placeholders alone would be counted as one token each
            raise BadRequestError(
                "this engine counts a prompt's images only when it generates: tokenize text parts here",
                param="messages",
            )
        prompt = encode_prompt(
            operation.request,
            self.tokenizer,
            self.decode,
            self.vocab_size,
            add_special_tokens=operation.add_special_tokens,
            add_generation_prompt=operation.add_generation_prompt,
            continue_final_message=operation.continue_final_message,
        )
        strs = None
        if operation.token_strs:
            strs = [str(s) for s in self.tokenizer.convert_ids_to_tokens(prompt.ids)]
        return TokenizeResult(prompt.ids, strs)

    def _detokenize(self, ids: list[int]) -> str:
        """Special tokens included, as vLLM's ``/detokenize``; 400 naming ``tokens`` for an id outside
        the vocabulary."""
        check_token_ids(ids, self.vocab_size, "tokens")
        return str(self.tokenizer.decode(ids))


def pooling_inputs(operation: Embed, tokenizer: Any, vocab_size: int, limit: int) -> list[list[int]]:
    """The token ids of each of an ``Embed``'s inputs (texts with the tokenizer's special tokens, token
    ids as they are), cut to ``limit`` with ``truncate``, else a 400 naming ``operation.param`` for
    an input past it, an empty one or an id outside the vocabulary. On a prompt thread."""
    param = operation.param
    items: list[str | list[int]] = list(operation.inputs)
    texts = [x for x in items if isinstance(x, str)]
    encoded = iter(
        tokenizer(texts, truncation=operation.truncate, max_length=limit)["input_ids"] if texts else []
    )
    rows: list[list[int]] = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            ids = list(next(encoded))
        else:
            check_token_ids(item, vocab_size, param)
            ids = list(item)[:limit] if operation.truncate else list(item)
        if not ids:
            raise BadRequestError(f"input {index} is empty", param=param)
        if len(ids) > limit:
            raise BadRequestError(
                f"input {index} has {len(ids)} tokens; this model reads at most {limit} "
                "(set truncate to cut it)",
                param=param,
            )
        rows.append(ids)
    return rows


def pooling_pairs(operation: Score, tokenizer: Any, limit: int) -> list[tuple[list[int], list[int] | None]]:
    """Each pair as one cross-encoder input: its ids and token type ids (the tokenizer's pair
    encoding); with ``truncate`` the document is cut, never the query (as TEI's and vLLM's rerankers
    do), else a pair past ``limit`` is a 400 naming ``operation.param``. On a prompt thread."""
    truncation: str | bool = "only_second" if operation.truncate else False
    first, second = [a for a, _ in operation.pairs], [b for _, b in operation.pairs]
    encoded = tokenizer(first, second, truncation=truncation, max_length=limit)
    types = encoded.get("token_type_ids")
    pairs: list[tuple[list[int], list[int] | None]] = []
    for index, ids in enumerate(encoded["input_ids"]):
        if len(ids) > limit:
            raise BadRequestError(
                f"pair {index} has {len(ids)} tokens; this model reads at most {limit} "
                "(set truncate to cut the document)",
                param=operation.param,
            )
        pairs.append((list(ids), list(types[index]) if types is not None else None))
    return pairs
