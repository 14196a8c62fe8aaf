"""Continuous batching in ``hasten serve`` (joins, leaves, disconnects, --max-batch, a full queue) and the
Prometheus histograms of ``/metrics``."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator, Sequence

import httpx
import pytest
from conftest import random_prompts, tiny_loaded
from test_server import CHAT_TEMPLATE, metrics_of, serving, sse_payloads

from hasten.api import generate
from hasten.backends.base import Scores, Target
from hasten.batching import score_one_by_one
from hasten.cli import main
from hasten.engine import PassLayout
from hasten.errors import HastenError
from hasten.models import LoadedModel
from hasten.server import create_app
from hasten.server.metrics import Histogram

PASS_S = 0.02  # each shared pass pauses this long, so that requests overlap in the batch
OPTIONS = {"adaptive": False}


class Recorder:
    """A backend ``score_many`` that scores one by one, pauses, and records how many sequences each pass held."""

    def __init__(self) -> None:
        self.widths: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, passes: Sequence[tuple[Target, PassLayout]]) -> list[Scores]:
        with self.lock:
            self.widths.append(len(passes))
        time.sleep(PASS_S)
        return score_one_by_one(passes)

    def since(self, mark: int) -> list[int]:
        with self.lock:
            return list(self.widths[mark:])


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    loaded = tiny_loaded("llama", 3, init_std=0.6)
    loaded.tokenizer.chat_template = CHAT_TEMPLATE
    loaded.backend.score_many = Recorder()  # the worker takes the backend's batched pass when there is one
    return loaded


@pytest.fixture(scope="module")
def recorder(tiny) -> Recorder:
    return tiny.backend.score_many


@pytest.fixture(scope="module")
def base(tiny) -> Iterator[str]:
    with serving(create_app(tiny, "pld", max_queue=8, max_batch=4, method_options=OPTIONS)) as url:
        yield url


def words(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def reference(tiny: LoadedModel, prompt: str, max_tokens: int, method: str = "pld") -> str:
    return generate(tiny, prompt, method, max_new_tokens=max_tokens, temperature=0, chat=False, **OPTIONS).text


def stream_text(base: str, prompt: str, max_tokens: int, times: list[float] | None = None,
                **extra: object) -> tuple[str, str]:
    """A streamed greedy completion: its text and its finish reason (every chunk checked to be its own)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, **extra}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{base}/v1/completions", json=body) as response:
        assert response.status_code == 200
        text, finish, ids = "", "", set()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            ids.add(chunk["id"])
            (choice,) = chunk["choices"]
            assert choice["index"] == 0
            if choice["text"] and times is not None:
                times.append(time.monotonic())
            text += choice["text"]
            finish = choice["finish_reason"] or finish
    assert len(ids) == 1  # one request, one id: nobody else's chunks
    return text, finish


def run_concurrently(jobs: list) -> list:
    """Run the callables together (started at one barrier); their results, or the exception each raised."""
    results: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = jobs[i]()
        except Exception as error:  # re-raised by the caller's assertions
            results[i] = error

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def health(base: str) -> dict:
    return httpx.get(f"{base}/health", timeout=10).json()


