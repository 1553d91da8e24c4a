"""Pure conversions between lmi's engine contract and TensorRT-LLM's LLM API (no TensorRT-LLM import).

The shapes they read are TensorRT-LLM's (``tensorrt_llm/executor/result.py``): a streamed
``RequestOutput`` carries ``outputs[0]``, a ``CompletionOutput`` whose ``token_ids_diff``,
``text_diff`` and ``logprobs_diff`` hold what is new since the previous response, whose
``finish_reason`` is ``stop``, ``length``, ``timeout`` or ``cancelled`` once finished, and whose
``stop_reason`` is the stop string (or stop token id) that ended it. Each ``logprobs`` entry is a float
or a ``{token_id: Logprob(logprob, rank)}`` dict, depending on the TensorRT-LLM version and backend.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmi_core.engine import (
    Finished,
    FinishReason,
    GenerationEvent,
    LoraAdapter,
    SamplingParams,
    StructuredOutput,
    Token,
)
from lmi_core.errors import BadRequestError, EngineError, ServiceError
from lmi_core.request_checks import refuse_unsupported

if TYPE_CHECKING:  # names for tests/lmi_trtllm/test_api_manifest.py; TensorRT-LLM is not imported here
    from tensorrt_llm.executor.result import CompletionOutput, Logprob

# SamplingParams fields TensorRT-LLM's LLM API has no equivalent of (or whose output is not mapped).
UNSUPPORTED = ("logit_bias", "typical_p", "prompt_logprobs", "truncate")


@dataclass
class StreamState:
    """What one request's stream has produced so far (responses carry only what is new)."""

    generated: int = 0
    # Text that arrived without a new token id (the detokenizer releasing held-back bytes); it is
    # given to the next token so that the streamed texts still join to the whole output.
    pending_text: str = ""


def sampling_kwargs(params: SamplingParams, *, templated: bool = False) -> dict[str, Any]:
    """``tensorrt_llm.SamplingParams`` keyword arguments for lmi's ``params``.

    ``templated``: the prompt comes from the chat template, which writes the special tokens itself.
    Always asks for at least one logprob per token, so that every ``Token`` carries its own.
    """
    if params.max_new_tokens < 1:
        raise BadRequestError("max_new_tokens must be at least 1", param="max_new_tokens")
    if params.top_logprobs < 0:
        raise BadRequestError("top_logprobs must not be negative", param="top_logprobs")
    refuse_unsupported(params, UNSUPPORTED, "trtllm")
    kwargs: dict[str, Any] = {
        "max_tokens": params.max_new_tokens,
        "ignore_eos": params.ignore_eos,
        "logprobs": max(1, params.top_logprobs),
    }
    # Same names and meanings in tensorrt_llm.SamplingParams; passed only when set, so that a
    # release without one still serves every request that does not use it.
    for name, neutral in (
        ("repetition_penalty", 1.0),
        ("frequency_penalty", 0.0),
        ("presence_penalty", 0.0),
        ("min_tokens", 0),
        ("min_p", 0.0),
    ):
        if getattr(params, name) != neutral:
            kwargs[name] = getattr(params, name)
    if params.stop_token_ids:
        kwargs["stop_token_ids"] = list(params.stop_token_ids)
    if params.greedy:
        # Explicit, so that defaults TensorRT-LLM reads from the model's generation_config.json
        # cannot turn a greedy request into a sampled one; top_k=1 and temperature=0 each mean greedy.
        kwargs.update(temperature=0.0, top_k=1, top_p=1.0)
    else:
        # lmi's top_k 0 means "no top-k"; TensorRT-LLM spells that 0 too ("all logits").
        kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=max(0, params.top_k))
    if params.seed is not None:
        kwargs["seed"] = params.seed
    if params.stop_sequences:
        kwargs["stop"] = list(params.stop_sequences)
    if templated:
        kwargs["add_special_tokens"] = False
    if params.structured is not None:
        if params.structured.starts_after is not None:  # its guided decoding starts at the first token
            raise BadRequestError(
                "a constrained output after the thinking (option.reasoning_parser) is not supported by "
                "the trtllm backend; turn the thinking off with chat_template_kwargs"
            )
        kwargs["guided_decoding"] = guided_decoding_kwargs(params.structured)  # GuidedDecodingParams(**it)
    return kwargs


def lora_id(ids: dict[tuple[str, str], int], adapter: LoraAdapter) -> int:
    """TensorRT-LLM's ``lora_int_id`` for ``adapter``: one per (name, path), from 1, never reused, since
    TensorRT-LLM caches an adapter's weights by id (new weights under a name need a new id)."""
    return ids.setdefault((adapter.name, adapter.path), max(ids.values(), default=0) + 1)


def lora_request_kwargs(adapter: LoraAdapter, lora_int_id: int) -> dict[str, Any]:
    """``tensorrt_llm.executor.request.LoRARequest`` keyword arguments (lmi's adapters are PEFT's)."""
    return {
        "lora_name": adapter.name,
        "lora_int_id": lora_int_id,
        "lora_path": adapter.path,
        "lora_ckpt_source": "hf",
    }


