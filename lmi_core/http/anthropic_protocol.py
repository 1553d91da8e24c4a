"""Request bodies of Anthropic's Messages API (pydantic) and their translation onto a chat request.

Invariant: a Messages request runs as the chat request ``chat_request`` builds, through the one chat
path; nothing here generates. Each content block is validated on its own, so a bad one is a 400 naming
``messages.<i>.content.<j>.<field>``. Unknown fields are ignored and listed as on the chat API (issue
10): Claude Code's ``context_management``, ``output_config``, ``cache_control``, ``defer_loading``...
Anthropic's server tools (``web_search_20250305``, ``bash_20250124``...), which this server cannot
run, are left out of the model's tools and listed the same way. Image blocks in user messages
become chat's ``image_url`` parts (a vision model reads them; a text-only one answers chat's 400);
documents, and images inside a ``tool_result``, are a 400. Claude Code's
``x-anthropic-billing-header`` system block is dropped: it differs on every request, and a prompt
that starts differently every time defeats the prefix cache and prefix-aware routing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from lmi_core.errors import BadRequestError
from lmi_core.http.lmi_protocol import KeepAliveField, parse_model
from lmi_core.http.openai_protocol import (
    MAX_STOP,
    MAX_TOKENS,
    ChatCompletionRequest,
    OpenAIBody,
    parse_part,
)
from lmi_core.http.tool_calls import TOOL_NAME

BILLING_HEADER = "x-anthropic-billing-header"
UNSUPPORTED_BLOCKS = {"document": "document", "search_result": "search result"}


class Block(OpenAIBody):
    type: str
    cache_control: dict[str, Any] | None = None  # prompt caching hints: the prefix cache is automatic here


class TextBlock(Block):
    type: Literal["text"]
    text: str
    citations: list[Any] | None = None  # an earlier answer's, replayed: no effect


class ToolUseBlock(Block):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolResultBlock(Block):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[dict[str, Any]] = ""
    is_error: bool | None = None


class ImageSource(OpenAIBody):
    """Anthropic's image source: inline (``base64`` with its ``media_type``) or a ``url``."""

    type: Literal["base64", "url"]
    media_type: str | None = Field(None, pattern=r"^image/[a-z0-9.+-]+$")
    data: str | None = None
    url: str | None = None


class ImageBlock(Block):
    """An image in a user message: chat's ``image_url`` part (a ``data:`` URL for inline bytes), so the
    model's image limits, the media domains and the checks of a malformed image apply as in chat."""

    type: Literal["image"]
    source: ImageSource

    def url(self, param: str) -> str:
        source = self.source
        if source.type == "base64" and source.media_type is not None and source.data is not None:
            return f"data:{source.media_type};base64,{source.data}"
        if source.type == "url" and source.url is not None:
            return source.url
        needs = "media_type and data" if source.type == "base64" else "url"
        raise BadRequestError(
            f"invalid request field '{param}.source': a {source.type} image source has its {needs}",
            param=f"{param}.source",
        )


class ThinkingBlock(Block):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None  # this server's thinking is not signed: accepted, no effect


class RedactedThinkingBlock(Block):
    type: Literal["redacted_thinking"]
    data: str  # opaque (another server's): dropped


BLOCKS: dict[str, type[Block]] = {
    "text": TextBlock,
    "tool_use": ToolUseBlock,
    "tool_result": ToolResultBlock,
    "image": ImageBlock,
    "thinking": ThinkingBlock,
    "redacted_thinking": RedactedThinkingBlock,
}
# The blocks each role's content may hold (``system``: the top-level field and inline system messages).
ROLE_BLOCKS = {
    "user": frozenset({"text", "image", "tool_result"}),
    "assistant": frozenset({"text", "tool_use", "thinking", "redacted_thinking"}),
    "system": frozenset({"text"}),
}


class Message(OpenAIBody):
    # "system": Claude Code's mid-conversation reminders; they stay system messages where they are.
    role: Literal["user", "assistant", "system"]
    content: str | list[dict[str, Any]]


class Tool(OpenAIBody):
    """A client tool (``type`` absent or ``custom``): a function the model may call."""

    type: Literal["custom"] | None = None
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(OpenAIBody):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(OpenAIBody):
    # Accepted: the model's chat template and reasoning parser decide whether it thinks and how the
    # thinking is split off (thinking blocks); a budget is not enforced.
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=0)


