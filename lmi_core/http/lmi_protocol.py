"""Request bodies of the native LMI API (pydantic), and their mapping to engine parameters."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmi_core.engine import SamplingParams
from lmi_core.errors import BadRequestError


class LmiParameters(BaseModel):
    """``parameters`` of an LMI request (TGI-like); unknown keys and loose types are a 400 naming them."""

    # strict: "do_sample": 1 or "max_new_tokens": "5" are mistakes to report, not to coerce.
    model_config = ConfigDict(extra="forbid", strict=True)

    max_new_tokens: int = Field(30, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0)
    stop_sequences: list[str] = Field(default_factory=list, max_length=16)
    stop: list[str] | None = Field(None, max_length=16)
    details: bool = False
    return_full_text: bool = False
    ignore_eos_token: bool = False
    top_n_tokens: int = Field(0, ge=0, le=20)
    stream_interval: int | None = Field(None, ge=1)

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
            top_k=self.top_k,
            seed=self.seed,
            stop_sequences=[*self.stop_sequences, *(self.stop or [])],
            ignore_eos=self.ignore_eos_token,
            top_logprobs=self.top_n_tokens,
            stream_interval=self.stream_interval,
        )


class LmiRequest(BaseModel):
    """``{"inputs": str, "parameters": {...}, "stream": bool}``."""

    model_config = ConfigDict(extra="forbid")

    inputs: str = Field(min_length=1)
    parameters: LmiParameters = Field(default_factory=LmiParameters)
    stream: bool = False


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
