"""Host time per decode step outside llama_decode, on llama.cpp, split by where it goes.

    python docs/results/per-row-host/measure.py MODEL METHODS [PROMPTS] [OUT.json]

MODEL is ``default`` or ``gemma3-270m`` (raw text, no chat template); METHODS a comma-separated list of hasten
methods, where a ``-fixed`` suffix turns the adaptive policy off (``pld-fixed``: prompt lookup drafts whenever it
matches, so passes score trees). PROMPTS (4) first turns of the bench's chat, code, rag and summarization prompts,
128 new tokens each, greedy, 2 threads. Each step (``begin_step``, the target's ``score``, ``end_step``) is timed
with the wall clock, and llama_decode's own time (the model's ``decode_log``) is taken out: what is left is the
host's work (the proposer, laying the pass out, filling the batch, reading the logits, verifying, committing). The
one-token pass is llama_decode's time on the steps that scored one token. OUT.json gets each method's tokens per
prompt.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import hasten.engine as engine
from hasten.api import make_request, start_generation
from hasten.models import load_model

PROMPTS = Path(engine.__file__).parent / "data" / "bench_prompts.jsonl"
CATEGORIES = ("chat", "code", "rag", "summarization")
clock: dict[str, float] = {}


def timed(name: str, function: Any) -> Any:
    """``function`` (one of hasten's) adding its wall time to ``clock``."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        wall = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            clock[name] = clock.get(name, 0.0) + time.perf_counter() - wall

    return wrapper


def generation_steps(loaded: Any, method: str, prompt: str, chat: bool) -> tuple[list[dict[str, float]], list[int]]:
    """One greedy generation, stepped as ``engine.run`` steps it; each step's times and the new tokens."""
    options = {"adaptive": False} if method.endswith("-fixed") else {}
    request = make_request(loaded, prompt, method.removesuffix("-fixed"), max_new_tokens=128, chat=chat, **options)
    generation = start_generation(loaded, request)
    generation.prefill()
    steps = []
    log: list[tuple[int, float]] = []
    loaded.backend.decode_log = log
    while not generation.finished:
        clock.clear()
        log.clear()
        drafted = generation.stats.draft_s
        wall = time.perf_counter()
        layout = generation.begin_step()
        began = time.perf_counter()
        scores = generation.target.score(layout.tokens, layout.parents, layout.logits_rows)
        scored = time.perf_counter()
        generation.end_step(scores, (scored - began) * 1000)
        decode = sum(seconds for _, seconds in log)
        steps.append({"width": len(layout.tokens), "decode": decode, "host": time.perf_counter() - wall - decode,
                      "proposer": generation.stats.draft_s - drafted, "verify": clock.get("verify", 0.0),
                      "score_host": scored - began - decode})
    loaded.backend.decode_log = None
    generation.target.close()
    return steps, generation.context[len(request.ids):]


def main() -> None:
    spec, methods = sys.argv[1], sys.argv[2].split(",")
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    loaded = load_model(spec, backend="llamacpp", threads=2)
    engine.verify = timed("verify", engine.verify)
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()]
    prompts = [[r["turns"][0] for r in rows if r["category"] == c][0] for c in CATEGORIES][:count]
    chat = spec != "gemma3-270m"
    generation_steps(loaded, "ar", prompts[0], chat)  # warm-up
    tokens: dict[str, list[list[int]]] = {}
    for method in methods:
        steps: list[dict[str, float]] = []
        tokens[method] = []
        for prompt in prompts:
            these, new = generation_steps(loaded, method, prompt, chat)
            steps += these
            tokens[method].append(new)
        one = [s["decode"] for s in steps if s["width"] == 1]

        def ms(key: str, median: bool = False, of: list[dict[str, float]] = steps) -> float:
            values = [s[key] for s in of]
            return 1000 * (statistics.median(values) if median else statistics.mean(values))

        pass_ms = 1000 * statistics.median(one) if one else float("nan")
        host = ms("host", median=True)
        print(f"{spec} {method}: {len(steps)} steps, {sum(map(len, tokens[method])) / len(steps):.2f} tokens and "
              f"{statistics.mean(s['width'] for s in steps):.2f} rows a pass; one-token pass {pass_ms:.2f} ms "
              f"(median); host per step: median {host:.3f} ms ({100 * host / pass_ms:.1f}% of the pass), "
              f"mean {ms('host'):.3f}; of which (means) proposer "
              f"{ms('proposer'):.3f}, target's score outside llama_decode {ms('score_host'):.3f}, "
              f"verify {ms('verify'):.3f}", flush=True)
    if len(sys.argv) > 4:
        Path(sys.argv[4]).write_text(json.dumps(tokens))


if __name__ == "__main__":
    main()