def wait_for(condition, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_concurrent_streams_never_mix_and_equal_one_at_a_time(base, tiny, recorder):
    """8 concurrent streaming clients on a 4-wide batch: each gets exactly its own one-at-a-time answer."""
    prompts = [words(ids) for ids in random_prompts(8, seed=31)]
    expected = [reference(tiny, p, 24) for p in prompts]
    assert len(set(expected)) == len(expected)  # distinct answers, so a mixed-up stream cannot pass
    mark = len(recorder.widths)
    outcomes = run_concurrently([lambda p=p: stream_text(base, p, 24) for p in prompts])
    assert [outcome[0] if isinstance(outcome, tuple) else outcome for outcome in outcomes] == expected
    widths = recorder.since(mark)
    assert max(widths) == 4, widths  # batched, and never wider than --max-batch
    assert health(base)["batch_size"] == 0


def test_max_batch_bounds_the_batch_and_n_fills_it(base, tiny, recorder):
    """2 prompts x n=3 (6 generations) on a 4-wide batch: at most 4 at once, every choice right."""
    prompts = [words(ids) for ids in random_prompts(2, seed=32)]
    mark = len(recorder.widths)
    body = {"prompt": prompts, "n": 3, "max_tokens": 12, "temperature": 0}
    reply = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()
    texts = [choice["text"] for choice in sorted(reply["choices"], key=lambda c: c["index"])]
    assert texts == [reference(tiny, p, 12) for p in prompts for _ in range(3)]
    widths = recorder.since(mark)
    assert max(widths) == 4 and min(widths) < 4, widths  # full, then the last choices alone


def test_joins_and_leaves_mid_batch(base, tiny, recorder):
    """A short request joins a long stream's batch mid-way and leaves first; both answers are exact."""
    long_prompt, short_prompt = (words(ids) for ids in random_prompts(2, seed=33))
    mark = len(recorder.widths)
    times: list[float] = []
    long_result: list = []
    thread = threading.Thread(target=lambda: long_result.append(stream_text(base, long_prompt, 120, times)))
    thread.start()
    wait_for(lambda: len(times) >= 3, "the long stream produced no text")
    joined = len(times)
    short_text, _ = stream_text(base, short_prompt, 5)
    left = len(times)
    thread.join(60)
    assert short_text == reference(tiny, short_prompt, 5)
    assert long_result and long_result[0][0] == reference(tiny, long_prompt, 120)
    assert len(times) > left > joined  # the long stream went on while the short one ran, and after it left
    widths = recorder.since(mark)
    first_two, last_two = widths.index(2), len(widths) - 1 - widths[::-1].index(2)
    assert widths[:first_two] and set(widths[:first_two]) == {1}  # alone, then joined
    assert widths[last_two + 1:] and set(widths[last_two + 1:]) == {1}  # then alone again
    assert set(widths[first_two:last_two + 1]) == {2}


def test_a_disconnected_stream_frees_its_slot(base, tiny, recorder):
    """A client leaving mid-stream leaves the batch at the next step; its neighbour goes on, exact."""
    stay_prompt, leave_prompt = (words(ids) for ids in random_prompts(2, seed=34))
    before = metrics_of(base)
    stay: list = []
    thread = threading.Thread(target=lambda: stay.append(stream_text(base, stay_prompt, 150)))
    thread.start()
    body = {"prompt": leave_prompt, "max_tokens": 150, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{base}/v1/completions", json=body) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        wait_for(lambda: health(base)["batch_size"] == 2, "the two streams never shared the batch")
    cancelled = before["hasten_requests_cancelled_total"] + 1
    wait_for(lambda: metrics_of(base)["hasten_requests_cancelled_total"] == cancelled, "the disconnect went unnoticed")
    mark = len(recorder.widths)
    assert health(base)["batch_size"] == 1 and thread.is_alive()  # the slot is free, the neighbour still runs
    thread.join(60)
    assert stay and stay[0][0] == reference(tiny, stay_prompt, 150)
    assert set(recorder.since(mark)) == {1}


def test_a_full_queue_behind_a_full_batch_is_a_503(tiny):
    """max_batch=2, max_queue=2: two requests run, two wait, the fifth gets 503 at once; all others exact."""
    prompts = [words(ids) for ids in random_prompts(4, seed=35)]
    with serving(create_app(tiny, "pld", max_queue=2, max_batch=2, method_options=OPTIONS)) as url:
        results: list = [None] * 4
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, stream_text(url, prompts[i], 60)))
                   for i in range(4)]
        for thread in threads[:2]:
            thread.start()
        wait_for(lambda: health(url)["running"] == 2, "the first two did not start")
        for thread in threads[2:]:
            thread.start()
        wait_for(lambda: health(url)["queue_depth"] == 2, "the next two did not queue")
        began = time.monotonic()
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": prompts[0], "max_tokens": 4}, timeout=30)
        assert time.monotonic() - began < 2.0
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full"
        assert int(refused.headers["retry-after"]) >= 1
        assert health(url)["batch_size"] == 2  # --max-batch holds while two wait
        for thread in threads:
            thread.join(60)
        assert [r[0] if isinstance(r, tuple) else r for r in results] == [reference(tiny, p, 60) for p in prompts]
        samples = metrics_of(url)
        assert samples['hasten_requests_total{endpoint="/v1/completions",status="503"}'] == 1
        assert samples['hasten_step_queue_depth_bucket{le="2"}'] == samples["hasten_step_queue_depth_count"]
        assert samples['hasten_step_queue_depth_bucket{le="1"}'] < samples["hasten_step_queue_depth_count"]


def histograms(text: str) -> dict[str, dict[str, float]]:
    """Each histogram family of a Prometheus text page: its buckets by ``le``, ``_sum`` and ``_count``."""
    kinds = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE "))
    out: dict[str, dict[str, float]] = {name: {} for name, kind in kinds.items() if kind == "histogram"}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, value = line.rsplit(" ", 1)
        for name in out:
            if key.startswith(f'{name}_bucket{{le="'):
                out[name][key[len(name) + len('_bucket{le="'):-2]] = float(value)
            elif key in (f"{name}_sum", f"{name}_count"):
                out[name][key[len(name) + 1:]] = float(value)
    return out