@dataclass
class Translation:
    """A Messages request as chat: its conversation as chat messages, its tools, what was ignored."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


class CountTokensRequest(OpenAIBody):
    """``POST /v1/messages/count_tokens``: the prompt of a Messages request, without sampling."""

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None

    def translate(self) -> Translation:
        """The conversation and tools as chat sees them; a 400 naming the block or tool at fault."""
        translation = Translation([])
        if self.system is not None:
            system = self._blocks(translation, "system", self.system, "system")
            translation.messages += _chat_messages("system", system, "system")
        for i, message in enumerate(self.messages):
            param = f"messages.{i}.content"
            blocks = self._blocks(translation, message.role, message.content, param)
            translation.messages += _chat_messages(message.role, blocks, param)
        for i, raw in enumerate(self.tools or []):
            if raw.get("type", "custom") != "custom":  # a server tool: nothing here runs it
                translation.ignored.append(f"tools.{i}")
                continue
            tool = parse_part(Tool, raw, f"tools.{i}.", translation.ignored)
            function = {"name": tool.name, "description": tool.description, "parameters": tool.input_schema}
            function = {k: v for k, v in function.items() if v is not None}
            translation.tools.append({"type": "function", "function": function})
        return translation

    @staticmethod
    def _blocks(
        translation: Translation, role: str, content: str | list[dict[str, Any]], param: str
    ) -> list[Block]:
        """``content`` as validated blocks of a ``role`` message (a string is one text block)."""
        if isinstance(content, str):
            return [TextBlock(type="text", text=content)]
        blocks = []
        for j, raw in enumerate(content):
            kind = raw.get("type")
            if not isinstance(kind, str):
                raise BadRequestError(
                    f"invalid request field '{param}.{j}.type': a block names its type",
                    param=f"{param}.{j}.type",
                )
            if kind in UNSUPPORTED_BLOCKS:
                raise BadRequestError(
                    f"{UNSUPPORTED_BLOCKS[kind]} blocks are not supported by this server yet "
                    f"({param}.{j} is {kind})",
                    param=f"{param}.{j}",
                )
            if kind not in ROLE_BLOCKS[role]:
                allowed = ", ".join(sorted(ROLE_BLOCKS[role]))
                raise BadRequestError(
                    f"invalid request field '{param}.{j}.type': {str(kind)[:40]!r} is not a block a {role} "
                    f"message holds here ({allowed})",
                    param=f"{param}.{j}.type",
                )
            blocks.append(parse_part(BLOCKS[kind], raw, f"{param}.{j}.", translation.ignored))
        return blocks

    def chat_tool_choice(
        self, tools: list[dict[str, Any]]
    ) -> tuple[str | dict[str, Any] | None, bool | None]:
        """Chat's ``tool_choice`` and ``parallel_tool_calls``."""
        choice = self.tool_choice
        if choice is None:
            return ("auto" if tools else None), None
        parallel = None if choice.disable_parallel_tool_use is None else not choice.disable_parallel_tool_use
        if choice.type == "tool":
            if not choice.name:
                raise BadRequestError(
                    "invalid request field 'tool_choice.name': a tool_choice of type tool names the tool",
                    param="tool_choice.name",
                )
            return {"type": "function", "function": {"name": choice.name}}, parallel
        if not tools and choice.type in ("auto", "none"):  # only server tools: nothing to choose from
            return None, None
        return {"auto": "auto", "any": "required", "none": "none"}[choice.type], parallel

    def chat_fields(self) -> dict[str, Any]:
        """The chat fields beyond the prompt (a count has none: ``MessagesRequest`` adds sampling)."""
        return {}

    def chat_request(self, translation: Translation) -> ChatCompletionRequest:
        """The chat request this one runs as: the same prompt (messages, the tools its tool_choice
        shows the model) for a count and for a generation."""
        choice, parallel = self.chat_tool_choice(translation.tools)
        body: dict[str, Any] = {"messages": translation.messages, **self.chat_fields()}
        if translation.tools:
            body.update(tools=translation.tools, tool_choice=choice)
            if parallel is not None:
                body["parallel_tool_calls"] = parallel
        elif choice is not None:
            body["tool_choice"] = choice  # a choice without tools: chat's 400 names it
        chat: ChatCompletionRequest = parse_model(ChatCompletionRequest, body)
        return chat


class MessagesRequest(KeepAliveField, CountTokensRequest):
    """``POST /v1/messages``."""

    max_tokens: int = Field(ge=1, le=MAX_TOKENS)
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP)
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=MAX_TOKENS)
    metadata: dict[str, Any] | None = None  # user_id: accepted, no effect

    def chat_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"max_completion_tokens": self.max_tokens, "stream": self.stream}
        if self.stream:  # message_start's input_tokens and message_delta's usage come from chat's
            fields["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        sampling = {
            "stop": self.stop_sequences,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
        }
        return fields | {k: v for k, v in sampling.items() if v is not None}


def _result_text(block: ToolResultBlock, param: str) -> str:
    if isinstance(block.content, str):
        return block.content
    texts = []
    for k, part in enumerate(block.content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = str(part.get("type"))[:40]
            raise BadRequestError(
                f"tool_result content must be text blocks on this server ({param}.{k} is {kind})",
                param=f"{param}.{k}",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _chat_messages(role: str, blocks: list[Block], param: str) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages: a user message's tool results become ``tool`` messages
    (first: they answer the previous turn's calls), its text and images one user message (text and
    ``image_url`` parts, in order, when it has an image); an assistant message's text, ``tool_use``
    and thinking one assistant message (``tool_calls``, ``reasoning_content``)."""
    texts = [b.text for b in blocks if isinstance(b, TextBlock)]
    messages: list[dict[str, Any]] = []
    if role == "assistant":
        message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
        thinking = "".join(b.thinking for b in blocks if isinstance(b, ThinkingBlock))
        if thinking:
            message["reasoning_content"] = thinking
        calls = [
            {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
            for b in blocks
            if isinstance(b, ToolUseBlock)
        ]
        if calls:
            message["tool_calls"] = calls
        return [message]
    for j, block in enumerate(blocks):
        if isinstance(block, ToolResultBlock):
            content = _result_text(block, f"{param}.{j}.content")
            messages.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": content})
    if role == "system":
        text = "\n".join(t for t in texts if not t.startswith(BILLING_HEADER))
        return [{"role": "system", "content": text}] if text else []
    if any(isinstance(b, ImageBlock) for b in blocks):  # text and image parts, in their order
        parts = [
            {"type": "text", "text": b.text}
            if isinstance(b, TextBlock)
            else {"type": "image_url", "image_url": {"url": b.url(f"{param}.{j}")}}
            for j, b in enumerate(blocks)
            if isinstance(b, TextBlock | ImageBlock)
        ]
        messages.append({"role": role, "content": parts})
    elif texts or not messages:
        messages.append({"role": role, "content": "".join(texts)})
    return messages
