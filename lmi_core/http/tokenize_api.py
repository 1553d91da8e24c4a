"""vLLM's ``/tokenize`` and ``/detokenize``: a prompt's tokens as the model's engine counts them.

Invariant: a tokenize request runs the ``Tokenize`` operation on one of the model's workers, which
encodes the prompt exactly as a generation of the same request would (``lmi_core.prompts``), so
``count`` equals that generation's prompt tokens. The bodies and answers are vLLM's (completion form
``prompt``, chat form ``messages``; ``{count, max_model_len, tokens, token_strs}``; ``{prompt}``),
and so is the error shape. Unknown fields are ignored as on the OpenAI routes.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lmi_core.engine import GenerationRequest
from lmi_core.errors import BadRequestError
from lmi_core.http.adapters import model_or_adapter
from lmi_core.http.common import new_request_id, read_json, until_disconnected
from lmi_core.http.context import request_context
from lmi_core.http.lmi_protocol import parse_model
from lmi_core.http.media import load_images
from lmi_core.http.openai_api import image_parts, unknown_fields, with_ignored
from lmi_core.http.openai_protocol import ChatMessage, OpenAIBody, TemplateFields
from lmi_core.http.state import AppState
from lmi_core.http.tool_calls import ToolDef
from lmi_core.operations import Detokenize, Tokenize
from lmi_core.option_values import allowed_media_domains

TOKEN_ID = Annotated[int, Field(ge=0, lt=2**31)]


class TokenizeCompletionRequest(OpenAIBody):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(TemplateFields, OpenAIBody):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # The chat template writes the special tokens; True adds the tokenizer's on top (vLLM's default).
    add_special_tokens: bool = False
    return_token_strs: bool = False
    tools: list[ToolDef] | None = Field(None, max_length=128)

    @model_validator(mode="after")
    def _one_ending(self) -> TokenizeChatRequest:
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        return self


class DetokenizeRequest(OpenAIBody):
    model: str | None = None
    tokens: list[TOKEN_ID] = Field(max_length=2**20)


async def tokenize(request: Request) -> Response:
    state: AppState = request.app.state.lmi
    raw = await read_json(request, state.config.max_request_size, allow_text=False)
    chat = isinstance(raw, dict) and "messages" in raw
    body = parse_model(TokenizeChatRequest if chat else TokenizeCompletionRequest, raw)
    pool, adapter = model_or_adapter(request, body.model)
    ignored = unknown_fields(pool, body)
    if isinstance(body, TokenizeChatRequest):
        refs = image_parts(pool, [ref for i, m in enumerate(body.messages) for ref in m.images(i)])
        if refs and (
            body.add_special_tokens or body.continue_final_message or not body.add_generation_prompt
        ):
            raise BadRequestError(
                "a prompt with images is counted as its generation encodes it: add_generation_prompt "
                "true, continue_final_message and add_special_tokens false",
                param=refs[0].param,
            )
        generation = GenerationRequest(
            new_request_id(),
            messages=[m.for_template() for m in body.messages],
            # As a chat request with these tools puts them in its template (tool_calls.tool_plan).
            tools=[t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
            chat_template_kwargs=body.template_kwargs(pool.config.options) or None,
            adapter=adapter,
        )
        if refs:  # an engine expands an image's tokens from its pixels, as for the generation
            generation.images = await load_images(refs, allowed_media_domains(pool.config.options))
        operation = Tokenize(
            generation,
            body.add_special_tokens,
            body.add_generation_prompt,
            body.continue_final_message,
            body.return_token_strs,
        )
    else:
        generation = GenerationRequest(new_request_id(), prompt=body.prompt, adapter=adapter)
        operation = Tokenize(generation, body.add_special_tokens, token_strs=body.return_token_strs)
    result = await until_disconnected(request, pool.perform(operation, request_context(request)))
    answer: dict[str, Any] = {
        "count": len(result.ids),
        "max_model_len": pool.max_model_len,
        "tokens": result.ids,
        "token_strs": result.token_strs,
    }
    return with_ignored(JSONResponse(answer), ignored)


async def detokenize(request: Request) -> Response:
    state: AppState = request.app.state.lmi
    body = parse_model(DetokenizeRequest, await read_json(request, state.config.max_request_size, False))
    pool, _ = model_or_adapter(request, body.model)
    ignored = unknown_fields(pool, body)
    text = await until_disconnected(request, pool.perform(Detokenize(body.tokens), request_context(request)))
    return with_ignored(JSONResponse({"prompt": text}), ignored)


routes = [
    Route("/tokenize", tokenize, methods=["POST"]),
    Route("/detokenize", detokenize, methods=["POST"]),
]
