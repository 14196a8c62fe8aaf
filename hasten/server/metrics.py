"""Server counters and histograms, rendered in the Prometheus text exposition format for ``GET /metrics``."""

from __future__ import annotations

import bisect
import math
import threading
from collections import Counter
from collections.abc import Callable, Sequence

from hasten.api import GenerationResult


def _labels(**labels: str) -> str:
    inner = ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items())
    return "{" + inner + "}" if inner else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
QUEUE_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
RATE_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300)


class Histogram:
    """Cumulative buckets (upper bounds ``le``), a sum and a count; not locked (``Metrics`` holds the lock)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = sorted(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        if math.isnan(value):
            return
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def samples(self, name: str) -> list[tuple[str, float]]:
        """``name_bucket{le=...}`` (cumulative, ending with +Inf), ``name_sum`` and ``name_count``."""
        out, running = [], 0
        for bound, count in zip([*self.bounds, math.inf], self.counts, strict=True):
            running += count
            out.append((f"{name}_bucket" + _labels(le="+Inf" if bound == math.inf else f"{bound:g}"), running))
        return [*out, (f"{name}_sum", self.sum), (f"{name}_count", self.count)]


class Metrics:
    """Thread-safe counters and histograms: the event loop counts requests, the worker its steps and generations."""

    def __init__(self, queue_depth: Callable[[], int] = lambda: 0, running: Callable[[], int] = lambda: 0,
                 batch_size: Callable[[], int] = lambda: 0,
                 prompt_cache: Callable[[], tuple[int, int]] = lambda: (0, 0)) -> None:
        self._lock = threading.Lock()
        self.queue_depth = queue_depth
        self.running = running
        self.batch_size = batch_size
        self.prompt_cache = prompt_cache  # (prefills that reused a stored prompt, the prompt tokens they skipped)
        self.step_batch = Histogram(BATCH_BUCKETS)
        self.step_queue = Histogram(QUEUE_BUCKETS)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.rate = Histogram(RATE_BUCKETS)
        self.requests: Counter[tuple[str, int]] = Counter()
        self.generations: Counter[str] = Counter()
        self.tokens: Counter[str] = Counter()
        self.prompt_tokens: Counter[str] = Counter()
        self.passes: Counter[str] = Counter()
        self.cancelled = 0

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[endpoint, status] += 1

    def count_generation(self, result: GenerationResult) -> None:
        with self._lock:
            self.generations[result.method] += 1
            self.tokens[result.method] += len(result.token_ids)
            self.prompt_tokens[result.method] += result.prompt_tokens
            self.passes[result.method] += result.target_passes
            if result.token_ids and result.wall_s > 0:
                self.rate.observe(result.tokens_per_s)

    def observe_step(self, batch_size: int, queue_depth: int) -> None:
        """One batched step: the generations it advanced and the requests waiting behind it."""
        with self._lock:
            self.step_batch.observe(batch_size)
            self.step_queue.observe(queue_depth)

    def observe_first_token(self, seconds: float) -> None:
        """A generation's first token, ``seconds`` after its request was queued."""
        with self._lock:
            self.ttft.observe(seconds)

    def count_cancelled(self) -> None:
        with self._lock:
            self.cancelled += 1

    def render(self) -> str:
        """The Prometheus text format (version 0.0.4)."""
        with self._lock:
            lines: list[str] = []

            def family(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
                lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}"])
                lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

            def histogram(name: str, help: str, values: Histogram) -> None:
                lines.extend([f"# HELP {name} {help}", f"# TYPE {name} histogram"])
                lines.extend(f"{sample} {value:.10g}" for sample, value in values.samples(name))

            family("hasten_requests_total", "counter", "HTTP requests by endpoint and status code.",
                   [(_labels(endpoint=e, status=str(s)), v) for (e, s), v in sorted(self.requests.items())])
            family("hasten_generations_total", "counter", "Finished generations (choices) by method.",
                   [(_labels(method=m), v) for m, v in sorted(self.generations.items())])
            family("hasten_generated_tokens_total", "counter", "Tokens generated by finished generations.",
                   [(_labels(method=m), v) for m, v in sorted(self.tokens.items())])
            family("hasten_prompt_tokens_total", "counter", "Prompt tokens of finished generations.",
                   [(_labels(method=m), v) for m, v in sorted(self.prompt_tokens.items())])
            family("hasten_target_passes_total", "counter", "Target model passes of finished generations.",
                   [(_labels(method=m), v) for m, v in sorted(self.passes.items())])
            family("hasten_mean_accepted_tokens", "gauge", "Tokens emitted per target pass, by method.",
                   [(_labels(method=m), self.tokens[m] / p) for m, p in sorted(self.passes.items()) if p])
            family("hasten_requests_cancelled_total", "counter",
                   "Requests whose client went away before their generation finished.", [("", self.cancelled)])
            family("hasten_queue_depth", "gauge", "Requests waiting for the worker.", [("", self.queue_depth())])
            family("hasten_requests_running", "gauge", "Requests with a generation in the batch now.",
                   [("", self.running())])
            family("hasten_batch_size", "gauge", "Generations in the batch now.", [("", self.batch_size())])
            hits, reused = self.prompt_cache()
            family("hasten_prompt_cache_hits_total", "counter",
                   "Prefills that restored a stored prompt's prefix instead of running it.", [("", hits)])
            family("hasten_prompt_cache_tokens_total", "counter",
                   "Prompt tokens restored from the prompt cache (not run).", [("", reused)])
            histogram("hasten_step_batch_size", "Generations advanced by each batched step.", self.step_batch)
            histogram("hasten_step_queue_depth", "Requests waiting for room in the batch, seen at each step.",
                      self.step_queue)
            histogram("hasten_time_to_first_token_seconds",
                      "From a request's arrival in the queue to each of its generations' first token.", self.ttft)
            histogram("hasten_generation_tokens_per_second",
                      "Tokens per second of each finished generation (its own steps, prefill included).", self.rate)
            return "\n".join(lines) + "\n"
