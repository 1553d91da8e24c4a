"""Request bodies of the native LMI API (pydantic), and their mapping to engine parameters."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmi_core.engine import SamplingParams, StructuredOutput
from lmi_core.errors import BadRequestError
from lmi_core.http.structured import ANY_OBJECT, ConstraintFields
from lmi_core.serving.residency import parse_keep_alive


class TgiGrammar(BaseModel):
    """TGI's ``grammar`` parameter: a JSON schema (``value``: the schema), a regex, or any JSON object."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["json", "regex", "json_object"]
    value: dict[str, Any] | str | None = None

    def constraint(self) -> StructuredOutput:
        if self.type == "json_object":
            return StructuredOutput("json", ANY_OBJECT)
        if self.value is None:
            raise BadRequestError(f"a grammar of type {self.type} needs a value", param="parameters.grammar")
        text = self.value if isinstance(self.value, str) else json.dumps(self.value)
        return StructuredOutput("json" if self.type == "json" else "regex", text)


class KeepAliveField(BaseModel):
    """Ollama's ``keep_alive``: how long the model stays loaded once idle after this request (a
    duration such as ``5m``, seconds, ``0``: unload after this response, ``-1``: never); top level in
    the OpenAI bodies, in ``parameters`` on the LMI routes."""

    keep_alive: int | float | str | None = None

    @field_validator("keep_alive", mode="before")  # before the union's: an error names the field
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if value is not None:
            parse_keep_alive(value)
        return value

    @property
    def keep_alive_seconds(self) -> float | None:
        """Seconds (``inf``: never); None when the request did not say."""
        return None if self.keep_alive is None else parse_keep_alive(self.keep_alive)


class LmiParameters(KeepAliveField, ConstraintFields):
    """``parameters`` of an LMI request (TGI-like); unknown keys and loose types are a 400 naming them.
    Output constraints (``response_format``, ``structured_outputs``) from ConstraintFields, and TGI's
    ``grammar``."""

    # strict: "do_sample": 1 or "max_new_tokens": "5" are mistakes to report, not to coerce.
    model_config = ConfigDict(extra="forbid", strict=True)

    max_new_tokens: int = Field(30, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # -1: no top-k (DJL's and vLLM's spelling), as 0
    seed: int | None = Field(None, ge=0)
    stop_sequences: list[str] = Field(default_factory=list, max_length=16)
    stop: list[str] | None = Field(None, max_length=16)
    details: bool | None = None  # None: the route's default (off; on in DJL's TGI mode)
    return_full_text: bool = False
    ignore_eos_token: bool = False
    top_n_tokens: int = Field(0, ge=0, le=20)
    # DJL LMI rolling-batch parameters (TGI's names and meanings).
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    typical_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    min_tokens: int = Field(0, ge=0)
    truncate: int | None = Field(None, ge=1)
    # details.prefill: the prompt's tokens with their log-probs.
    decoder_input_details: bool = False
    # One sequence per request: several candidates ranked by log-prob is no backend's feature here.
    best_of: int = Field(1, ge=1, le=1)
    stream_interval: int | None = Field(None, ge=1)
    # Scheduling priority, vLLM's polarity (lower is earlier), clamped to the tenant's range.
    priority: int = Field(0, ge=-(2**31), lt=2**31)
    # TGI's parameters (huggingface_hub sends them): its output constraint, its LoRA adapter, and
    # watermarking, which no backend here does (true is a 400).
    grammar: TgiGrammar | None = None
    adapter_id: str | None = Field(None, min_length=1)
    watermark: Literal[False] = False

    def _given(self) -> list[tuple[str, StructuredOutput]]:
        found = super()._given()
        if self.grammar is not None:
            found.append(("grammar", self.grammar.constraint()))
        return found

    @field_validator("stop_sequences", "stop", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            seed=self.seed,
            stop_sequences=[*self.stop_sequences, *(self.stop or [])],
            ignore_eos=self.ignore_eos_token,
            top_logprobs=self.top_n_tokens,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            typical_p=self.typical_p,
            min_p=self.min_p,
            min_tokens=self.min_tokens,
            truncate=self.truncate,
            prompt_logprobs=0 if self.decoder_input_details and self.details is not False else None,
            structured=constrained[0] if (constrained := self.constraint("parameters.")) else None,
            stream_interval=self.stream_interval,
        )


MAX_BATCH = 32  # inputs in one DJL batch request: the default max_rolling_batch_size (more only queue)


class LmiRequest(BaseModel):
    """``{"inputs": str | [str, ...], "parameters": {...}, "stream": bool}``; a list is DJL's batch.
    Other top-level keys are kept aside (``model_extra``): DJL reads generation parameters only from
    ``parameters`` and ignores the rest, and so does the handler (or refuses them, when strict)."""

    model_config = ConfigDict(extra="allow")

    inputs: str | list[str]
    parameters: LmiParameters = Field(default_factory=LmiParameters)
    stream: bool = False
    # LoRA adapters by name (DJL's schema): one for every input, or a list matching a list of inputs.
    adapters: str | list[str] | None = None

    @field_validator("adapters", mode="before")
    @classmethod
    def _adapter_names(cls, value: Any) -> Any:
        names = value if isinstance(value, list) else [value]
        if value is not None and not all(isinstance(n, str) and n for n in names):
            raise ValueError("adapters must be an adapter name or a list of them")
        return value

    def adapter_names(self) -> list[str | None]:
        """The adapter of each prompt (None: the base model); a list must match a list of inputs."""
        if self.adapters is None or isinstance(self.adapters, str):
            return [self.adapters] * len(self.prompts)
        if not isinstance(self.inputs, list) or len(self.adapters) != len(self.inputs):
            raise BadRequestError(
                f"adapters has {len(self.adapters)} names for {len(self.prompts)} input(s): "
                "a list of adapters must match a list of inputs",
                param="adapters",
            )
        return list(self.adapters)

    @field_validator("inputs", mode="before")
    @classmethod
    def _prompt_or_batch(cls, value: Any) -> Any:
        # Checked here, not by the union: its errors would be named "inputs.list[str]" and the like.
        prompts = value if isinstance(value, list) else [value]
        if not isinstance(value, str | list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("inputs must be a string or a list of strings")
        if not prompts or not all(prompts):
            raise ValueError("inputs must not be empty")
        if len(prompts) > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} inputs in one request")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)


def validation_error(exc: ValidationError, prefix: str = "") -> BadRequestError:
    """The first pydantic error as a 400 whose message and ``param`` name the field."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    field = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "body"
    message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
    return BadRequestError(f"invalid request field '{field}': {message}", param=field)


def parse_model(cls: type[BaseModel], body: Any, prefix: str = "") -> Any:
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc, prefix) from None
