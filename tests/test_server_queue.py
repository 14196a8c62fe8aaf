"""The server queues: with the defaults a burst far deeper than the batch is answered, exactly, and every 503
(a full queue, a server stopping) says when to retry."""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import random_prompts, tiny_loaded
from test_server import SlowLookup, metrics_of, serving, words

from hasten.api import generate
from hasten.commands.serve import register
from hasten.methods import METHODS, Method
from hasten.models import LoadedModel
from hasten.server import create_app
from hasten.server.errors import APIError, queue_full, shutting_down
from hasten.server.limits import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, RETRY_AFTER_S

BURST = 40  # five times the old default queue (8)


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_loaded("llama", 1)


@pytest.fixture(scope="module")
def default_base(tiny) -> Iterator[str]:
    """A server with every default but its method: prompt lookup that pauses 20 ms per proposal, so that a burst
    outruns the batch and waits in the queue."""
    METHODS["slow_queue"] = Method(lambda target, params, generator, options: SlowLookup(num_tokens=4))
    try:
        with serving(create_app(tiny, "slow_queue")) as url:
            yield url
    finally:
        del METHODS["slow_queue"]


def test_the_default_queue_holds_at_least_256_requests():
    assert DEFAULT_MAX_QUEUE >= 256
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert parser.parse_args(["serve"]).max_queue == DEFAULT_MAX_QUEUE


def test_a_burst_deeper_than_the_old_queue_is_answered_with_the_defaults(default_base, tiny):
    health = httpx.get(f"{default_base}/health", timeout=10).json()
    assert health["max_queue"] == DEFAULT_MAX_QUEUE and health["max_batch"] == DEFAULT_MAX_BATCH
    prompts = [words(ids) for ids in random_prompts(BURST, seed=41)]
    expected = {p: generate(tiny, p, "ar", max_new_tokens=4, temperature=0, chat=False).text for p in prompts}
    barrier = threading.Barrier(BURST)
    replies: list[httpx.Response | Exception | None] = [None] * BURST

    def send(i: int) -> None:
        barrier.wait()
        try:
            body = {"prompt": prompts[i], "max_tokens": 4, "temperature": 0}
            replies[i] = httpx.post(f"{default_base}/v1/completions", json=body, timeout=120)
        except Exception as error:  # reported below
            replies[i] = error

    threads = [threading.Thread(target=send, args=(i,)) for i in range(BURST)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert time.monotonic() - began < 180
    for prompt, reply in zip(prompts, replies, strict=True):
        assert isinstance(reply, httpx.Response), reply
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == expected[prompt]
    samples = metrics_of(default_base)
    # The queue really was deeper than the old default: some step saw more than 8 requests waiting behind it.
    assert samples['hasten_step_queue_depth_bucket{le="8"}'] < samples["hasten_step_queue_depth_count"]
    assert samples.get('hasten_requests_total{endpoint="/v1/completions",status="503"}', 0) == 0
    after = httpx.get(f"{default_base}/health", timeout=10).json()
    assert after["status"] == "ok" and after["queue_depth"] == 0 and after["running"] == 0


@pytest.mark.parametrize("error", [queue_full(256), shutting_down(), APIError(503, "interrupted", "server_error")])
def test_every_503_carries_retry_after(error):
    response = error.response()
    assert response.status_code == 503 and response.headers["retry-after"] == str(RETRY_AFTER_S)


def test_other_errors_carry_no_retry_after():
    assert "retry-after" not in APIError(400, "bad").response().headers
