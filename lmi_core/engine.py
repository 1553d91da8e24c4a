"""The worker-side engine contract: what a request is, what an engine yields, what an engine is.

Every value that crosses the worker socket has its codec here, next to its definition
(``to_wire``/``from_wire``): ``wire`` moves frames, this module owns what is inside them, and
``from_wire(x.to_wire()) == x`` for each. Standard library only, so that a worker can run in another
virtual environment than the server.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar, cast, get_args, runtime_checkable

T = TypeVar("T")

FinishReason = Literal["length", "eos_token", "stop_sequence", "cancelled"]

SAMPLING_EPS = 1e-5
# English text averages about 4 characters per token for BPE tokenizers (Llama, GPT-2): what the
# server estimates a text's tokens by before a worker tokenizes it (budgets, routing blocks).
CHARS_PER_TOKEN = 4

StructuredKind = Literal["json", "regex", "choice", "grammar"]


@dataclass
class StructuredOutput:
    """A constraint on the generated text, which must be a complete match of ``spec`` read as ``kind``:
    ``json`` a JSON schema (JSON text), ``regex`` a regular expression, ``choice`` a JSON list of
    strings (the text is exactly one), ``grammar`` a Lark or GBNF grammar."""

    kind: StructuredKind
    spec: str
    # JSON without optional whitespace. Flexible whitespace lets greedy decoding of a weak model emit
    # whitespace until max_tokens (measured: the demo model, every schema); compact ends in ~50 tokens.
    compact_json: bool = True
    # A reasoning model's end of thinking (``</think>``): the output begins inside the thinking, which
    # stays free, and the constraint applies to what follows the first ``starts_after`` in the output.
    # None: the constraint applies from the first token. An engine that cannot defer it refuses it.
    starts_after: str | None = None


@dataclass
class SamplingParams:
    """Generation parameters shared by every API; engines map them to their own."""

    max_new_tokens: int = 30
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_sequences: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    # Number of alternatives per token to report (OpenAI top_logprobs); 0 = none.
    top_logprobs: int = 0
    # Whether the client reads each token's log-prob; an engine may skip computing it when not
    # (vLLM: about a third of its per-token cost on CPU) and report None.
    logprobs: bool = True
    # max_new_tokens beyond the room the context leaves: a 400 (OpenAI/vLLM with an explicit
    # max_tokens) instead of being clamped to it (DJL LMI's max_new_tokens, chat without max_tokens).
    strict_max_tokens: bool = False
    # Token ids that end the generation like EOS (their text is not emitted; vLLM's stop_token_ids).
    stop_token_ids: list[int] = field(default_factory=list)
    # (token id, bias) pairs added to the logits before sampling (OpenAI's logit_bias, -100..100);
    # pairs rather than a dict: msgpack keeps int keys only with strict_map_key off.
    logit_bias: list[tuple[int, float]] = field(default_factory=list)
    # HF/vLLM semantics: logits of tokens in the prompt or output are divided (>0) or multiplied (<0).
    repetition_penalty: float = 1.0
    # OpenAI semantics, output tokens only: logit -= frequency * count + presence * (count > 0).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # EOS and stop_token_ids cannot end the generation before this many tokens.
    min_tokens: int = 0
    # Drop tokens whose probability is below min_p times the most likely one's (0: off).
    min_p: float = 0.0
    # Locally typical sampling (HF's typical_p; 1: off).
    typical_p: float = 1.0
    # Log-probs of every prompt token (the first has none) with this many alternatives each; None:
    # not computed (an engine pays a [prompt, vocab] logits tensor only when asked).
    prompt_logprobs: int | None = None
    # Keep only the last ``truncate`` prompt tokens (DJL/TGI ``truncate``); None: the whole prompt.
    truncate: int | None = None
    structured: StructuredOutput | None = None
    # Tokens the worker gathers before it sends them (the last ones go with the finish); None = the
    # model's option.stream_interval (default 1). Fewer, larger writes per request at the cost of ITL.
    stream_interval: int | None = None

    @property
    def greedy(self) -> bool:
        """Greedy decoding: no sampling, or a temperature / top_p so small that sampling tends to
        greedy anyway (and would overflow: logits / 1e-38 are inf; vLLM's rule for temperature)."""
        return not self.do_sample or self.temperature < SAMPLING_EPS or self.top_p < SAMPLING_EPS


@dataclass
class LoraAdapter:
    """A LoRA adapter in PEFT's format: a directory with ``adapter_config.json`` and its weights.

    A request names the adapter it runs with; the engine loads it on first use (an LRU cache of
    ``option.max_cpu_loras``; a ``pinned`` one is never evicted). ``path`` is as every worker sees it.
    """

    name: str
    path: str
    pinned: bool = False

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> LoraAdapter:
        return cls(name=str(data["name"]), path=str(data["path"]), pinned=bool(data.get("pinned", False)))


@dataclass
class GenerationRequest:
    """One generation: a prompt (text, or chat messages for the tokenizer's template)."""

    request_id: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    # An already tokenized prompt (OpenAI ``prompt: list[int]``): used as is, no special tokens added.
    prompt_ids: list[int] | None = None
    # Function tools for the chat template (OpenAI's ``tools`` entries), when the request has them.
    tools: list[dict[str, Any]] | None = None
    # Extra variables for the chat template (OpenAI chat's ``chat_template_kwargs`` over the model's
    # ``option.default_chat_template_kwargs``), such as ``{"enable_thinking": false}``.
    chat_template_kwargs: dict[str, Any] | None = None
    # The LoRA adapter to generate with; None: the base model.
    adapter: LoraAdapter | None = None
    # Tokens this request generated and delivered already (a stream migrated from a worker that died
    # or stalled): the engine continues after them as if it had sampled them (penalties, grammar,
    # stop sequences, the seeded sampler's position, max_new_tokens all count them), emits only the
    # tokens that follow, and reports them in ``Finished.generated_tokens``.
    resume_ids: list[int] = field(default_factory=list)
    # The images of a chat request, as checked PNG or JPEG files (the server read and decoded them),
    # in the order of the ``{"type": "image"}`` content parts of ``messages``.
    images: list[bytes] = field(default_factory=list)
    # Scheduling priority, vLLM's polarity: lower is earlier (0 by default). The server orders its
    # queue by it, clamped to the tenant's range; an engine with a scheduler of its own may honour it
    # too (vLLM with ``option.scheduling_policy=priority``).
    priority: int = 0
    # The W3C ``traceparent`` of the span this generation runs under (OpenTelemetry, docs/tracing.md):
    # the server's request span on the wire, the worker's span once in the engine, which may hang its
    # own spans under it (vLLM's ``llm_request``). None: the request is not traced.
    traceparent: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> GenerationRequest:
        raw = dict(data.get("params", {}))
        raw["logit_bias"] = [(int(i), float(b)) for i, b in raw.get("logit_bias", [])]
        if raw.get("structured") is not None:
            raw["structured"] = StructuredOutput(**raw["structured"])
        return cls(
            request_id=data["request_id"],
            prompt=data.get("prompt"),
            messages=data.get("messages"),
            params=SamplingParams(**raw),
            prompt_ids=data.get("prompt_ids"),
            tools=data.get("tools"),
            chat_template_kwargs=data.get("chat_template_kwargs"),
            adapter=LoraAdapter.from_wire(data["adapter"]) if data.get("adapter") is not None else None,
            resume_ids=[int(t) for t in data.get("resume_ids") or []],
            images=[bytes(image) for image in data.get("images") or []],
            priority=int(data.get("priority", 0)),
            traceparent=_optional(str, data.get("traceparent")),
        )


@dataclass
class Token:
    """One generated token; ``text`` is the incremental detokenized text it adds."""

    id: int
    text: str
    log_prob: float | None
    special: bool = False
    top_logprobs: list[tuple[int, str, float]] | None = None
    # True on a request's final token (a ``Finished`` follows at once): lets streams mark the last
    # line without waiting for another event.
    last: bool = False
    # The prompt's token count, on a request's first token only (usage in every streamed chunk).
    prompt_tokens: int | None = None

    def to_wire(self) -> list[Any]:
        """A msgpack list, not a map: every generated token crosses the socket, and a map repeats the
        field names in each: 81 bytes instead of 24 for a one-word token, which makes a ``toks``
        frame of one token (32-hex-digit request id) 136 bytes instead of 79."""
        top, last, prompt_tokens = self.top_logprobs, self.last, self.prompt_tokens
        return [self.id, self.text, self.log_prob, self.special, top, last, prompt_tokens]

    @classmethod
    def from_wire(cls, data: list[Any]) -> Token:
        token_id, text, log_prob, special, top, last, prompt_tokens = data
        return cls(
            id=token_id,
            text=text,
            log_prob=log_prob,
            special=special,
            top_logprobs=[(int(i), str(t), float(lp)) for i, t, lp in top] if top is not None else None,
            last=last,
            prompt_tokens=prompt_tokens,
        )


# A prompt token: (id, text, its log-prob (None for the first token), rank among the vocabulary
# (1 = most likely; 0 for the first), the top alternatives as (id, text, log-prob)).
PromptLogprob = tuple[int, str, float | None, int, list[tuple[int, str, float]]]


@dataclass
class Finished:
    """The last event of a request."""

    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    prompt: str = ""
    # Asked for with SamplingParams.prompt_logprobs: one entry per prompt token.
    prompt_logprobs: list[PromptLogprob] | None = None

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Finished:
        reason = data["finish_reason"]
        if reason not in get_args(FinishReason):
            raise ValueError(f"unknown finish reason {reason!r}")
        return cls(
            finish_reason=cast(FinishReason, reason),
            prompt_tokens=int(data["prompt_tokens"]),
            generated_tokens=int(data["generated_tokens"]),
            prompt=str(data.get("prompt", "")),
            prompt_logprobs=[
                (int(i), str(text), lp, int(rank), [(int(a), str(b), float(c)) for a, b, c in top])
                for i, text, lp, rank, top in data["prompt_logprobs"]
            ]
            if data.get("prompt_logprobs") is not None
            else None,
        )


GenerationEvent = Token | Finished


@dataclass
class WorkerContext:
    """What an engine plugin gets to load its engine inside a worker process."""

    model_id: str
    model_dir: str | None
    backend: str
    options: dict[str, Any]
    mode: Literal["python", "mpi"] = "python"
    rank: int = 0
    world_size: int = 1
    tensor_parallel_degree: int = 1
    pipeline_parallel_degree: int = 1
    device: Literal["cpu", "cuda"] = "cpu"
    max_batch_size: int = 32
    # option.dtype (lmi / DJL names such as fp16, bf16, auto); None = the engine's default.
    dtype: str | None = None
    trust_remote_code: bool = False
    # The model's custom code file (DJL's model.py or option.entryPoint), absolute; None: it has none.
    entry_point: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> WorkerContext:
        return cls(**data)


@dataclass
class EngineStats:
    """What only the engine knows, sent with each heartbeat (summed over workers for /metrics).

    Tokens are not here: the server counts prompt and generated tokens from the events it relays
    (``lmi_prompt_tokens``, ``lmi_generation_tokens``), complete even when a worker dies.
    """

    # Requests inside the engine: being generated, and admitted but waiting for a batch slot.
    running: int = 0
    waiting: int = 0
    # Requests the engine ended with a ``Finished``, and those it stopped early (closed, failed).
    finished_total: int = 0
    cancelled_total: int = 0
    # Engine-specific numbers, for display only: nothing in lmi-core reads them.
    extra: dict[str, float] = field(default_factory=dict)
    # LoRA: the adapters resident in the engine now, and how many it has loaded and evicted so far.
    adapters: list[str] = field(default_factory=list)
    lora_loads_total: int = 0
    lora_evictions_total: int = 0
    # Router facts, None where the engine does not know them (docs/plugins.md, "Engine stats").
    # The fraction of the KV cache in use now, 0.0 to 1.0: the router's kv_weight term.
    kv_cache_usage: float | None = None
    # The KV cache's capacity in tokens: sizes the router's per-worker prefix LRU.
    kv_cache_tokens: int | None = None
    # Tokens per KV cache block: with kv_cache_tokens, the endpoint picker's vllm:cache_config_info.
    kv_block_size: int | None = None
    # Prompt tokens found in / looked up in the prefix cache since the engine started (counters;
    # lmi_prefix_cache_hits_total and lmi_prefix_cache_queries_total).
    prefix_cache_hits: int | None = None
    prefix_cache_queries: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> EngineStats:
        return cls(
            running=int(data.get("running", 0)),
            waiting=int(data.get("waiting", 0)),
            finished_total=int(data.get("finished_total", 0)),
            cancelled_total=int(data.get("cancelled_total", 0)),
            extra={str(k): float(v) for k, v in (data.get("extra") or {}).items()},
            adapters=[str(a) for a in data.get("adapters") or []],
            lora_loads_total=int(data.get("lora_loads_total", 0)),
            lora_evictions_total=int(data.get("lora_evictions_total", 0)),
            kv_cache_usage=_optional(float, data.get("kv_cache_usage")),
            kv_cache_tokens=_optional(int, data.get("kv_cache_tokens")),
            kv_block_size=_optional(int, data.get("kv_block_size")),
            prefix_cache_hits=_optional(int, data.get("prefix_cache_hits")),
            prefix_cache_queries=_optional(int, data.get("prefix_cache_queries")),
        )


def _optional(kind: Callable[[Any], T], value: Any) -> T | None:
    """``kind(value)``, or None for a fact the engine does not know."""
    return None if value is None else kind(value)


class Engine(Protocol):
    """A loaded engine as the worker drives it (``load_engine`` returns one).

    The built-in worker hooks (``lmi_core.worker.engine_hooks``) call these methods, so a backend plugin
    implements only ``register_backends`` and ``load_engine``.
    """

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """``Token`` events, then one ``Finished``; closing the generator early cancels the request."""
        ...

    def stats(self) -> EngineStats:
        """The engine's counters for the heartbeat; raise when the engine is unhealthy."""
        ...

    def shutdown(self) -> None:
        """Release the engine's resources (the worker is exiting)."""
        ...


@runtime_checkable
class LoopEngine(Engine, Protocol):
    """An engine whose asyncio machinery runs on the worker's own event loop once loaded.

    ``load_engine`` runs in a thread, where nothing can be scheduled on the worker's loop; an engine
    that wants its output handling there (no cross-thread hand-off per token: ``lmi_vllm``) starts it
    in ``start_on_loop``, which the worker awaits once on its loop before it reports "loaded".
    """

    async def start_on_loop(self) -> None:
        """Start on the running loop (and warm up); raising fails the load like ``load_engine``."""
        ...


@runtime_checkable
class AdapterEngine(Engine, Protocol):
    """An engine that serves LoRA adapters (``GenerationRequest.adapter``) and can be told to load
    one ahead of its first request (``preload``, ``pin``) or to drop one (unregistered)."""

    async def load_adapter(self, adapter: LoraAdapter) -> None:
        """Make ``adapter`` resident (off the event loop); raise ``EngineError`` if it cannot load."""
        ...

    async def unload_adapter(self, name: str) -> None:
        """Drop adapter ``name`` (pinned or not); unknown names are ignored."""
        ...


@runtime_checkable
class ContextEngine(Engine, Protocol):
    """An engine that knows its context length: the most tokens (prompt plus generated) a request may
    hold. The worker reports it once, in its ``loaded`` message, and the server shows it
    (``max_model_len`` on ``/v1/models``); an engine without the attribute reports none."""

    max_model_len: int


@runtime_checkable
class InputLimitEngine(Engine, Protocol):
    """An engine that knows, before tokenizing, which prompts cannot fit: ``max_input_length`` (prompt
    tokens at most) and ``max_token_bytes`` (the most UTF-8 bytes of prompt text one token stands
    for; None where no such bound holds: ``lmi_core.request_checks.max_token_bytes``). The worker
    reports both once, in its ``loaded`` message, and the server refuses a prompt that cannot fit
    before it crosses the worker socket (``request_checks.refuse_unfit_prompt``)."""

    max_input_length: int
    max_token_bytes: int | None


@runtime_checkable
class ImageEngine(Engine, Protocol):
    """An engine that reads images (``GenerationRequest.images``): at most ``max_images`` per prompt
    (``option.limit_mm_per_prompt``; 1 by default for an image model). The worker reports it in its
    ``loaded`` message; the server refuses more images (any, for an engine without the attribute)
    before it reads them."""

    max_images: int
