"""Request bodies of the OpenAI Responses API (pydantic) and their translation onto a chat request.

Invariant: a Responses request runs as the chat request ``chat_request`` builds, through the one chat
path (templates, tool parsers, structured output, sampling); nothing here generates. Each input item
is validated on its own, so a bad one is a 400 naming ``input.<i>.<field>``. Unknown fields are
ignored and listed as on the chat API (issue 10). Hosted tools this server cannot run (``web_search``,
``file_search``, ``mcp``, ``custom``...) are left out of the model's tools and listed the same way;
a ``namespace`` tool's functions are shown to the model as ``<namespace>__<name>`` and their calls
come back with ``namespace`` and ``name`` apart, as vLLM does. Image, file and audio inputs are a 400
until this server has a multimodal path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from lmi_core.engine import StructuredOutput
from lmi_core.errors import BadRequestError
from lmi_core.http.lmi_protocol import KeepAliveField, parse_model
from lmi_core.http.openai_protocol import MAX_TOKENS, ChatCompletionRequest, OpenAIBody, parse_part
from lmi_core.http.structured import ANY_OBJECT
from lmi_core.http.tool_calls import TOOL_NAME

NAMESPACE_SEPARATOR = "__"  # vLLM's flat name of a namespace's function: <namespace>__<name>
TEXT_PARTS = frozenset({"input_text", "output_text", "text", "summary_text", "reasoning_text"})
UNSUPPORTED_PARTS = {"input_file": "file", "input_audio": "audio"}


class TextPart(OpenAIBody):
    type: str
    text: str | None = None
    refusal: str | None = None  # an earlier answer's refusal part, replayed as text
    annotations: list[Any] | None = None  # an earlier answer's, replayed: no effect
    logprobs: list[Any] | None = None
    image_url: str | None = None  # an input_image part's URL (data: or an allow-listed http(s) URL)
    detail: str | None = None  # an input_image part's detail: no effect (the processor sizes the image)
    file_id: str | None = None  # an input_image part naming an uploaded file: refused (no files API)


class Item(OpenAIBody):
    id: str | None = None  # an earlier output item's id and status, replayed: no effect
    status: str | None = None


class MessageItem(Item):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[TextPart]


class FunctionCallItem(Item):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    namespace: str | None = None


class FunctionCallOutputItem(Item):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[TextPart]


class ReasoningItem(Item):
    type: Literal["reasoning"]
    summary: list[TextPart] = Field(default_factory=list)
    content: list[TextPart] | None = None
    encrypted_content: str | None = None  # another server's: no effect here


ITEMS: dict[str, type[Item]] = {
    "message": MessageItem,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
    "reasoning": ReasoningItem,
}


class FunctionTool(OpenAIBody):
    """A Responses function tool (flat: ``name`` beside ``type``, not in a ``function`` object)."""

    type: Literal["function"]
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def chat(self, name: str) -> dict[str, Any]:
        """The chat ``tools`` entry of this function, shown to the model as ``name``."""
        function: dict[str, Any] = {
            "name": name,
            "description": self.description,
            "parameters": self.parameters,
            "strict": self.strict,
        }
        return {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}


class TextFormat(OpenAIBody):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None  # always enforced, as on the chat API


class TextConfig(OpenAIBody):
    format: TextFormat | None = None


@dataclass
class Translation:
    """A Responses request as chat: its input as chat messages, its tools, what was ignored."""

    messages: list[dict[str, Any]]  # this request's input, without the instructions
    # Each input_image part of the input, as the request names it (``input.0.content.1.image_url``), in
    # the order chat meets them (the last images of the chat request: history comes before the input).
    images: list[str] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)  # chat ``tools`` entries
    namespaces: dict[str, tuple[str, str]] = field(default_factory=dict)  # flat name -> (namespace, name)
    ignored: list[str] = field(default_factory=list)  # unknown fields and hosted tools (``tools.3``)


class ResponsesRequest(KeepAliveField, OpenAIBody):
    """``POST /v1/responses``."""

    model: str | None = None
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    stream: bool = False
    store: bool = True  # honoured only where the model keeps responses (option.responses_store)
    background: bool = False
    user: str | None = None
    reasoning: dict[str, Any] | None = None  # effort/summary: echoed; the model's template decides

    def translate(self) -> Translation:
        """This request's input and tools as chat sees them; a 400 naming the item or tool at fault."""
        if self.background:
            raise BadRequestError("background responses are not supported by this server", param="background")
        translation = Translation([])
        items = []
        for i, raw in enumerate(
            [{"role": "user", "content": self.input}] if isinstance(self.input, str) else self.input
        ):
            kind = raw.get("type", "message")  # a bare {"role", "content"} is a message
            if not isinstance(kind, str) or kind not in ITEMS:
                raise BadRequestError(
                    f"input item type {str(kind)[:40]!r} is not supported by this server "
                    f"(known: {', '.join(ITEMS)})",
                    param=f"input.{i}.type",
                )
            items.append(parse_part(ITEMS[kind], raw, f"input.{i}.", translation.ignored))
        translation.messages = chat_messages(items)
        translation.images = [
            f"input.{i}.content.{j}.image_url"
            for i, item in enumerate(items)
            if isinstance(item, MessageItem) and not isinstance(item.content, str)
            for j, part in enumerate(item.content)
            if part.type == "input_image"
        ]
        for i, raw in enumerate(self.tools or []):
            if raw.get("type") == "function":
                self._add_tool(translation, raw, f"tools.{i}.", None)
            elif raw.get("type") == "namespace" and isinstance(raw.get("tools"), list):
                for j, inner in enumerate(raw["tools"]):
                    if isinstance(inner, dict) and inner.get("type") == "function":
                        self._add_tool(translation, inner, f"tools.{i}.tools.{j}.", str(raw.get("name", "")))
                    else:
                        translation.ignored.append(f"tools.{i}.tools.{j}")
            else:  # a hosted tool (web_search, file_search, mcp, custom...): nothing here runs it
                translation.ignored.append(f"tools.{i}")
        return translation

    @staticmethod
    def _add_tool(translation: Translation, raw: dict[str, Any], prefix: str, namespace: str | None) -> None:
        tool = parse_part(FunctionTool, raw, prefix, translation.ignored)
        name = tool.name
        if namespace is not None:
            name = flat_name(namespace, tool.name)
            translation.namespaces[name] = (namespace, tool.name)
        translation.tools.append(tool.chat(name))

    def chat_tool_choice(self, tools: list[dict[str, Any]]) -> str | dict[str, Any] | None:
        choice = self.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
                raise BadRequestError(
                    'tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}',
                    param="tool_choice",
                )
            return {"type": "function", "function": {"name": choice["name"]}}
        if choice in ("auto", "none") and not tools:  # only hosted tools: nothing to choose from
            return None
        return choice

    def constraint(self) -> tuple[StructuredOutput, str] | None:
        """``text.format``'s output constraint (the structured-output path), or None for text."""
        fmt = self.text.format if self.text is not None else None
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return StructuredOutput("json", ANY_OBJECT), "text.format"
        if fmt.schema_ is None:
            raise BadRequestError(
                "text.format of type json_schema needs a schema", param="text.format.schema"
            )
        return StructuredOutput("json", json.dumps(fmt.schema_)), "text.format.schema"

    def chat_request(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> ChatCompletionRequest:
        """The chat request this one runs as, over ``messages`` (the whole conversation)."""
        if self.instructions:
            messages = [{"role": "system", "content": self.instructions}, *messages]
        body: dict[str, Any] = {"messages": messages, "stream": self.stream}
        if self.stream:  # the final event carries the usage
            body["stream_options"] = {"include_usage": True}
        optional = {
            "max_completion_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "user": self.user,
            "tools": tools or None,
            "tool_choice": self.chat_tool_choice(tools),
            "parallel_tool_calls": self.parallel_tool_calls if tools else None,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        chat: ChatCompletionRequest = parse_model(ChatCompletionRequest, body)
        return chat


def flat_name(namespace: str, name: str) -> str:
    return f"{namespace}{NAMESPACE_SEPARATOR}{name}"


def _text(parts: str | list[TextPart], param: str) -> str:
    """The text of a content field: a string, or its text parts joined; other media are a 400."""
    if isinstance(parts, str):
        return parts
    return "".join(_part_text(part, f"{param}.{j}") for j, part in enumerate(parts))


def _part_text(part: TextPart, param: str) -> str:
    if part.type in UNSUPPORTED_PARTS or part.type == "input_image":
        kind = UNSUPPORTED_PARTS.get(part.type, "image")
        where = "" if part.type in UNSUPPORTED_PARTS else " here (only in a message's content)"
        message = f"{kind} inputs are not supported by this server{where} ({param} is {part.type})"
        raise BadRequestError(message, param=param)
    if part.type == "refusal":
        return part.refusal or ""
    if part.type in TEXT_PARTS and part.text is not None:
        return part.text
    raise BadRequestError(
        f"content part type {part.type[:40]!r} is not supported by this server", param=f"{param}.type"
    )


def _content(parts: str | list[TextPart], param: str) -> str | list[dict[str, Any]]:
    """A message's content as chat's: its text, or with an ``input_image`` part, chat's text and
    ``image_url`` parts (read by the chat path: ``lmi_core.http.media``)."""
    if isinstance(parts, str) or all(part.type != "input_image" for part in parts):
        return _text(parts, param)
    chat: list[dict[str, Any]] = []
    for j, part in enumerate(parts):
        if part.type != "input_image":
            chat.append({"type": "text", "text": _part_text(part, f"{param}.{j}")})
        elif part.image_url is None:
            message = "an input_image part needs image_url (file_id needs a files API this server lacks)"
            raise BadRequestError(message, param=f"{param}.{j}.image_url")
        else:
            chat.append({"type": "image_url", "image_url": {"url": part.image_url}})
    return chat


def chat_messages(items: list[Item]) -> list[dict[str, Any]]:
    """Input items as chat messages: an assistant message and the function calls after it are one
    message with ``tool_calls``; a call's output is a ``tool`` message; a reasoning item's text goes
    to the next assistant message as ``reasoning_content`` (chat templates render it there)."""
    messages: list[dict[str, Any]] = []
    reasoning: list[str] = []

    def assistant(message: dict[str, Any]) -> dict[str, Any]:
        if reasoning:
            message["reasoning_content"] = "".join(reasoning)
            reasoning.clear()
        messages.append(message)
        return message

    for i, item in enumerate(items):
        if isinstance(item, MessageItem):
            if item.role == "assistant":
                assistant({"role": "assistant", "content": _text(item.content, f"input.{i}.content")})
            else:  # "developer" is OpenAI's newer name for "system", the one chat templates know
                content = _content(item.content, f"input.{i}.content")
                messages.append(
                    {"role": "system" if item.role == "developer" else item.role, "content": content}
                )
        elif isinstance(item, ReasoningItem):
            reasoning.append(_text(item.content or item.summary, f"input.{i}.content"))
        elif isinstance(item, FunctionCallItem):
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant" or reasoning:
                last = assistant({"role": "assistant", "content": ""})
            name = flat_name(item.namespace, item.name) if item.namespace else item.name
            function = {"name": name, "arguments": item.arguments}
            last.setdefault("tool_calls", []).append(
                {"id": item.call_id, "type": "function", "function": function}
            )
        elif isinstance(item, FunctionCallOutputItem):
            output = _text(item.output, f"input.{i}.output")
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
    return messages
