"""Generation fields through the server: logprobs in OpenAI's shapes (streamed and not, equal), penalties,
logit bias, min_p and constraints reach the generation, and bad values are a 400 naming the field."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import httpx
import jsonschema
import pytest
from conftest import tiny_loaded
from test_server import CHAT_TEMPLATE, serving, sse_payloads

from hasten.api import generate
from hasten.models import LoadedModel
from hasten.server import create_app

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
PROMPT = "w5 w9 w23 w5 w9 w40 w7"
MESSAGES = [{"role": "user", "content": PROMPT}]
OPTIONS = {"adaptive": False}  # fixed drafts: prompt lookup drafts on the tiny model, so speculation is exercised


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    loaded = tiny_loaded("llama", 3, init_std=0.6)  # repeats itself: drafts get accepted
    loaded.tokenizer.chat_template = CHAT_TEMPLATE
    return loaded


@pytest.fixture(scope="module")
def base(tiny) -> Iterator[str]:
    with serving(create_app(tiny, "pld", method_options=OPTIONS)) as url:
        yield url


def post(base: str, endpoint: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base}{endpoint}", json=body, timeout=60)


def streamed(base: str, endpoint: str, body: dict) -> list[dict]:
    response = post(base, endpoint, {**body, "stream": True})
    assert response.status_code == 200, response.text
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    return [json.loads(payload) for payload in payloads[:-1]]


def reference(tiny: LoadedModel, prompt, tokens: int, **kwargs):
    chat = not isinstance(prompt, str)
    return generate(tiny, prompt, "pld", max_new_tokens=tokens, temperature=0, chat=chat,
                    **OPTIONS, **kwargs)


# Log-probabilities.

def test_chat_logprobs_have_openai_shape_and_greedy_takes_the_most_likely(base, tiny):
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    reply = post(base, CHAT, body).json()
    choice = reply["choices"][0]
    assert set(choice["logprobs"]) == {"content", "refusal"}
    content = choice["logprobs"]["content"]
    expected = reference(tiny, MESSAGES, 12, logprobs=True, top_logprobs=3)
    assert len(content) == reply["usage"]["completion_tokens"] == len(expected.token_ids)
    for entry, token_id, want in zip(content, expected.token_ids, expected.logprobs, strict=True):
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["token"] == tiny.tokenizer.decode([token_id]) and entry["bytes"] == list(entry["token"].encode())
        assert math.isclose(entry["logprob"], want.logprob, abs_tol=1e-5) and entry["logprob"] <= 0
        top = entry["top_logprobs"]
        assert len(top) == 3 and all(set(alt) == {"token", "logprob", "bytes"} for alt in top)
        assert [alt["logprob"] for alt in top] == sorted((alt["logprob"] for alt in top), reverse=True)
        assert top[0]["token"] == entry["token"] and math.isclose(top[0]["logprob"], entry["logprob"], abs_tol=1e-6)


def test_streamed_and_non_streamed_logprobs_agree(base):
    chat = {"messages": MESSAGES, "max_tokens": 14, "temperature": 0, "logprobs": True, "top_logprobs": 2, "n": 2}
    whole = post(base, CHAT, chat).json()
    pieces: dict[int, list] = {0: [], 1: []}
    for chunk in streamed(base, CHAT, chat):
        for choice in chunk["choices"]:
            if choice["logprobs"] is not None:
                pieces[choice["index"]] += choice["logprobs"]["content"]
    assert pieces == {c["index"]: c["logprobs"]["content"] for c in whole["choices"]} and pieces[0]

    text = {"prompt": PROMPT, "max_tokens": 14, "temperature": 0, "logprobs": 3}
    whole = post(base, TEXT, text).json()["choices"][0]["logprobs"]
    columns: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in streamed(base, TEXT, text):
        for choice in chunk["choices"]:
            if choice["logprobs"] is not None:
                for key in columns:
                    columns[key] += choice["logprobs"][key]
    assert columns == whole and whole["tokens"]


def test_completion_logprobs_columns(base, tiny):
    for top in (0, 2):
        reply = post(base, TEXT, {"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "logprobs": top}).json()
        logprobs = reply["choices"][0]["logprobs"]
        expected = reference(tiny, PROMPT, 10, logprobs=True, top_logprobs=top)
        assert logprobs["tokens"] == [tiny.tokenizer.decode([t]) for t in expected.token_ids]
        assert logprobs["token_logprobs"] == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-5)
        offsets = [0]
        for token in logprobs["tokens"][:-1]:
            offsets.append(offsets[-1] + len(token))
        assert logprobs["text_offset"] == offsets
        for token, value, alternatives in zip(logprobs["tokens"], logprobs["token_logprobs"],
                                              logprobs["top_logprobs"], strict=True):
            assert alternatives[token] == pytest.approx(value)  # the chosen token is always among them
            assert len(alternatives) <= top + 1 and max(alternatives.values()) == pytest.approx(value)  # greedy


def test_no_logprobs_unless_asked(base):
    reply = post(base, CHAT, {"messages": MESSAGES, "max_tokens": 3}).json()
    assert "logprobs" in reply["choices"][0] and reply["choices"][0]["logprobs"] is None
    chunks = streamed(base, TEXT, {"prompt": PROMPT, "max_tokens": 3})
    assert all(choice["logprobs"] is None for chunk in chunks for choice in chunk["choices"])


# Penalties, bias and min_p reach the generation.

def token_ids(base: str, body: dict, tiny: LoadedModel) -> list[int]:
    tokens = post(base, TEXT, {**body, "logprobs": 0}).json()["choices"][0]["logprobs"]["tokens"]
    return [tiny.tokenizer.convert_tokens_to_ids(token) for token in tokens]


def test_a_logit_bias_of_100_makes_greedy_choose_that_token(base, tiny):
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    plain = token_ids(base, body, tiny)
    assert token_ids(base, {**body, "logit_bias": {"17": 100}}, tiny) == [17] * 6
    banned = token_ids(base, {**body, "logit_bias": {str(plain[0]): -100}}, tiny)
    assert banned[0] != plain[0]
    chat = post(base, CHAT, {"messages": MESSAGES, "max_tokens": 4, "temperature": 0, "logit_bias": {"17": 100}})
    assert chat.json()["choices"][0]["message"]["content"] == "w17 w17 w17 w17"


@pytest.mark.parametrize("fields", [
    {"presence_penalty": 2.0}, {"frequency_penalty": 1.5}, {"repetition_penalty": 3.0},
    {"presence_penalty": -1, "frequency_penalty": 0.5, "logit_bias": {"9": 3.5}},
])
def test_penalties_reach_the_generation(base, tiny, fields):
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    reply = post(base, TEXT, {**body, **fields}).json()["choices"][0]["text"]
    kwargs = {k: ({int(t): b for t, b in v.items()} if k == "logit_bias" else v) for k, v in fields.items()}
    assert reply == reference(tiny, PROMPT, 24, **kwargs).text
    assert reply != post(base, TEXT, body).json()["choices"][0]["text"]  # the repetitive tiny model notices them


def test_min_p_reaches_the_sampler(base, tiny):
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 1.5, "seed": 4, "min_p": 0.3, "method": "ar"}
    reply = post(base, TEXT, body).json()["choices"][0]["text"]
    assert reply == generate(tiny, PROMPT, "ar", max_new_tokens=16, temperature=1.5, seed=4, min_p=0.3,
                             chat=False).text
    assert reply != post(base, TEXT, {**body, "min_p": 0.0}).json()["choices"][0]["text"]


# Bad values: a 400 naming the field, streamed or not.

BAD = [
    (CHAT, {"presence_penalty": 2.5}, "presence_penalty"),
    (CHAT, {"frequency_penalty": -3}, "frequency_penalty"),
    (CHAT, {"presence_penalty": "high"}, "presence_penalty"),
    (TEXT, {"repetition_penalty": 0}, "repetition_penalty"),
    (TEXT, {"min_p": 1.5}, "min_p"),
    (CHAT, {"logit_bias": {"w7": 5}}, "logit_bias"),
    (CHAT, {"logit_bias": {"-3": 5}}, "logit_bias"),
    (CHAT, {"logit_bias": {"7": 101}}, "logit_bias"),
    (CHAT, {"logit_bias": {"7": "up"}}, "logit_bias"),
    (CHAT, {"logit_bias": {"64": 1}}, "logit_bias"),  # the tiny vocabulary is 0..63
    (CHAT, {"logit_bias": [7]}, "logit_bias"),
    (CHAT, {"logprobs": 1}, "logprobs"),
    (CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"top_logprobs": 2}, "top_logprobs"),  # needs logprobs, as OpenAI
    (CHAT, {"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    (TEXT, {"logprobs": 6}, "logprobs"),
    (TEXT, {"logprobs": True}, "logprobs"),
    (TEXT, {"top_logprobs": 2}, "top_logprobs"),  # a chat field
    (CHAT, {"response_format": {"type": "xml"}}, "response_format"),
    (CHAT, {"response_format": {"type": "json_schema"}}, "response_format"),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    (CHAT, {"regex": 5}, "regex"),
    (CHAT, {"regex": "w3", "grammar": 'start: "w3"'}, "regex"),
]
# Checked by llguidance against the model's tokenizer (the tiny word-level one is not one it reads).
BAD_CONSTRAINTS = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"regex": "(unclosed"}, "regex"),
    ({"grammar": "start: ???"}, "grammar"),
]


@pytest.mark.parametrize(("endpoint", "fields", "param"), BAD)
def test_bad_values_are_a_400_naming_the_field(base, endpoint, fields, param):
    assert_refused(base, endpoint, fields, param)


def assert_refused(base: str, endpoint: str, fields: dict, param: str) -> None:
    body = {"messages": MESSAGES} if endpoint == CHAT else {"prompt": PROMPT}
    for stream in (False, True):
        response = post(base, endpoint, {**body, "max_tokens": 3, "stream": stream, **fields})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", error
        assert "\n" not in error["message"] and param in error["message"]


# On the real default model (slow): constrained answers and logprobs' token texts.

@pytest.mark.slow
def test_response_format_and_logprobs_on_the_default_model(default_model):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                               "is_capital": {"type": "boolean"}},
              "required": ["city", "is_capital"], "additionalProperties": False}
    with serving(create_app(default_model, "auto")) as url:
        body = {"messages": [{"role": "user", "content": "Give the largest city of France as JSON."}],
                "max_tokens": 48, "temperature": 0,
                "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": schema,
                                                                           "strict": True}}}
        reply = post(url, CHAT, body).json()["choices"][0]
        jsonschema.validate(json.loads(reply["message"]["content"]), schema)
        assert reply["finish_reason"] == "stop"
        chunks = streamed(url, CHAT, body)
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == \
            reply["message"]["content"]
        text = post(url, TEXT, {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0,
                                "logprobs": 1}).json()["choices"][0]
        assert "".join(text["logprobs"]["tokens"]) == text["text"]  # byte-level tokens decode alone here
        regex = post(url, TEXT, {"prompt": "Count: one, two,", "max_tokens": 12, "temperature": 0,
                                 "regex": " [a-z]+, [a-z]+\\."}).json()["choices"][0]["text"]
        assert regex.startswith(" ") and regex.endswith(".") and regex.count(",") == 1
        for fields, param in BAD_CONSTRAINTS:
            assert_refused(url, CHAT, fields, param)
