#!/usr/bin/env python
"""Load test for ``hasten serve``: N concurrent streaming clients on loopback, with bad and cancelled requests.

It starts ``hasten serve`` (once per ``--max-batch`` value, on the same requests) or targets ``--url``, sends a
seeded mix of requests (good greedy streams, malformed bodies, over-long prompts, streams dropped mid-way) from
``--clients`` concurrent clients until ``--requests`` are sent or ``--duration`` seconds pass, and reports the
aggregate tokens/s, p50/p95 time to first token and inter-token latency, errors by kind, and whether every good
answer equals its single-request reference (``hasten.api.generate`` on the same model, greedy). Exit status 0 when
nothing crashed, nothing was lost or wrong, and every bad request got a 4xx.

    python scripts/loadtest.py --clients 8 --requests 32 --max-batch 8,1 --json out.json
    python scripts/loadtest.py --clients 50 --requests 150 --malformed 0.15 --cancel 0.1 --overlong 0.05
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
from tqdm import tqdm

MALFORMED: list[tuple[str, str]] = [  # (endpoint, raw body): each must get a 4xx
    ("/v1/chat/completions", "{not json"),
    ("/v1/chat/completions", "[1, 2]"),
    ("/v1/chat/completions", '{"messages": []}'),
    ("/v1/chat/completions", '{"messages": [{"role": "wizard", "content": "hi"}]}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "temperature": -1}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "method": "magic", "stream": true}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}'),
    ("/v1/completions", '{"prompt": "hi", "max_tokens": 0}'),
    ("/v1/completions", '{"prompt": "hi", "max_tokens": "5", "stream": true}'),
    ("/v1/completions", '{"prompt": ""}'),
    ("/v1/completions", '{"prompt": "hi", "top_p": 2}'),
    ("/v1/completions", '{"prompt": [999999999]}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}'),
    ("/v1/completions", '{"prompt": "hi", "echo": true, "stream": true}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}'),
]


@dataclass
class Spec:
    """One request to send: ``kind`` is good, malformed, overlong or cancel."""

    kind: str
    prompt: str = ""
    endpoint: str = ""
    body: str = ""
    cancel_after: int = 0  # content chunks read before a cancel drops the connection
    stream: bool = True


@dataclass
class Outcome:
    """What one request got back."""

    kind: str
    prompt: str = ""
    status: int = 0
    error: str = ""  # empty when the request went as it should
    text: str = ""
    tokens: int = 0
    ttft_s: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    mean_accepted: float | None = None  # the server's tokens per target pass for this answer
    sent_at: float = 0.0
    done_at: float = 0.0


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between ranks; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def plan(count: int, prompts: list[str], context: int, vocab_size: int, malformed: float, cancel: float,
         overlong: float, seed: int) -> list[Spec]:
    """A seeded list of ``count`` requests with the given shares of bad and cancelled ones (an over-long prompt
    is ``context + 8`` valid token ids)."""
    rng = random.Random(seed)
    specs = []
    for i in range(count):
        roll = rng.random()
        if roll < malformed:
            endpoint, body = MALFORMED[rng.randrange(len(MALFORMED))]
            specs.append(Spec("malformed", endpoint=endpoint, body=body, stream=False))
        elif roll < malformed + overlong:
            ids = [rng.randrange(vocab_size // 2, vocab_size) for _ in range(context + 8)]
            specs.append(Spec("overlong", endpoint="/v1/completions", stream=bool(i % 2),
                              body=json.dumps({"prompt": ids, "max_tokens": 4, "stream": bool(i % 2)})))
        elif roll < malformed + overlong + cancel:
            specs.append(Spec("cancel", prompt=prompts[i % len(prompts)], cancel_after=rng.randint(1, 3)))
        else:
            specs.append(Spec("good", prompt=prompts[i % len(prompts)]))
    return specs


def chat_body(prompt: str, max_tokens: int, method: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if method:
        body["method"] = method
    return body


async def send_stream(http: httpx.AsyncClient, spec: Spec, max_tokens: int, method: str | None) -> Outcome:
    """A streamed greedy chat request (dropped after ``cancel_after`` chunks for a cancel)."""
    out = Outcome(spec.kind, spec.prompt, sent_at=time.perf_counter())
    ids, finished, done = set(), False, False
    async with http.stream("POST", "/v1/chat/completions", json=chat_body(spec.prompt, max_tokens, method)) as reply:
        out.status = reply.status_code
        if reply.status_code != 200:
            await reply.aread()
            out.error = f"{reply.status_code} {error_code(reply.content)}"
            return out
        async for line in reply.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                out.error = f"stream error {chunk['error'].get('code') or chunk['error'].get('type')}"
                continue
            ids.add(chunk["id"])
            if chunk.get("usage"):
                out.tokens = chunk["usage"]["completion_tokens"]
                out.mean_accepted = (chunk.get("hasten") or {}).get("mean_accepted")
            for choice in chunk["choices"]:
                if choice["index"] != 0:
                    out.error = "mixed: a choice index that was not asked for"
                text = choice["delta"].get("content") or ""
                if text:
                    now = time.perf_counter()
                    out.ttft_s = now - out.sent_at if out.ttft_s is None else out.ttft_s
                    out.chunk_times.append(now)
                    out.text += text
                finished = finished or bool(choice["finish_reason"])
            if spec.kind == "cancel" and len(out.chunk_times) >= spec.cancel_after:
                out.done_at = time.perf_counter()
                return out  # leaving the block drops the connection mid-stream
    out.done_at = time.perf_counter()
    if len(ids) > 1:
        out.error = "mixed: chunks of another response"
    elif not out.error and not (done and finished):
        out.error = "lost: the stream ended without a finish and [DONE]"
    elif spec.kind == "cancel" and not out.error:
        out.error = ""  # it finished before it could be dropped: fine
    return out


def error_code(content: bytes) -> str:
    try:
        error = json.loads(content)["error"]
        return str(error.get("code") or error.get("type"))
    except (ValueError, KeyError, TypeError):
        return "no OpenAI error body"


async def send_bad(http: httpx.AsyncClient, spec: Spec) -> Outcome:
    """A malformed or over-long request: it must get a 4xx (streamed or not)."""
    out = Outcome(spec.kind, sent_at=time.perf_counter())
    reply = await http.post(spec.endpoint, content=spec.body, headers={"Content-Type": "application/json"})
    out.status, out.done_at = reply.status_code, time.perf_counter()
    if not 400 <= reply.status_code < 500:
        out.error = f"{spec.kind} answered {reply.status_code}, not a 4xx"
    elif spec.kind == "overlong" and error_code(reply.content) != "context_length_exceeded":
        out.error = f"overlong answered {reply.status_code} {error_code(reply.content)}"
    return out


async def drive(url: str, specs: list[Spec], clients: int, duration: float | None, max_tokens: int,
                method: str | None, progress: bool = True) -> tuple[list[Outcome], float]:
    """Send ``specs`` from ``clients`` concurrent clients (none starts after ``duration`` s); outcomes, wall s."""
    queue: asyncio.Queue[Spec] = asyncio.Queue()
    for spec in specs:
        queue.put_nowait(spec)
    outcomes: list[Outcome] = []
    bar = tqdm(total=len(specs), desc="requests", unit="req", disable=not progress, file=sys.stderr)
    began = time.perf_counter()
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    timeout = httpx.Timeout(600.0, connect=30.0)

    async def client() -> None:
        while not queue.empty() and (duration is None or time.perf_counter() - began < duration):
            spec = queue.get_nowait()
            try:
                if spec.kind in ("good", "cancel"):
                    outcome = await send_stream(http, spec, max_tokens, method)
                else:
                    outcome = await send_bad(http, spec)
            except httpx.HTTPError as error:
                outcome = Outcome(spec.kind, spec.prompt, error=f"transport {type(error).__name__}",
                                  done_at=time.perf_counter())
            outcomes.append(outcome)
            bar.update()

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as http:
        await asyncio.gather(*(client() for _ in range(clients)))
    bar.close()
    return outcomes, time.perf_counter() - began


def summarize(outcomes: list[Outcome], wall_s: float, references: dict[str, tuple[str, int]] | None) -> dict:
    """The phase's numbers: throughput, latencies, errors by kind, exactness."""
    good = [o for o in outcomes if o.kind == "good" and not o.error]
    errors = Counter(f"{o.kind}: {o.error}" for o in outcomes if o.error)
    inexact = []
    if references is not None:
        for o in good:
            text, tokens = references[o.prompt]
            if o.text != text or o.tokens != tokens:
                inexact.append({"prompt": o.prompt[:60], "got": o.text[:80], "expected": text[:80]})
    tokens = sum(o.tokens for o in good)
    span = (max(o.done_at for o in good) - min(o.sent_at for o in good)) if good else 0.0
    ttft = [o.ttft_s for o in good if o.ttft_s is not None]
    itl = [(o.chunk_times[-1] - o.chunk_times[0]) / (o.tokens - 1) for o in good if o.tokens > 1 and o.chunk_times]
    gaps = [b - a for o in good for a, b in zip(o.chunk_times, o.chunk_times[1:], strict=False)]
    bad = [o for o in outcomes if o.kind in ("malformed", "overlong")]

    def ms(value: float | None) -> float | None:
        return None if value is None else round(1000 * value, 1)

    return {
        "sent": dict(Counter(o.kind for o in outcomes)),
        "answered": dict(sorted(Counter(f"{o.kind} {o.status or 'none'}" for o in outcomes).items())),
        "good_ok": len(good),
        "completion_tokens": tokens,
        "wall_s": round(wall_s, 2),
        "tokens_per_s": round(tokens / span, 2) if span > 0 else 0.0,
        "ttft_ms": {"p50": ms(percentile(ttft, 50)), "p95": ms(percentile(ttft, 95))},
        "inter_token_ms": {"p50": ms(percentile(itl, 50)), "p95": ms(percentile(itl, 95))},
        "chunk_gap_ms": {"p50": ms(percentile(gaps, 50)), "p95": ms(percentile(gaps, 95))},
        "mean_accepted_p50": percentile([o.mean_accepted for o in good if o.mean_accepted is not None], 50),
        "errors": dict(sorted(errors.items())),
        "bad_requests": len(bad),
        "bad_requests_4xx": sum(1 for o in bad if 400 <= o.status < 500),
        "lost_or_mixed": sum(1 for o in outcomes if o.error.startswith(("lost", "mixed", "transport"))),
        "exact": None if references is None else len(good) - len(inexact),
        "inexact": inexact[:10],
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(args: argparse.Namespace, max_batch: int, port: int) -> subprocess.Popen:
    """``hasten serve`` in a subprocess (its standard error to a temporary file); returns once ``/health`` answers."""
    command = [sys.executable, "-m", "hasten.cli", "serve", "--model", args.model, "--backend", args.backend,
               "--port", str(port), "--max-batch", str(max_batch), "--method", args.method, "--log-level", "warning"]
    if args.max_queue:
        command += ["--max-queue", str(args.max_queue)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    log = tempfile.TemporaryFile("w+")
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
    server.log = log  # type: ignore[attr-defined]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"loadtest: the server exited at start-up: {stop_server(server)['stderr_tail']}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise SystemExit("loadtest: the server did not start within 300 s")


def stop_server(server: subprocess.Popen) -> dict[str, Any]:
    """Stop it with SIGINT as a user would; its exit status and any traceback it printed."""
    alive = server.poll() is None
    if alive:
        server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    log = server.log  # type: ignore[attr-defined]
    log.seek(0)
    err = log.read()
    log.close()
    return {"alive_until_stopped": alive, "exit_status": server.returncode, "tracebacks": err.count("Traceback"),
            "stderr_tail": err[-2000:]}


def scrape(url: str) -> dict[str, float]:
    """A few numbers of the server's /metrics: the mean batch size per step, its step count, cancellations, the
    prompt cache's use."""
    samples = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    steps = samples.get("hasten_step_batch_size_count", 0.0)
    return {"steps": steps,
            "mean_batch_size": round(samples.get("hasten_step_batch_size_sum", 0.0) / steps, 2) if steps else 0.0,
            "requests_cancelled": samples.get("hasten_requests_cancelled_total", 0.0),
            "prompt_cache_hits": samples.get("hasten_prompt_cache_hits_total", 0.0),
            "prompt_cache_tokens": samples.get("hasten_prompt_cache_tokens_total", 0.0),
            "server_ttft_mean_s": round(samples.get("hasten_time_to_first_token_seconds_sum", 0.0)
                                        / max(samples.get("hasten_time_to_first_token_seconds_count", 0.0), 1), 3)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="target this running server instead of starting one")
    parser.add_argument("--model", default="default", help="model to serve, and to compute the references with")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", default="auto", help="the server's method (auto, as hasten serve's default)")
    parser.add_argument("--max-batch", default="8",
                        help="comma-separated: one server and run per value, in order (8,1 or 1,8,1,8)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed requests, one at a time, before each run (first-use costs)")
    parser.add_argument("--max-queue", type=int, default=None, help="the server's queue (default: hasten serve's)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32, help="requests to send in all (each run)")
    parser.add_argument("--duration", type=float, default=None, help="seconds after which no request starts")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--malformed", type=float, default=0.0, help="share of malformed requests")
    parser.add_argument("--cancel", type=float, default=0.0, help="share of streams dropped mid-way")
    parser.add_argument("--overlong", type=float, default=0.0, help="share of prompts longer than the context")
    parser.add_argument("--prompts", type=int, default=16, help="distinct prompts (shipped bench prompts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-check", action="store_true", help="skip the single-request references")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.max_tokens < 1:
        parser.error("--clients, --requests and --max-tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HASTEN_THREADS", str(args.threads))
    from hasten.api import generate
    from hasten.bench.prompts import read_prompts
    from hasten.models import load_model

    prompts = [p.turns[0] for p in read_prompts()][: args.prompts]
    loaded = load_model(args.model, args.backend, threads=args.threads)
    specs = plan(args.requests, prompts, loaded.max_context, loaded.vocab_size, args.malformed, args.cancel,
                 args.overlong, args.seed)
    references = None
    if not args.no_check:  # before any load, so that nothing else runs meanwhile
        wanted = sorted({s.prompt for s in specs if s.kind == "good"})
        references = {}
        for prompt in tqdm(wanted, desc="references", disable=args.quiet, file=sys.stderr):
            result = generate(loaded, [{"role": "user", "content": prompt}], args.method,
                              max_new_tokens=args.max_tokens, temperature=0)
            references[prompt] = (result.text, len(result.token_ids))
    del loaded
    report: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k not in ("json", "quiet")},
                              "runs": []}
    batches: list[int | None] = [None] if args.url else [int(b) for b in str(args.max_batch).split(",")]
    for max_batch in batches:
        server, url = None, args.url
        if url is None:
            assert max_batch is not None
            port = free_port()
            server, url = start_server(args, max_batch, port), f"http://127.0.0.1:{port}"
        method = None if args.url is None else args.method
        for prompt in prompts[: args.warmup]:
            httpx.post(f"{url}/v1/chat/completions", json={**chat_body(prompt, args.max_tokens, method),
                                                            "stream": False, "stream_options": None}, timeout=600)
        outcomes, wall = asyncio.run(drive(url, specs, args.clients, args.duration, args.max_tokens, method,
                                           not args.quiet))
        run = {"max_batch": max_batch, **summarize(outcomes, wall, references)}
        try:
            healthy = httpx.get(f"{url}/health", timeout=10).json().get("status") == "ok"
            run["server_metrics"] = scrape(url)
        except httpx.HTTPError:
            healthy = False
        run["healthy_after"] = healthy
        if server is not None:
            run["server"] = stop_server(server)
        report["runs"].append(run)
        print(describe(run), file=sys.stderr)
    by_batch: dict[str, list[float]] = {}
    for run in report["runs"]:
        by_batch.setdefault(str(run["max_batch"]), []).append(run["tokens_per_s"])
    report["mean_tokens_per_s"] = {b: round(sum(v) / len(v), 2) for b, v in by_batch.items()}
    one = report["mean_tokens_per_s"].get("1")
    if one:
        report["speedup_vs_max_batch_1"] = {b: round(v / one, 2) for b, v in report["mean_tokens_per_s"].items()}
    text = json.dumps(report, indent=2)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")
    print(text)
    return 0 if all(passed(run) for run in report["runs"]) else 1


def passed(run: dict[str, Any]) -> bool:
    """No crash, nothing lost or mixed, every bad request a 4xx, every good answer exact."""
    server = run.get("server", {})
    return (run["healthy_after"] and not server.get("tracebacks") and run["lost_or_mixed"] == 0
            and run["bad_requests_4xx"] == run["bad_requests"] and not run["inexact"]
            and not any(key.startswith("good") for key in run["errors"]))


def describe(run: dict[str, Any]) -> str:
    return (f"max_batch={run['max_batch']}: {run['good_ok']} good answers, {run['completion_tokens']} tokens, "
            f"{run['tokens_per_s']} tokens/s, TTFT p50/p95 {run['ttft_ms']['p50']}/{run['ttft_ms']['p95']} ms, "
            f"inter-token p50/p95 {run['inter_token_ms']['p50']}/{run['inter_token_ms']['p95']} ms, "
            f"exact {run['exact']}, errors {run['errors'] or 'none'}")


if __name__ == "__main__":
    sys.exit(main())
