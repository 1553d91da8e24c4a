"""The chat template every engine applies (``lmi_core.prompts.chat_text``): the request's tools and
chat_template_kwargs reach it, and a missing or refusing template is a 400 naming ``messages``."""

from __future__ import annotations

from typing import Any

import pytest

from lmi_core.engine import GenerationRequest
from lmi_core.errors import BadRequestError
from lmi_core.prompts import chat_text


class _Tokenizer:
    """A tokenizer whose template shows what it was given."""

    def __init__(self, template: str | None = "t", fail: bool = False) -> None:
        self.chat_template = template
        self.fail = fail

    def apply_chat_template(self, messages: Any, **kwargs: Any) -> str:
        if self.fail:
            raise ValueError("Conversation roles must alternate")
        return repr((messages, sorted(kwargs.items())))


def test_the_template_gets_the_tools_and_the_kwargs() -> None:
    messages = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f"}}]
    request = GenerationRequest(
        "r", messages=messages, tools=tools, chat_template_kwargs={"enable_thinking": False}
    )
    assert chat_text(request, _Tokenizer()) == repr(
        (
            messages,
            [
                ("add_generation_prompt", True),
                ("continue_final_message", False),
                ("enable_thinking", False),
                ("tokenize", False),
                ("tools", tools),
            ],
        )
    )


def test_no_template_or_a_refusing_one_is_a_400_naming_messages() -> None:
    request = GenerationRequest("r", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(BadRequestError, match="no chat template") as info:
        chat_text(request, _Tokenizer(template=None))
    assert info.value.param == "messages"
    with pytest.raises(BadRequestError, match="must alternate") as info:
        chat_text(request, _Tokenizer(fail=True))
    assert info.value.param == "messages"


async def test_the_shared_codec_refuses_to_tokenize_images_it_cannot_expand() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from lmi_core.operations import Tokenize
    from lmi_core.prompts import PromptCodec

    request = GenerationRequest("r", messages=[{"role": "user", "content": [{"type": "image"}]}])
    request.images = [b"\x89PNG"]
    with ThreadPoolExecutor(1) as executor:
        codec = PromptCodec(_Tokenizer(), str, 512, executor)
        with pytest.raises(BadRequestError, match="only when it generates") as info:
            await codec.tokenize(Tokenize(request))
    assert info.value.param == "messages"
