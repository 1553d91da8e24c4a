"""Request fields that constrain the output, and their conversion to one ``StructuredOutput``.

Accepted spellings: OpenAI's ``response_format`` (``text``, ``json_object``, ``json_schema``), vLLM's
``structured_outputs`` object (``json``, ``regex``, ``choice``, ``grammar``, ``json_object``) and its
older ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``. At most one
constraint per request; two are a 400 naming the second. Every constraint is compiled by the same
compiler the engine decodes with (``lmi_core.grammars``) before the request is queued: one that does
not compile is a 400 naming the field and carrying the compiler's message.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmi_core.engine import StructuredOutput
from lmi_core.errors import BadRequestError
from lmi_core.grammars import grammar_error

ANY_OBJECT = '{"type": "object"}'


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class JsonSchemaFormat(_Strict):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    # Always enforced: strict or not, the output is constrained to the schema.
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsBody(_Strict):
    """vLLM's ``structured_outputs`` (one of its constraint fields, plus the whitespace switch)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None
    # vLLM's switch; None = this server's default, compact JSON (false = flexible whitespace).
    disable_any_whitespace: bool | None = None


class ConstraintFields(BaseModel):
    """The constraint fields of the native API's ``parameters`` (mixed into its pydantic model)."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None

    def _given(self) -> list[tuple[str, StructuredOutput]]:
        found: list[tuple[str, StructuredOutput]] = []
        if self.response_format is not None and self.response_format.type != "text":
            found.append(("response_format", _from_response_format(self.response_format)))
        if self.structured_outputs is not None:
            found.append(("structured_outputs", _from_structured_outputs(self.structured_outputs)))
        return found

    def constraint(self, prefix: str = "") -> tuple[StructuredOutput, str] | None:
        """The request's constraint and the field that set it (``prefix`` + its name), or None."""
        given = self._given()
        if len(given) > 1:
            names = ", ".join(prefix + name for name, _ in given)
            raise BadRequestError(
                f"only one output constraint may be given ({names})", param=prefix + given[1][0]
            )
        if not given:
            return None
        name, constraint = given[0]
        return constraint, prefix + name


class GuidedFields(ConstraintFields):
    """The constraint fields of the OpenAI API: the native ones plus vLLM's ``guided_*``."""

    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None

    def _given(self) -> list[tuple[str, StructuredOutput]]:
        found = super()._given()
        if self.guided_json is not None:
            found.append(("guided_json", StructuredOutput("json", _schema_text(self.guided_json))))
        if self.guided_regex is not None:
            found.append(("guided_regex", StructuredOutput("regex", self.guided_regex)))
        if self.guided_choice is not None:
            found.append(("guided_choice", StructuredOutput("choice", json.dumps(self.guided_choice))))
        if self.guided_grammar is not None:
            found.append(("guided_grammar", StructuredOutput("grammar", self.guided_grammar)))
        return found


def _schema_text(schema: dict[str, Any] | str) -> str:
    return schema if isinstance(schema, str) else json.dumps(schema)


def _from_response_format(fmt: ResponseFormat) -> StructuredOutput:
    if fmt.type == "json_object":
        return StructuredOutput("json", ANY_OBJECT)
    if fmt.json_schema is None:
        raise BadRequestError(
            "response_format of type json_schema needs a json_schema object",
            param="response_format.json_schema",
        )
    return StructuredOutput("json", json.dumps(fmt.json_schema.schema_))


def _from_structured_outputs(body: StructuredOutputsBody) -> StructuredOutput:
    compact = body.disable_any_whitespace is not False
    kinds: list[StructuredOutput] = []
    if body.json_ is not None:
        kinds.append(StructuredOutput("json", _schema_text(body.json_), compact))
    if body.regex is not None:
        kinds.append(StructuredOutput("regex", body.regex))
    if body.choice is not None:
        kinds.append(StructuredOutput("choice", json.dumps(body.choice)))
    if body.grammar is not None:
        kinds.append(StructuredOutput("grammar", body.grammar))
    if body.json_object:
        kinds.append(StructuredOutput("json", ANY_OBJECT, compact))
    if len(kinds) != 1:
        raise BadRequestError(
            "structured_outputs needs exactly one of json, regex, choice, grammar, json_object",
            param="structured_outputs",
        )
    return kinds[0]


# The field inside each spelling that holds the spec, for error messages that point at it.
_SPEC_FIELD = {
    "response_format": {"json": "json_schema.schema"},
    "structured_outputs": {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar"},
}


def spec_param(param: str, constraint: StructuredOutput) -> str:
    """The field that holds ``constraint``'s spec: ``structured_outputs.regex``, ``guided_json``..."""
    base = param.rsplit(".", 1)[-1]
    inner = _SPEC_FIELD.get(base, {}).get(constraint.kind)
    return f"{param}.{inner}" if inner else param


async def check(constraint: StructuredOutput, param: str) -> None:
    """400 naming ``param``'s spec field if ``constraint`` does not compile (off the event loop:
    a large schema takes the compiler up to hundreds of milliseconds; the result is cached by text)."""
    message = await asyncio.to_thread(grammar_error, constraint)
    if message is not None:
        field = spec_param(param, constraint)
        raise BadRequestError(f"invalid {constraint.kind} constraint in '{field}': {message}", param=field)
