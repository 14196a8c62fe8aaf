"""Request fields: nothing is ignored silently. A field that would change the answer and that hasten cannot
honour is a 400 naming it; fields that change nothing (or ask for nothing) are accepted and change nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import tiny_loaded
from test_server import CHAT_TEMPLATE, serving

from hasten.models import LoadedModel
from hasten.server import create_app

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
MESSAGES = [{"role": "user", "content": "w3 w4 w5"}]


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    loaded = tiny_loaded("llama", 3)
    loaded.tokenizer.chat_template = CHAT_TEMPLATE
    return loaded


@pytest.fixture(scope="module")
def base(tiny) -> Iterator[str]:
    with serving(create_app(tiny, "ar", default_max_tokens=8)) as url:
        yield url


def post(base: str, endpoint: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base}{endpoint}", content=json.dumps(body), headers={"Content-Type": "application/json"},
                      timeout=60)


def chat(**fields) -> dict:
    return {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, **fields}


def text(**fields) -> dict:
    return {"prompt": "w3 w4 w5", "max_tokens": 6, "temperature": 0, **fields}


REFUSED = [  # (endpoint, body, the field named, code)
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools",
     "unsupported_parameter"),
    (CHAT, chat(tool_choice="auto"), "tool_choice", "unsupported_parameter"),
    (CHAT, chat(functions=[{"name": "f"}]), "functions", "unsupported_parameter"),
    (CHAT, chat(function_call={"name": "f"}), "function_call", "unsupported_parameter"),
    (CHAT, chat(audio={"voice": "alloy", "format": "wav"}), "audio", "unsupported_parameter"),
    (CHAT, chat(modalities=["text", "audio"]), "modalities", "unsupported_parameter"),
    (CHAT, chat(reasoning_effort="low"), "reasoning_effort", "unsupported_parameter"),
    (CHAT, chat(verbosity="low"), "verbosity", "unsupported_parameter"),
    (CHAT, chat(web_search_options={}), "web_search_options", "unsupported_parameter"),
    (TEXT, text(best_of=2), "best_of", "unsupported_parameter"),
    (TEXT, text(best_of=True), "best_of", "unsupported_parameter"),  # a boolean is not the neutral 1
    (TEXT, text(echo=True), "echo", "unsupported_parameter"),
    (TEXT, text(suffix=" w9"), "suffix", "unsupported_parameter"),
    (CHAT, chat(frobnicate=1), "frobnicate", "unknown_parameter"),
    (TEXT, text(messages=MESSAGES), "messages", "unknown_parameter"),  # a chat field sent to completions
    (CHAT, chat(stream=True, stream_options={"include_usage": True, "chunk_size": 3}), "stream_options",
     "unknown_parameter"),
    (CHAT, chat(messages=[{"role": "assistant", "content": "w3", "tool_calls": [{"id": "1"}]}, *MESSAGES]),
     "messages", "unsupported_parameter"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "text", "text": "w3", "cache": 1}]}]),
     "messages", "unknown_parameter"),
]


@pytest.mark.parametrize(("endpoint", "body", "param", "code"), REFUSED)
def test_a_field_hasten_cannot_honour_is_a_400_naming_it(base, endpoint, body, param, code):
    for stream in (False, True):
        response = post(base, endpoint, {**body, "stream": stream} if "stream" not in body else body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == code
        assert "\n" not in error["message"] and error["message"].startswith("unsupported field '")
        assert f"'{param}" in error["message"]


def test_every_refused_field_is_named_in_one_line(base):
    body = chat(tools=[{"type": "function"}], seed_of_doom=3, echo=True,
                messages=[{"role": "user", "content": "w3", "tool_calls": [{"id": "1"}]}])
    error = post(base, CHAT, body).json()["error"]
    for name in ("'tools' (tool and function calls", "'seed_of_doom' (unknown", "'echo' (",
                 "'messages.0.tool_calls' (tool"):
        assert name in error["message"], error["message"]
    assert error["code"] == "unknown_parameter" and "\n" not in error["message"]


def test_fields_that_change_nothing_are_accepted_and_change_nothing(base):
    plain_chat, plain_text = post(base, CHAT, chat()).json(), post(base, TEXT, text()).json()
    ignored = {"user": "u-1", "store": False, "metadata": {"team": "a"}, "service_tier": "auto",
               "parallel_tool_calls": True, "prompt_cache_key": "k", "prompt_cache_retention": "24h",
               "safety_identifier": "s", "prediction": {"type": "content", "content": "w3 w4"},
               "tools": [], "tool_choice": "none", "functions": [], "modalities": ["text"],
               "logprobs": False, "top_logprobs": 0, "presence_penalty": 0, "frequency_penalty": 0.0,
               "logit_bias": {}, "response_format": {"type": "text"}, "audio": None, "reasoning_effort": None}
    history = [{"role": "user", "content": "w6"},
               {"role": "assistant", "content": "w7", "tool_calls": None, "refusal": None, "annotations": [],
                "audio": None, "function_call": None}, *MESSAGES]
    reply = post(base, CHAT, chat(**ignored))
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"] == plain_chat["choices"][0]["message"]
    with_history = post(base, CHAT, chat(messages=history)).json()
    plain_history = post(base, CHAT, chat(messages=[{k: m[k] for k in ("role", "content")} for m in history]))
    assert with_history["choices"][0]["message"] == plain_history.json()["choices"][0]["message"]
    completions = {"user": "u-1", "best_of": 1, "echo": False, "suffix": "", "logprobs": None}
    reply = post(base, TEXT, text(**completions))
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == plain_text["choices"][0]["text"]
    streamed = post(base, CHAT, chat(stream=True, stream_options={"include_usage": True,
                                                                  "include_obfuscation": False}))
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize(("field", "value"), [("user", 5), ("store", "yes"), ("metadata", {"a": 1}),
                                              ("prediction", {"type": "content"}), ("parallel_tool_calls", 1)])
def test_accepted_fields_are_still_type_checked(base, field, value):
    response = post(base, CHAT, chat(**{field: value}))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field


def test_the_openai_client_sees_the_refusal(base, tiny):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError, match="'tools'"):
        client.chat.completions.create(model=tiny.name, messages=MESSAGES, tools=[tool], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="'echo'"):
        client.completions.create(model=tiny.name, prompt="w3", echo=True, max_tokens=4)
    reply = client.chat.completions.create(model=tiny.name, messages=MESSAGES, max_tokens=4, temperature=0,
                                           user="me", store=False, metadata={"k": "v"})
    assert reply.choices[0].message.content is not None


def test_a_prediction_is_drafted_from_and_changes_nothing(base):
    plain = post(base, CHAT, chat(method="pld")).json()["choices"][0]["message"]
    parts = [{"type": "text", "text": plain["content"][:5]}, {"type": "text", "text": plain["content"][5:]}]
    for prediction in ({"type": "content", "content": plain["content"]}, {"type": "content", "content": parts}):
        reply = post(base, CHAT, chat(method="pld", prediction=prediction))
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"] == plain
