"""Server limits: the work of one request is bounded, queued streams get headers and keep-alives at once, and
every method's proposer is built at start-up (``method=draft`` follows the registry, not a guess)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import tiny_loaded
from test_server import LONG_PROMPT, SlowLookup, metrics_of, requests_count, serving, sse_payloads

from hasten.api import generate
from hasten.errors import HastenError
from hasten.methods import METHODS, Method
from hasten.models import LoadedModel
from hasten.proposers.base import Proposer
from hasten.server import create_app

KEEPALIVE_S = 0.2


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_loaded("llama", 1)  # context 256


@pytest.fixture(scope="module")
def base(tiny) -> Iterator[str]:
    with serving(create_app(tiny, "ar", max_generations=6, max_body_bytes=4096)) as url:
        yield url


@pytest.fixture(scope="module")
def slow_base(tiny) -> Iterator[str]:
    METHODS["slow_limits"] = Method(lambda target, params, generator, options: SlowLookup(num_tokens=4))
    try:
        # One generation at a time: a second request waits in the queue (batching: test_server_batching.py).
        with serving(create_app(tiny, "slow_limits", max_queue=3, keepalive_s=KEEPALIVE_S, max_batch=1)) as url:
            yield url
    finally:
        del METHODS["slow_limits"]


def post(base: str, body: dict | str, endpoint: str = "/v1/completions", **kwargs) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{base}{endpoint}", content=content, headers={"Content-Type": "application/json"},
                      timeout=60, **kwargs)


def assert_error(response: httpx.Response, status: int, param: str | None, words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and words in error["message"]


# Bounds on one request's work.

@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": ["w3 w4"] * 7, "max_tokens": 1}, "prompt"),
    ({"prompt": ["w3 w4"] * 2, "n": 4, "max_tokens": 1}, "n"),
    ({"prompt": "w3 w4", "n": 7, "max_tokens": 1}, "n"),
])
def test_too_many_generations_in_one_request_is_a_400(base, body, param):
    assert_error(post(base, body), 400, param, "at most 6")


def test_too_many_chat_choices_is_a_400(base):
    messages = {"messages": [{"role": "user", "content": "w3"}], "n": 7, "max_tokens": 1}
    assert_error(post(base, messages, "/v1/chat/completions"), 400, "n", "at most 6")


def test_the_default_bound_on_generations_is_64(tiny):
    with serving(create_app(tiny, "ar")) as url:
        assert_error(post(url, {"prompt": ["w3"] * 5, "n": 13, "max_tokens": 1}), 400, "n", "at most 64")
        assert post(url, {"prompt": ["w3"] * 4, "n": 16, "max_tokens": 1}).status_code == 200


def test_max_tokens_beyond_the_context_is_a_400(base):
    assert_error(post(base, {"prompt": "w3 w4", "max_tokens": 256}), 400, "max_tokens", "at most 255")
    assert_error(post(base, {"prompt": "w3 w4", "max_completion_tokens": 10**6}), 400, "max_completion_tokens",
                 "at most 255")
    assert_error(post(base, {"prompt": "w3 w4", "max_tokens": 300, "stream": True}), 400, "max_tokens", "255")


def test_a_configured_max_tokens_limit_bounds_requests_and_the_default(tiny):
    with serving(create_app(tiny, "ar", max_tokens_limit=5, default_max_tokens=256)) as url:
        assert_error(post(url, {"prompt": "w3 w4", "max_tokens": 6}), 400, "max_tokens", "at most 5")
        reply = post(url, {"prompt": "w3 w4", "temperature": 0}).json()  # the default 256 is cut to the limit
        assert reply["usage"]["completion_tokens"] == len(
            generate(tiny, "w3 w4", "ar", max_new_tokens=5, chat=False).token_ids)


def test_a_body_over_the_limit_is_a_413_declared_or_streamed(base, tiny):
    before = metrics_of(base)
    big = json.dumps({"prompt": "w3 " * 2000, "max_tokens": 1})
    response = post(base, big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
        for i in range(0, len(big), 500):
            yield big[i : i + 500].encode()

    response = httpx.post(f"{base}/v1/completions", content=chunks(), timeout=60,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "4096 bytes" in response.json()["error"]["message"]
    assert requests_count(metrics_of(base), "/v1/completions", 413) == requests_count(before, "/v1/completions",
                                                                                      413) + 2
    small = {"prompt": "w3 " * 100, "max_tokens": 2, "temperature": 0}
    expected = generate(tiny, small["prompt"], "ar", max_new_tokens=2, chat=False).text
    assert post(base, small).json()["choices"][0]["text"] == expected


# A queued stream gets its headers at once, then keep-alive comments.

def test_a_queued_stream_gets_headers_at_once_and_keepalives(slow_base, tiny):
    body = {"prompt": "w5 w6 w7", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream(
            "POST", f"{slow_base}/v1/completions",
            json={"prompt": LONG_PROMPT, "max_tokens": 200, "temperature": 0, "stream": True}) as busy:
        held = busy.iter_lines()  # dropping the iterator would close the connection
        next(line for line in held if line.startswith("data: "))  # the worker is busy for ~5 s
        began = time.monotonic()
        with http.stream("POST", f"{slow_base}/v1/completions", json=body) as queued:
            assert time.monotonic() - began < 2.0, "the queued stream's headers waited for the worker"
            assert queued.status_code == 200 and queued.headers["content-type"].startswith("text/event-stream")
            lines = queued.iter_lines()
            assert next(lines) == ": keep-alive"
            busy.close()  # the busy stream's client leaves: its generation is cancelled and ours runs
            rest = "\n".join(lines)
    payloads = sse_payloads(rest)
    assert payloads[-1] == "[DONE]"
    text = "".join(json.loads(p)["choices"][0]["text"] for p in payloads[:-1])
    assert text == generate(tiny, body["prompt"], "ar", max_new_tokens=3, chat=False).text


def test_a_queued_stream_whose_client_leaves_is_cancelled(slow_base):
    before = metrics_of(slow_base)
    long = {"prompt": LONG_PROMPT, "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{slow_base}/v1/completions", json=long) as busy:
        held = busy.iter_lines()
        next(line for line in held if line.startswith("data: "))
        with http.stream("POST", f"{slow_base}/v1/completions", json={**long, "max_tokens": 5}) as queued:
            assert next(queued.iter_lines()) == ": keep-alive"
    deadline = time.monotonic() + 10
    while metrics_of(slow_base)["hasten_requests_cancelled_total"] < before["hasten_requests_cancelled_total"] + 2:
        assert time.monotonic() < deadline, "the busy stream and the queued one were not both cancelled"
        time.sleep(0.1)
    after = metrics_of(slow_base)
    assert after["hasten_queue_depth"] == 0 and after["hasten_requests_running"] == 0


# Methods are built at start-up; method=draft is up to the registry.

def test_method_draft_is_served_when_the_registry_can_build_it(tiny, monkeypatch):
    """As for the default model, whose distilled draft ships: the server no longer refuses draft without one."""
    shipped = Method(lambda target, params, generator, options: Proposer(), frozenset({"num_tokens", "adaptive"}))
    monkeypatch.setitem(METHODS, "draft", shipped)
    with serving(create_app(tiny, "ar")) as url:
        assert "draft" in httpx.get(f"{url}/health", timeout=10).json()["methods"]
        reply = post(url, {"prompt": "w3 w4", "max_tokens": 3, "temperature": 0, "method": "draft"})
        assert reply.status_code == 200 and reply.json()["hasten"]["method"] == "draft"


def test_methods_that_cannot_run_are_refused_at_once(base):
    health = httpx.get(f"{base}/health", timeout=10).json()
    assert "draft" not in health["methods"] and "redrafter" not in health["methods"] and "pld" in health["methods"]
    for method, words in (("draft", "draft model"), ("redrafter", "needs a head")):
        for stream in (False, True):
            body = {"prompt": "w3", "max_tokens": 2, "method": method, "stream": stream}
            assert_error(post(base, body), 400, "method", words)


def test_a_method_that_cannot_run_as_the_default_fails_at_start(tiny):
    for method, words in (("redrafter", "needs a head"), ("draft", "draft model")):
        with pytest.raises(HastenError, match=words):
            create_app(tiny, method)


@pytest.mark.slow
def test_method_draft_and_redrafter_on_the_default_model(default_model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with serving(create_app(default_model, "redrafter", max_queue=2)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        for method in ("draft", "redrafter"):
            reply = client.chat.completions.create(model="default", messages=messages, max_tokens=10, temperature=0,
                                                   extra_body={"method": method})
            assert reply.model_extra["hasten"]["method"] == method
            assert reply.choices[0].message.content == generate(default_model, messages, method,
                                                                max_new_tokens=10).text


def test_completion_tokens_stop_at_a_stop_string(base, tiny):
    """A stop string through the server: usage counts the tokens of the text returned, not those after the cut."""
    body = {"prompt": LONG_PROMPT, "max_tokens": 10, "temperature": 0}
    full = post(base, body).json()["choices"][0]["text"]
    words = full.split()
    stop = f" {words[4]} "
    head = full[: full.index(stop)]
    cut = post(base, {**body, "stop": stop}).json()
    assert cut["choices"][0]["text"] == head and cut["choices"][0]["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] == len(head.split()) < 10
