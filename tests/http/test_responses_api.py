"""The Responses API over a fake ``ModelService``: translation onto chat, the response object, the
event sequence, tools, errors, and the store (LRU, TTL, previous_response_id, GET, cancel)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import httpx
import pytest

from lmi_core.config import ModelConfig
from lmi_core.engine import Finished, GenerationEvent, GenerationRequest, Token
from lmi_core.errors import NotFoundError, QueueFullError
from lmi_core.http.common import Stopped
from lmi_core.http.openai_render import Call
from lmi_core.http.response_store import ResponseStore, ResponseStores, StoredResponse
from lmi_core.http.responses_protocol import ResponsesRequest
from lmi_core.http.responses_render import OutputItems, ResponseRender
from lmi_core.serving.routing import RequestContext
from tests.http.fakes import FakeModel, FakeModels, app, client, model, named_events, pool, worker

TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]
HERMES = {"enable_auto_tool_choice": "true", "tool_call_parser": "hermes"}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def models(tokens: tuple[str, ...] = ("Hel", "lo"), **options: str) -> FakeModels:
    fakes = FakeModels(model("a", pool("a", worker(0))))
    fakes.served_models["a"] = FakeModel("a", tokens=tokens, options=options, finish="eos_token")
    return fakes


def events(http: Any, body: dict[str, Any]) -> list[dict[str, Any]]:
    return named_events(http, "/v1/responses", {"model": "a", **body})


def test_a_string_input_answers_a_response_object_with_the_chat_output() -> None:
    fakes = models()
    body = {
        "model": "a",
        "input": "hi",
        "instructions": "Be brief.",
        "max_output_tokens": 5,
        "metadata": {"k": "v"},
    }
    response = client(fakes).post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["object"] == "response" and result["id"].startswith("resp_")
    assert result["status"] == "completed" and result["model"] == "a" and result["metadata"] == {"k": "v"}
    (message,) = result["output"]
    assert (
        message["type"] == "message" and message["role"] == "assistant" and message["status"] == "completed"
    )
    assert message["content"] == [{"type": "output_text", "text": "Hello", "annotations": []}]
    assert result["usage"] == {
        "input_tokens": 3,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 2,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 5,
    }
    request = fakes.served_models["a"].requests[-1]
    assert request.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert request.params.max_new_tokens == 5 and request.params.strict_max_tokens


def test_max_output_tokens_reached_is_incomplete() -> None:
    fakes = models()
    fakes.served_models["a"].finish = "length"
    result = client(fakes).post("/v1/responses", json={"input": "hi", "max_output_tokens": 2}).json()
    assert result["status"] == "incomplete" and result["incomplete_details"] == {
        "reason": "max_output_tokens"
    }


def test_the_stream_is_openai_s_event_sequence_with_increasing_sequence_numbers() -> None:
    http = client(models())
    found = events(http, {"input": "hi"})
    assert [e["type"] for e in found] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in found] == list(range(len(found)))
    assert found[0]["response"]["status"] == "in_progress" and found[0]["response"]["output"] == []
    item_id = found[2]["item"]["id"]
    assert all(e["item_id"] == item_id for e in found[3:8])
    assert "".join(e["delta"] for e in found if e["type"] == "response.output_text.delta") == "Hello"
    final = found[-1]["response"]
    whole = http.post("/v1/responses", json={"input": "hi"}).json()
    assert final["status"] == whole["status"] == "completed" and final["usage"] == whole["usage"]
    assert final["output"][0]["content"] == whole["output"][0]["content"]
    assert final["output"][0]["id"] == item_id


def test_input_items_become_chat_messages() -> None:
    fakes = models()
    said = {"type": "output_text", "text": "Let me look.", "annotations": []}
    parts = [{"type": "input_text", "text": "weather "}, {"type": "input_text", "text": "?"}]
    body = {
        "input": [
            {"type": "message", "role": "developer", "content": "Be brief."},
            {"role": "user", "content": parts},
            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed", "content": [said]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "P"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        ],
        "tools": TOOLS,
        "tool_choice": "none",
    }
    response = client(fakes).post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    assert "x-lmi-ignored-fields" not in response.headers  # replayed ids and statuses are known fields
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "P"}}}
    assert fakes.served_models["a"].requests[-1].messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "weather ?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]


def test_a_reasoning_item_goes_to_the_next_assistant_message_as_reasoning_content() -> None:
    thought = {
        "type": "reasoning",
        "id": "rs_1",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": "hm"}],
    }
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    translation = ResponsesRequest(input=[{"role": "user", "content": "q"}, thought, call]).translate()
    function = {"name": "f", "arguments": "{}"}
    assert translation.messages == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "reasoning_content": "hm", "tool_calls": [
            {"id": "c1", "type": "function", "function": function}
        ]},
    ]  # fmt: skip


def test_a_function_call_comes_back_as_an_item_with_call_id_streamed_or_not() -> None:
    fakes = models(tokens=("Sure. ", CALL[:20], CALL[20:]), **HERMES)
    http = client(fakes)
    result = http.post("/v1/responses", json={"input": "weather?", "tools": TOOLS}).json()
    message, call = result["output"]
    assert message["content"][0]["text"] == "Sure. "
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["status"] == "completed"
    assert call["call_id"] and call["id"].startswith("fc_")
    assert json.loads(call["arguments"]) == {"city": "Paris"}
    assert fakes.served_models["a"].requests[-1].tools == [
        {"type": "function", "function": {k: v for k, v in TOOLS[0].items() if k != "type"}}
    ]
    found = events(http, {"input": "weather?", "tools": TOOLS})
    kinds = [e["type"] for e in found]
    added = kinds.index("response.output_item.added", kinds.index("response.output_item.done"))
    assert found[added]["item"]["type"] == "function_call" and found[added]["output_index"] == 1
    deltas = [e for e in found[added + 1 : -3]]
    assert deltas and all(e["type"] == "response.function_call_arguments.delta" for e in deltas)
    assert kinds[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    done = found[-3]
    joined = "".join(e["delta"] for e in deltas)
    assert (
        done["arguments"] == joined
        and json.loads(joined) == {"city": "Paris"}
        and done["name"] == "get_weather"
    )
    assert found[-1]["response"]["output"][1]["call_id"] == found[added]["item"]["call_id"]


def test_hosted_tools_are_ignored_and_listed_namespaces_flattened() -> None:
    fakes = models(tokens=('<tool_call>{"name": "agents__close", "arguments": {}}</tool_call>',), **HERMES)
    namespace = {
        "type": "namespace",
        "name": "agents",
        "tools": [{"type": "function", "name": "close", "parameters": {}}],
    }
    body = {"input": "x", "tools": [*TOOLS, {"type": "web_search"}, namespace]}
    response = client(fakes).post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["x-lmi-ignored-fields"] == "tools.1"
    names = [t["function"]["name"] for t in fakes.served_models["a"].requests[-1].tools or []]
    assert names == ["get_weather", "agents__close"]
    (call,) = response.json()["output"]
    assert (call["namespace"], call["name"]) == ("agents", "close")
    strict = models(strict_request_fields="true", **HERMES)
    strict.served_models["a"].config = ModelConfig(
        name="a", model_id="x", strict_request_fields=True, options=HERMES
    )
    refused = client(strict).post("/v1/responses", json=body)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tools.1"


def test_text_format_json_schema_is_the_structured_output_path() -> None:
    fakes = models(tokens=('{"a": 1}',))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "name": "x", "schema": schema, "strict": True}
    http = client(fakes)
    assert http.post("/v1/responses", json={"input": "x", "text": {"format": fmt}}).status_code == 200
    structured = fakes.served_models["a"].requests[-1].params.structured
    assert structured is not None and structured.kind == "json" and json.loads(structured.spec) == schema
    bad = http.post(
        "/v1/responses", json={"input": "x", "text": {"format": {**fmt, "schema": {"type": "nope"}}}}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "text.format.schema"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input.0.content.0",
        ),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0.type"),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input.0.call_id"),
        ({"input": "x", "tools": [{"type": "function", "name": "bad name"}]}, "tools.0.name"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "background": True}, "background"),
        ({"input": "x", "tool_choice": {"type": "web_search"}}, "tool_choice"),
        ({"input": []}, "input"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    response = client(models()).post("/v1/responses", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_unknown_fields_are_ignored_and_listed() -> None:
    response = client(models()).post(
        "/v1/responses", json={"input": "x", "prompt_cache_key": "k", "include": []}
    )
    assert response.status_code == 200
    assert response.headers["x-lmi-ignored-fields"] == "prompt_cache_key,include"


def test_without_the_store_previous_response_id_is_a_404_that_says_so() -> None:
    http = client(models())
    first = http.post("/v1/responses", json={"input": "x", "store": True}).json()
    assert first["store"] is False
    follow = http.post("/v1/responses", json={"input": "y", "previous_response_id": first["id"]})
    assert follow.status_code == 404
    assert (
        "store" in follow.json()["error"]["message"]
        and follow.json()["error"]["param"] == "previous_response_id"
    )
    assert http.get(f"/v1/responses/{first['id']}").status_code == 404


def test_an_error_after_streaming_began_is_an_error_event_then_response_failed() -> None:
    class Failing(FakeModel):
        async def generate(
            self, request: GenerationRequest, context: RequestContext | None = None
        ) -> AsyncIterator[GenerationEvent]:
            yield Token(0, "Hel", -0.5, prompt_tokens=3)
            raise QueueFullError("the worker died")

    fakes = models()
    fakes.served_models["a"] = Failing("a")
    found = events(client(fakes), {"input": "x"})
    assert [e["type"] for e in found][-2:] == ["error", "response.failed"]
    assert found[-2]["message"] == "the worker died" and found[-1]["response"]["status"] == "failed"
    assert [e["sequence_number"] for e in found] == list(range(len(found)))


# -- reasoning ---------------------------------------------------------------------------------------


async def chunks(*deltas: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
    """Chat chunks as the chat path streams them: the opening one, the deltas, the finish, the usage."""
    yield {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    for delta in deltas:
        yield {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    yield {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    yield {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}


def render() -> ResponseRender:
    call = Call(FakeModel("a"), True, True, 1, [], [""], None, True)
    return ResponseRender(ResponsesRequest(input="x"), call, {}, stored=False)


async def test_chat_reasoning_becomes_a_reasoning_item_before_the_message() -> None:
    # The chat path's reasoning parser fills reasoning_content (or reasoning); cut anywhere.
    deltas = (
        {"reasoning_content": "Let me "},
        {"reasoning": "think."},
        {"reasoning_content": "!", "content": "Hi"},
    )
    found = [e async for e in render().events(chunks(*deltas))]
    assert [e["type"] for e in found] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert found[2]["item"] == {
        "id": found[2]["item"]["id"],
        "type": "reasoning",
        "summary": [],
        "content": [],
        "status": "in_progress",
    }
    reasoning, message = found[-1]["response"]["output"]
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Let me think.!"}]
    assert message["content"][0]["text"] == "Hi"
    whole = OutputItems({})
    whole.add({"role": "assistant", "content": "Hi", "reasoning_content": "Let me think.!"})
    whole.close()
    assert [i["content"] for i in whole.output] == [reasoning["content"], message["content"]]


async def test_a_cancelled_stream_ends_with_a_cancelled_response() -> None:
    async def stopped() -> AsyncGenerator[dict[str, Any], None]:
        yield {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
        raise Stopped()

    found = [e async for e in render().events(stopped())]
    assert found[-1]["type"] == "response.completed" and found[-1]["response"]["status"] == "cancelled"
    assert found[-1]["response"]["output"][0]["content"][0]["text"] == "Hi"


async def test_a_stream_closed_before_its_end_ends_the_response_cancelled() -> None:
    ended: list[dict[str, Any]] = []
    rendering = render()
    rendering.on_end = ended.append
    stream = rendering.events(chunks({"content": "Hi"}, {"content": " there"}))
    [await anext(stream) for _ in range(5)]  # created, in_progress, the message's opening, "Hi"
    await stream.aclose()  # what the server does when the client goes away
    (final,) = ended
    assert final["status"] == "cancelled" and final["output"][0]["status"] == "in_progress"


# -- the store ---------------------------------------------------------------------------------------


def stored_models(**options: str) -> FakeModels:
    fakes = models(**options)
    fake = fakes.served_models["a"]
    fake.config = ModelConfig(name="a", model_id="x", responses_store="memory", options=fake.config.options)
    return fakes


def test_a_stored_response_is_retrieved_and_continued_on_the_same_session() -> None:
    fakes = stored_models()
    http = client(fakes)
    first = http.post("/v1/responses", json={"input": "hi", "instructions": "Be brief."}).json()
    assert first["store"] is True
    assert http.get(f"/v1/responses/{first['id']}").json() == first
    second = http.post("/v1/responses", json={"input": "more", "previous_response_id": first["id"]}).json()
    assert second["previous_response_id"] == first["id"]
    fake = fakes.served_models["a"]
    # The conversation goes on; the first request's instructions are not carried over (OpenAI).
    assert fake.requests[-1].messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "more"},
    ]
    third = http.post("/v1/responses", json={"input": "again", "previous_response_id": second["id"]}).json()
    sessions = [c.session_id for c in fake.contexts if c is not None]
    assert sessions == [first["id"]] * 3  # one routing session per chain: its worker holds the prefix
    assert third["status"] == "completed"
    own = http.post(
        "/v1/responses",
        json={"input": "x", "previous_response_id": first["id"]},
        headers={"x-session-id": "mine"},
    )
    assert own.status_code == 200 and fake.contexts[-1] is not None and fake.contexts[-1].session_id == "mine"
    unstored = http.post("/v1/responses", json={"input": "x", "store": False}).json()
    assert unstored["store"] is False and http.get(f"/v1/responses/{unstored['id']}").status_code == 404
    missing = http.post("/v1/responses", json={"input": "x", "previous_response_id": "resp_nope"})
    assert missing.status_code == 404 and "not stored" in missing.json()["error"]["message"]


def test_cancel_of_a_finished_response_is_a_400() -> None:
    http = client(stored_models())
    first = http.post("/v1/responses", json={"input": "hi"}).json()
    refused = http.post(f"/v1/responses/{first['id']}/cancel")
    assert refused.status_code == 400 and "completed" in refused.json()["error"]["message"]


class Gated(FakeModel):
    """Yields one token, then waits for ``gate`` before each next one."""

    def __init__(self, name: str) -> None:
        super().__init__(name, tokens=("a",) * 50, finish="eos_token")
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.closed = asyncio.Event()

    async def generate(
        self, request: GenerationRequest, context: RequestContext | None = None
    ) -> AsyncIterator[GenerationEvent]:
        self.requests.append(request)
        try:
            for i, text in enumerate(self.tokens):
                yield Token(i, text, -0.5, prompt_tokens=3 if i == 0 else None)
                self.started.set()
                await self.gate.wait()
            yield Finished("eos_token", 3, len(self.tokens), "")
        finally:
            self.closed.set()


@pytest.mark.parametrize("stream", [False, True])
async def test_cancel_stops_a_running_response_at_its_next_token(stream: bool) -> None:
    fakes = stored_models()
    gated = Gated("a")
    gated.config = fakes.served_models["a"].config
    fakes.served_models["a"] = gated
    application = app(fakes)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=application), base_url="http://test"
    ) as http:
        creating = asyncio.ensure_future(http.post("/v1/responses", json={"input": "x", "stream": stream}))
        await asyncio.wait_for(gated.started.wait(), 10)
        store = application.state.lmi.responses.of(gated.config)
        (entry,) = store.ids()
        cancelled = await http.post(f"/v1/responses/{entry}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        gated.gate.set()
        response = await asyncio.wait_for(creating, 10)
        await asyncio.wait_for(gated.closed.wait(), 10)  # the generation was closed, not run to its end
        assert response.status_code == 200
        final = (await http.get(f"/v1/responses/{entry}")).json()
        assert final["status"] == "cancelled"
        if stream:
            last = json.loads(response.text.strip().split("\n\n")[-1].split("\n")[1].removeprefix("data: "))
            assert last["type"] == "response.completed" and last["response"]["status"] == "cancelled"


def test_the_store_is_an_lru_with_a_ttl() -> None:
    now = [0.0]
    store = ResponseStore(size=2, ttl=10.0, clock=lambda: now[0])

    def entry(name: str) -> StoredResponse:
        return StoredResponse({"id": name, "status": "completed"}, [], name)

    store.put("a", entry("a"))
    store.put("b", entry("b"))
    assert store.get("a") is not None  # a is now the most recently used
    store.put("c", entry("c"))
    assert store.get("b") is None and len(store) == 2  # b, the least recently used, was dropped
    now[0] = 9.0
    assert store.get("a") is not None  # read: kept 10 s more
    now[0] = 15.0
    assert store.get("c") is None and store.get("a") is not None
    now[0] = 30.0
    assert store.get("a") is None and len(store) == 0


def test_stores_follow_the_model_settings() -> None:
    stores = ResponseStores()
    off = ModelConfig(name="a", model_id="x")
    on = ModelConfig(name="a", model_id="x", responses_store="memory", responses_store_size=5)
    assert stores.of(off) is None
    store = stores.of(on)
    assert store is not None and store.size == 5
    store.put("r", StoredResponse({"status": "completed"}, [], "r"))
    assert stores.find("r", [on]) is not None
    with pytest.raises(NotFoundError, match="stateless"):
        stores.find("r", [off])
    with pytest.raises(NotFoundError, match="stateless"):
        stores.find("r", [])  # the model was unloaded: its responses went with it