def lora_error(adapter: LoraAdapter, exc: BaseException) -> EngineError:
    """TensorRT-LLM's refusal of ``adapter`` (its ``LoRARequest`` checks that the path exists) as a
    400 naming the adapter."""
    return EngineError(
        f"LoRA adapter {adapter.name!r} (path {adapter.path}) cannot be used: {exc}",
        status=400,
        type="BadRequestException",
        param="adapter",
    )


# lmi's constraint kinds -> the GuidedDecodingParams field that takes each (the schema text for json).
GUIDED_FIELDS: dict[str, str] = {"json": "json", "regex": "regex", "grammar": "grammar"}


def guided_decoding_kwargs(constraint: StructuredOutput) -> dict[str, Any]:
    """``tensorrt_llm.sampling_params.GuidedDecodingParams`` keyword arguments for ``constraint``.

    TensorRT-LLM has no choice constraint: a choice becomes the regex of its escaped alternatives.
    Its grammar is EBNF (GBNF) for xgrammar and Lark or GBNF for llguidance (this plugin's default).
    """
    if constraint.kind == "choice":
        return {"regex": "|".join(f"({re.escape(c)})" for c in json.loads(constraint.spec))}
    return {GUIDED_FIELDS[constraint.kind]: constraint.spec}


def finish_reason(reason: str | None, stop_reason: int | str | None) -> FinishReason:
    """TensorRT-LLM's finish and stop reasons as lmi's finish reason."""
    if reason == "length":
        return "length"
    if reason == "cancelled":
        return "cancelled"
    if reason == "stop":
        # A stop string names itself; None is the end id (EOS); an int is a stop token id (EOS-like).
        return "stop_sequence" if isinstance(stop_reason, str) else "eos_token"
    if reason == "timeout":
        raise EngineError("TensorRT-LLM timed out the request", status=504)
    raise EngineError(f"TensorRT-LLM finished the request with no usable finish reason ({reason!r})")


def token_logprob(
    token_id: int, entry: float | Mapping[int, Logprob] | None, top_n: int, decode: Callable[[int], str]
) -> tuple[float, list[tuple[int, str, float]] | None]:
    """The token's own logprob and, when ``top_n`` > 0, the ``top_n`` most likely alternatives."""
    if entry is None:
        return 0.0, None
    if not isinstance(entry, Mapping):
        return float(entry), None
    own: Logprob | None = entry.get(token_id)
    top = None
    if top_n > 0:
        # By logprob, not rank: some releases report rank 1 for every entry. The dict may also hold the
        # sampled token beyond the top n; sorting leaves it out of the first n unless it belongs there.
        ranked = sorted(entry.items(), key=lambda item: item[1].logprob, reverse=True)[:top_n]
        top = [(int(tid), decode(int(tid)), float(lp.logprob)) for tid, lp in ranked]
    return (float(own.logprob) if own is not None else 0.0), top


def delta_events(
    completion: CompletionOutput,
    finished: bool,
    state: StreamState,
    *,
    special_ids: frozenset[int],
    top_n: int,
    decode: Callable[[int], str],
    prompt: str,
    prompt_tokens: int,
) -> list[GenerationEvent]:
    """The lmi events of one streamed response: a ``Token`` per new token id, then ``Finished``.

    ``completion``: the response's ``CompletionOutput``; ``finished``: the ``RequestOutput`` is done.
    Several new tokens share the response's text by giving it all to the last one, so the streamed
    texts always join to exactly the generated text.
    """
    token_ids = [int(t) for t in completion.token_ids_diff]
    text = state.pending_text + completion.text_diff
    logprobs = list(completion.logprobs_diff or ())
    events: list[GenerationEvent] = []
    state.pending_text = "" if token_ids else text
    last = len(token_ids) - 1
    for i, tid in enumerate(token_ids):
        log_prob, top = token_logprob(tid, logprobs[i] if i < len(logprobs) else None, top_n, decode)
        events.append(
            Token(
                id=tid,
                text=text if i == last else "",
                log_prob=log_prob,
                special=tid in special_ids,
                top_logprobs=top,
                last=finished and i == last,
                prompt_tokens=prompt_tokens if state.generated == 0 and i == 0 else None,
            )
        )
    state.generated += len(token_ids)
    if finished:
        events.append(
            Finished(
                finish_reason=finish_reason(completion.finish_reason, completion.stop_reason),
                prompt_tokens=prompt_tokens,
                generated_tokens=state.generated,
                prompt=prompt,
            )
        )
    return events


def map_error(exc: BaseException) -> ServiceError:
    """TensorRT-LLM's request errors as lmi engine errors: its argument checks (prompt longer than
    max_seq_len, a bad sampling value) raise ``ValueError`` / ``TypeError`` -> 400; the rest -> 424."""
    if isinstance(exc, EngineError):
        return exc
    if isinstance(exc, (ValueError, TypeError)):
        return BadRequestError(str(exc))
    return EngineError(f"{type(exc).__name__}: {exc}")