def test_metrics_histograms_render_and_parse(base, tiny, recorder):
    mark = len(recorder.widths)
    before = histograms(httpx.get(f"{base}/metrics", timeout=10).text)
    prompts = [words(ids) for ids in random_prompts(3, seed=36)]
    run_concurrently([lambda p=p: stream_text(base, p, 10) for p in prompts])
    text = httpx.get(f"{base}/metrics", timeout=10).text
    after = histograms(text)
    names = {"hasten_step_batch_size", "hasten_step_queue_depth", "hasten_time_to_first_token_seconds",
             "hasten_generation_tokens_per_second"}
    assert names <= set(after)
    for name in names:
        family = after[name]
        bounds = [key for key in family if key not in ("sum", "count")]
        assert bounds[-1] == "+Inf" and [float(b) for b in bounds[:-1]] == sorted(float(b) for b in bounds[:-1])
        counts = [family[b] for b in bounds]
        assert counts == sorted(counts) and counts[-1] == family["count"]  # cumulative, +Inf is the count
        assert family["sum"] >= 0
    widths = recorder.since(mark)
    batch, old = after["hasten_step_batch_size"], before["hasten_step_batch_size"]
    assert batch["count"] - old["count"] == len(widths)  # one observation per shared pass
    assert batch["sum"] - old["sum"] == sum(widths)
    ttft, old_ttft = after["hasten_time_to_first_token_seconds"], before["hasten_time_to_first_token_seconds"]
    assert ttft["count"] - old_ttft["count"] == 3 and 0 < ttft["sum"] - old_ttft["sum"] < 30
    rate, old_rate = after["hasten_generation_tokens_per_second"], before["hasten_generation_tokens_per_second"]
    assert rate["count"] - old_rate["count"] == 3
    assert "hasten_requests_total" in text and "# TYPE hasten_generations_total counter" in text  # counters kept


def test_histogram_buckets_are_cumulative_with_le_bounds():
    histogram = Histogram((1, 2, 4))
    for value in (0.5, 1, 3, 4, 9, math.nan):
        histogram.observe(value)
    assert histogram.samples("x") == [('x_bucket{le="1"}', 2), ('x_bucket{le="2"}', 2), ('x_bucket{le="4"}', 4),
                                      ('x_bucket{le="+Inf"}', 5), ("x_sum", 17.5), ("x_count", 5)]


def test_max_batch_one_runs_requests_one_after_another(tiny, recorder):
    prompts = [words(ids) for ids in random_prompts(3, seed=37)]
    with serving(create_app(tiny, "pld", max_batch=1, method_options=OPTIONS)) as url:
        mark = len(recorder.widths)
        outcomes = run_concurrently([lambda p=p: stream_text(url, p, 10) for p in prompts])
        assert [o[0] if isinstance(o, tuple) else o for o in outcomes] == [reference(tiny, p, 10) for p in prompts]
        assert set(recorder.since(mark)) == {1}


def test_bad_max_batch_is_refused(tiny, capsys):
    for value in (0, -1, True, 2.5):
        with pytest.raises(HastenError, match="batch"):
            create_app(tiny, "pld", max_batch=value)
    assert main(["serve", "--model", "/nonexistent/model", "--max-batch", "0"]) == 2
    assert capsys.readouterr().err.startswith("hasten: error: --max-batch")


def test_sse_payloads_of_a_batched_chat_stream_with_n(base, tiny):
    """Chat, n=2, streamed while another request shares the batch: each choice's chunks add up to its answer."""
    messages = [{"role": "user", "content": "w8 w9 w10 w8 w9"}]
    other = threading.Thread(target=lambda: stream_text(base, "w3 w4 w5 w3 w4", 30))
    other.start()
    body = {"messages": messages, "max_tokens": 12, "temperature": 0, "stream": True, "n": 2}
    payloads = sse_payloads(httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).text)
    other.join(60)
    assert payloads[-1] == "[DONE]"
    texts = {0: "", 1: ""}
    for chunk in map(json.loads, payloads[:-1]):
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["delta"].get("content", "")
    expected = generate(tiny, messages, "pld", max_new_tokens=12, temperature=0, **OPTIONS).text
    assert texts == {0: expected, 1: expected}


