"""Run inside the clients' virtual environment: litellm and langchain-openai against an lmi-core URL.

``python sdk_clients.py URL MODEL`` prints one JSON object: for each client, chat and completion,
streamed and not, the text it got (and the usage where the client reports one). No assertions here:
the test in the server's environment checks the answers against the server's own.
"""

from __future__ import annotations

import json
import sys
from typing import Any

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "hello world"}]
MAX_TOKENS = 6


def with_litellm(base: str, model: str) -> dict[str, Any]:
    import litellm

    # "openai/<name>": litellm's route for any OpenAI-compatible server at api_base.
    common: dict[str, Any] = {
        "model": f"openai/{model}",
        "api_base": f"{base}/v1",
        "api_key": "unused",
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    chat = litellm.completion(messages=MESSAGES, **common)
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in litellm.completion(messages=MESSAGES, stream=True, **common)
    )
    text = litellm.text_completion(prompt=PROMPT, **common)
    text_streamed = "".join(
        chunk.choices[0].text or "" for chunk in litellm.text_completion(prompt=PROMPT, stream=True, **common)
    )
    return {
        "chat": chat.choices[0].message.content,
        "chat_usage": dict(chat.usage),
        "chat_stream": streamed,
        "completion": text.choices[0].text,
        "completion_stream": text_streamed,
    }


def with_langchain(base: str, model: str) -> dict[str, Any]:
    from langchain_openai import ChatOpenAI, OpenAI

    common: dict[str, Any] = {
        "model": model,
        "base_url": f"{base}/v1",
        "api_key": "unused",
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    chat = ChatOpenAI(**common)
    answer = chat.invoke([("user", MESSAGES[0]["content"])])
    streamed = "".join(str(chunk.content) for chunk in chat.stream([("user", MESSAGES[0]["content"])]))
    llm = OpenAI(**common)
    return {
        "chat": answer.content,
        "chat_usage": answer.usage_metadata,
        "chat_stream": streamed,
        "completion": llm.invoke(PROMPT),
        "completion_stream": "".join(llm.stream(PROMPT)),
    }


def main() -> None:
    base, model = sys.argv[1], sys.argv[2]
    print(json.dumps({"litellm": with_litellm(base, model), "langchain": with_langchain(base, model)}))


if __name__ == "__main__":
    main()
