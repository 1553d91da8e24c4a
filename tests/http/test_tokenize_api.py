"""``/tokenize`` and ``/detokenize`` over the fake service: vLLM's bodies in, the operation sent, vLLM's
answers and errors out."""

from __future__ import annotations

from lmi_core.operations import Detokenize, Tokenize
from tests.http.fakes import FakeModels, client, model, pool, worker

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def models() -> FakeModels:
    return FakeModels(model("m", pool("m", worker(0))))


def test_the_completion_form_counts_the_prompt_and_adds_special_tokens_by_default() -> None:
    fake = models()
    fake.served_models["m"].max_model_len = 512
    response = client(fake).post("/tokenize", json={"prompt": "hi", "return_token_strs": True})
    assert response.status_code == 200
    assert response.json() == {
        "count": 2,
        "max_model_len": 512,
        "tokens": [104, 105],
        "token_strs": ["h", "i"],
    }
    (sent,) = fake.served_models["m"].operations
    assert isinstance(sent, Tokenize) and sent.request.prompt == "hi"
    assert (sent.add_special_tokens, sent.token_strs) == (True, True)


def test_the_chat_form_passes_its_template_options_and_tools() -> None:
    fake = models()
    body = {"model": "m", "messages": [{"role": "user", "content": "ok"}], "tools": [TOOL]}
    response = client(fake).post("/tokenize", json={**body, "add_generation_prompt": False, "extra": 1})
    assert response.status_code == 200 and response.json()["tokens"] == [111, 107]
    assert response.headers["x-lmi-ignored-fields"] == "extra"
    (sent,) = fake.served_models["m"].operations
    assert isinstance(sent, Tokenize) and sent.request.messages == [{"role": "user", "content": "ok"}]
    assert sent.request.tools == [TOOL]
    assert (sent.add_special_tokens, sent.add_generation_prompt, sent.token_strs) == (False, False, False)


def test_detokenize_answers_the_text() -> None:
    fake = models()
    response = client(fake).post("/detokenize", json={"tokens": [111, 107]})
    assert response.status_code == 200 and response.json() == {"prompt": "ok"}
    assert fake.served_models["m"].operations == [Detokenize([111, 107])]


def test_bad_bodies_are_400s_in_vllms_shape_naming_the_field() -> None:
    http = client(models())
    both = {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True}
    for path, body, param in [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", both, None),
        ("/detokenize", {"tokens": [-1]}, "tokens.0"),
        ("/detokenize", {"tokens": "1"}, "tokens"),
    ]:
        response = http.post(path, json=body)
        assert response.status_code == 400, (path, body)
        error = response.json()["error"]
        assert error["type"] == "BadRequestError" and error["code"] == 400
        if param is not None:
            assert error["param"] == param, (path, body, error)
    unknown = http.post("/tokenize", json={"model": "nope", "prompt": "x"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"


def test_the_chat_form_takes_chat_template_kwargs_over_the_models_defaults() -> None:
    # The template a chat request would render: the count is that request's prompt tokens.
    fake = models()
    fake.served_models["m"].config.options["default_chat_template_kwargs"] = (
        '{"enable_thinking": false, "a": 1}'
    )
    body = {"messages": [{"role": "user", "content": "ok"}], "chat_template_kwargs": {"a": 2}}
    assert client(fake).post("/tokenize", json=body).status_code == 200
    (sent,) = fake.served_models["m"].operations
    assert isinstance(sent, Tokenize) and sent.request.chat_template_kwargs == {
        "enable_thinking": False,
        "a": 2,
    }
    refused = client(fake).post("/tokenize", json={**body, "chat_template_kwargs": {"tokenize": True}})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "chat_template_kwargs"
