"""Request bodies of the OpenAI-compatible API (pydantic) and their mapping to engine parameters.

Unknown fields are ignored as vLLM does (clients replay whole transcripts: ``refusal``,
``tool_calls``...): ``ignored_fields`` lists them for a response header and a log line, and a model
with ``option.strict_request_fields=true`` refuses them with a 400 naming them, as OpenAI does. Known
fields are strictly typed and range-checked. Known OpenAI fields this server cannot honour (tools,
suffix...) are accepted at their neutral value and are a 400 naming the field otherwise: a silently
ignored parameter is a wrong answer the client cannot see.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lmi_core.engine import SamplingParams
from lmi_core.errors import BadRequestError
from lmi_core.http.lmi_protocol import KeepAliveField, parse_model
from lmi_core.http.media import ImageRef
from lmi_core.http.structured import GuidedFields
from lmi_core.http.tool_calls import ToolFields, template_message
from lmi_core.option_values import default_chat_template_kwargs

# Bounds that keep every number representable on the worker wire (msgpack, 64-bit) and the fan-out sane.
MAX_TOKENS = 2**31 - 1
MAX_CHOICES = 16
MAX_STOP = 4
MAX_PROMPTS = 256  # prompts in one completions request (lm-eval batches; each runs in the batch)
MAX_GENERATIONS = 256  # prompts x n: the generations one request may start
TOKEN_ID_DIGITS = 9  # a token id below 10**9 (every vocabulary; keeps it 32-bit on the worker wire)
SEED_RANGE = 2**63


Part = TypeVar("Part", bound=BaseModel)
LOGIT_BIAS_RANGE = 100.0  # OpenAI: each bias in [-100, 100]


class OpenAIBody(BaseModel):
    # Strict: JSON types as documented (no "1" for 1, no 0 for false), as OpenAI validates them.
    # Extra keys are kept aside (model_extra) so that the handler can ignore or refuse them.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)


def ignored_fields(body: BaseModel, prefix: str = "") -> list[str]:
    """Dotted names of the unknown fields in ``body`` and the models nested in it (``messages.1.refusal``)."""
    found = [f"{prefix}{name}" for name in body.model_extra or {}]
    for name in type(body).model_fields:
        value = getattr(body, name)
        if isinstance(value, BaseModel):
            found += ignored_fields(value, f"{prefix}{name}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    found += ignored_fields(item, f"{prefix}{name}.{i}.")
    return found


def parse_part(cls: type[Part], raw: Any, prefix: str, ignored: list[str]) -> Part:
    """``raw``, one part of a body (an input item, a block, a tool), as ``cls``: a 400 naming
    ``prefix`` + its field when it is invalid; its unknown fields appended to ``ignored``."""
    part: Part = parse_model(cls, raw, prefix=prefix)
    ignored += ignored_fields(part, prefix)
    return part


class StreamOptions(OpenAIBody):
    include_usage: bool = False
    # vLLM's extension: the usage so far on every chunk (guidellm counts tokens with it).
    continuous_usage_stats: bool = False


class _Common(KeepAliveField, GuidedFields, OpenAIBody):
    """Fields shared by completions and chat completions (plus vLLM's ``top_k`` and ``ignore_eos``);
    the output constraints (``response_format``, ``structured_outputs``, ``guided_*``) from GuidedFields,
    Ollama's ``keep_alive`` from KeepAliveField."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=MAX_TOKENS)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-SEED_RANGE, lt=SEED_RANGE)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extensions (its extra sampling parameters).
    ignore_eos: bool = False
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=2**31)]] = Field(default_factory=list, max_length=64)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    truncate_prompt_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    # vLLM's scheduling priority (lower is earlier), clamped to the tenant's range.
    priority: int = Field(0, ge=-(2**31), lt=2**31)

    @field_validator("logit_bias")
    @classmethod
    def _bias_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit() or len(key) > TOKEN_ID_DIGITS:
                raise ValueError(f"keys are token ids; {key[:20]!r} is not one")
            if abs(bias) > LOGIT_BIAS_RANGE:
                raise ValueError(f"bias {bias} for token {key} is outside [-100, 100]")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_count(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return value

    def check_supported(self) -> None:
        """400 for a field that is valid OpenAI but not something this server can do."""
        if self.stream_options is not None and not self.stream:
            raise BadRequestError(
                "stream_options is only allowed when stream is true", param="stream_options"
            )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats

    def sampling(
        self,
        max_new_tokens: int,
        top_logprobs: int | None,
        choice: int,
        prompt_logprobs: int | None = None,
        strict_max_tokens: bool = True,
    ) -> SamplingParams:
        """Engine parameters of choice number ``choice`` (seeded apart, so ``n`` samples differ)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        # do_sample with temperature 0 (or nearly) is greedy: SamplingParams.greedy.
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            seed=None if self.seed is None else (self.seed + choice) % SEED_RANGE,
            stop_sequences=stop,
            ignore_eos=self.ignore_eos,
            top_logprobs=top_logprobs or 0,
            logprobs=top_logprobs is not None,  # None: the client did not ask for logprobs
            strict_max_tokens=strict_max_tokens,
            stop_token_ids=list(self.stop_token_ids),
            logit_bias=[(int(k), v) for k, v in (self.logit_bias or {}).items()],
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            min_tokens=self.min_tokens,
            min_p=self.min_p,
            prompt_logprobs=prompt_logprobs if prompt_logprobs is not None else self.prompt_logprobs,
            truncate=self.truncate_prompt_tokens,
        )


class CompletionRequest(_Common):
    """``POST /v1/completions``; ``max_tokens`` defaults to 16 as in OpenAI's API."""

    # A string, strings, token ids, or lists of token ids (what lm-eval sends by default).
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[list[Annotated[int, Field(ge=0, lt=2**31)]], Field(min_length=1)]
        | Annotated[
            list[Annotated[list[Annotated[int, Field(ge=0, lt=2**31)]], Field(min_length=1)]],
            Field(min_length=1, max_length=MAX_PROMPTS),
        ]
    )
    # 0 with echo: score the prompt only (lm-eval's loglikelihood); vLLM allows it too.
    max_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)

    def check_supported(self) -> None:
        super().check_supported()
        if len(self.prompts) * self.n > MAX_GENERATIONS:
            raise BadRequestError(
                f"{len(self.prompts)} prompts x n={self.n} is more than {MAX_GENERATIONS} generations",
                param="n",
            )
        if self.max_tokens == 0 and not self.echo:
            raise BadRequestError("max_tokens=0 needs echo=true (prompt scoring)", param="max_tokens")
        if self.suffix:
            raise BadRequestError("suffix (insertion) is not supported by this server", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise BadRequestError("best_of other than n is not supported by this server", param="best_of")

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: its text, or its token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if isinstance(self.prompt[0], int):
            return [list(self.prompt)]
        return list(self.prompt)


ROLES = Literal["system", "developer", "user", "assistant", "tool"]


class ChatMessage(OpenAIBody):
    role: ROLES
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    # An assistant's earlier thinking, under either name this server answers with (vLLM renamed
    # reasoning_content to reasoning); templates read reasoning_content (DeepSeek-V3.2's tool turns
    # need it sent back).
    reasoning_content: str | None = None
    reasoning: str | None = None

    @field_validator("content")
    @classmethod
    def _parts(cls, value: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        """Text parts flattened to a string (what a text model's chat template takes); with an image,
        the parts as a list of text parts and ``image_url`` parts (``{"url": ...}``)."""
        if not isinstance(value, list):
            return value
        parts: list[dict[str, Any]] = []
        for part in value:
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image  # vLLM takes a bare URL too
                if not isinstance(url, str):
                    raise ValueError("an image_url part is {'type': 'image_url', 'image_url': {'url': ...}}")
                parts.append({"type": "image_url", "image_url": {"url": url}})
            else:
                raise ValueError("content parts are text ({'type': 'text', 'text': ...}) or image_url")
        if all(p["type"] == "text" for p in parts):
            return "".join(p["text"] for p in parts)
        return parts

    def images(self, index: int) -> list[ImageRef]:
        """This message's image parts, each named as the request names it
        (``messages.0.content.1.image_url``)."""
        if not isinstance(self.content, list):
            return []
        return [
            ImageRef(p["image_url"]["url"], f"messages.{index}.content.{j}.image_url")
            for j, p in enumerate(self.content)
            if p["type"] == "image_url"
        ]

    def for_template(self) -> dict[str, Any]:
        # "developer" is OpenAI's new name for "system"; chat templates know only the latter.
        content: str | list[dict[str, Any]] = self.content or ""
        if isinstance(content, list):  # an image is the template's {"type": "image"}; its bytes travel apart
            content = [p if p["type"] == "text" else {"type": "image"} for p in content]
        message: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": content,
        }
        if self.name:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        thinking = self.reasoning_content if self.reasoning_content is not None else self.reasoning
        if thinking is not None:
            message["reasoning_content"] = thinking
        return template_message(message)


# apply_chat_template's own arguments and the variables the engine sets: chat_template_kwargs may not
# replace them (the engine passes them itself; "tokenize" would turn the prompt into token ids).
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "tokenize",
        "add_generation_prompt",
        "continue_final_message",
        "chat_template",
        "return_dict",
    }
)


class TemplateFields(BaseModel):
    """vLLM's ``chat_template_kwargs``: extra variables for the model's chat template (mixed into the
    pydantic model of every body with ``messages``: chat, ``/tokenize``'s chat form)."""

    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(value or {}))
        if reserved:
            raise ValueError(f"{reserved[0]!r} is set by the server, not by chat_template_kwargs")
        return value

    def template_kwargs(self, options: Mapping[str, str]) -> dict[str, Any]:
        """The variables the template gets: the model's ``option.default_chat_template_kwargs``
        (``options``) with this request's over them."""
        return {**default_chat_template_kwargs(options), **(self.chat_template_kwargs or {})}


class ChatCompletionRequest(TemplateFields, ToolFields, _Common):
    """``POST /v1/chat/completions`` (and a body with ``messages`` on ``/invocations``)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # vLLM's extension: whether the answer carries the thinking a reasoning parser separates.
    include_reasoning: bool = True

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs and not self.logprobs:
            raise BadRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def images(self) -> list[ImageRef]:
        """Every image part of the messages, in the order the chat template meets them."""
        return [ref for i, message in enumerate(self.messages) for ref in message.images(i)]