def load_script():
    """scripts/loadtest.py as a module (registered, as its dataclasses need)."""
    import importlib.util
    import sys
    from pathlib import Path

    if "hasten_loadtest" in sys.modules:
        return sys.modules["hasten_loadtest"]
    path = Path(__file__).resolve().parent.parent / "scripts" / "loadtest.py"
    spec = importlib.util.spec_from_file_location("hasten_loadtest", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["hasten_loadtest"] = module
    spec.loader.exec_module(module)
    return module


def test_the_shipped_load_test_against_a_batching_server(tiny):
    """The load test's clients, bad requests, cancels and exactness check, on the tiny model in-process."""
    import asyncio

    loadtest = load_script()
    prompts = [words(ids) for ids in random_prompts(5, seed=38)]
    specs = loadtest.plan(40, prompts, tiny.max_context, tiny.vocab_size, malformed=0.2, cancel=0.15, overlong=0.1,
                          seed=1)
    kinds = {spec.kind for spec in specs}
    assert kinds == {"good", "malformed", "cancel", "overlong"}
    references = {}
    for prompt in prompts:
        result = generate(tiny, [{"role": "user", "content": prompt}], "pld", max_new_tokens=12, temperature=0,
                          **OPTIONS)
        references[prompt] = (result.text, len(result.token_ids))
    with serving(create_app(tiny, "pld", max_queue=16, max_batch=4, method_options=OPTIONS)) as url:
        outcomes, wall = asyncio.run(loadtest.drive(url, specs, 8, None, 12, None, progress=False))
        run = loadtest.summarize(outcomes, wall, references)
        run["healthy_after"] = health(url)["status"] == "ok"
        assert metrics_of(url)["hasten_step_batch_size_sum"] > metrics_of(url)["hasten_step_batch_size_count"]
    good = sum(spec.kind == "good" for spec in specs)
    assert run["good_ok"] == run["exact"] == good and run["completion_tokens"] > 0
    assert run["bad_requests"] == run["bad_requests_4xx"] == sum(s.kind in ("malformed", "overlong") for s in specs)
    assert run["lost_or_mixed"] == 0 and run["errors"] == {} and run["ttft_ms"]["p95"] is not None
    assert loadtest.passed(run)
    wrong = {prompt: (text + "!", tokens) for prompt, (text, tokens) in references.items()}
    assert not loadtest.passed({**run, **loadtest.summarize(outcomes, wall, wrong)})  # the check can fail


def test_load_test_percentiles():
    loadtest = load_script()
    assert loadtest.percentile([], 50) is None
    assert loadtest.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert loadtest.percentile([float(i) for i in range(101)], 95) == 95.0


def test_hasten_serve_runs_the_generation_loop_on_the_main_thread(tiny):
    """``hasten serve``'s loop: uvicorn on a thread, generation on the main thread (llama.cpp is ~3x faster there)."""
    import socket

    import uvicorn

    from hasten.commands.serve import serve
    from hasten.methods import METHODS, Method
    from hasten.proposers.prompt_lookup import PromptLookupProposer

    threads: set[str] = set()

    class Recording(PromptLookupProposer):
        def propose(self, context, max_depth):
            threads.add(threading.current_thread().name)
            return super().propose(context, max_depth)

    METHODS["where"] = Method(lambda target, params, generator, options: Recording(num_tokens=4))
    try:
        app = create_app(tiny, "where", max_batch=2)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        answers: list = []

        def client() -> None:
            try:
                wait_for(lambda: _up(port), "the server did not start", timeout=30)
                body = {"prompt": "w3 w4 w5", "max_tokens": 6, "temperature": 0}
                answers.append(httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30).json())
            finally:
                app.state.worker.stop()

        helper = threading.Thread(target=client)
        helper.start()
        assert serve(app, uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")) == 0
        helper.join(30)
    finally:
        del METHODS["where"]
    assert answers and answers[0]["choices"][0]["text"] == generate(tiny, "w3 w4 w5", "ar", max_new_tokens=6,
                                                                     chat=False).text
    assert threads == {threading.main_thread().name}


def test_hasten_serve_on_a_port_in_use_fails_cleanly(tiny):
    import socket

    import uvicorn

    from hasten.commands.serve import serve

    app = create_app(tiny, "ar")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(HastenError, match="could not listen"):
            serve(app, uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow
def test_concurrent_streams_on_the_default_model_equal_one_at_a_time(default_model):
    """The real llama.cpp batched pass (score_many) through the server: 4 concurrent chat streams, each exact."""
    assert callable(getattr(default_model.backend, "score_many", None))
    questions = ["What is the capital of France?", "Name three colors.", "Write a haiku about caches.",
                 "Explain recursion in one sentence."]
    expected = [generate(default_model, [{"role": "user", "content": q}], "pld", max_new_tokens=24,
                         temperature=0).text for q in questions]

    def chat(url: str, question: str) -> str:
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": 24, "temperature": 0,
                "stream": True}
        payloads = sse_payloads(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).text)
        assert payloads[-1] == "[DONE]"
        return "".join(json.loads(p)["choices"][0]["delta"].get("content", "") for p in payloads[:-1])

    with serving(create_app(default_model, "pld", max_batch=4)) as url:
        outcomes = run_concurrently([lambda q=q: chat(url, q) for q in questions])
        samples = metrics_of(url)
    assert outcomes == expected
    assert samples["hasten_step_batch_size_sum"] > samples["hasten_step_batch_size_count"]  # they were batched
