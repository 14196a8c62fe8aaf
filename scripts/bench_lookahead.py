"""Side-by-side greedy benchmark of ``ar``, ``pld`` and ``lookahead`` on the default model (one process).

    python scripts/bench_lookahead.py --max-new-tokens 96 --configs 4,4,3 3,3,3 --repeats 1

For every prompt the methods run one after another (interleaved, so they share the machine's noise), and the
output of every method is checked against ``ar``'s. Prints tokens per pass, tokens scored per pass, wall time
and speedup over ``ar``, and a modelled speedup from a measured pass-cost curve (less sensitive to a busy CPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hasten.backends.transformers_target import TransformersTarget
from hasten.engine import DecodeStats, decode
from hasten.methods import build_proposer
from hasten.models import encode_prompt, load_model
from hasten.sampling import SamplingParams

PROMPTS = {
    "code": [
        "Write a Python function that checks whether a string is a palindrome, then test it on three words.",
        "Write a Python class for a stack with push, pop, peek and is_empty methods, with docstrings.",
    ],
    "chat": [
        "Tell me a short story about a robot who learns to paint.",
        "What are three tips for staying focused while working from home?",
    ],
    "summary": [
        "Summarise in two sentences: The city council met on Tuesday to discuss the new park. The park will have "
        "a playground, a pond and a small cafe. Residents asked for more trees and benches. The council agreed "
        "to plant fifty trees and add twenty benches. Work on the park starts in May and ends in October.",
    ],
}


def pass_costs(loaded, sizes: list[int], context: int = 120, reps: int = 7) -> dict[int, float]:
    """Best-of-``reps`` seconds for one target pass over n tokens after a ``context``-token cache."""
    target = TransformersTarget(loaded.model)
    costs = {}
    for n in sizes:
        best = float("inf")
        for _ in range(reps):
            target.start(list(range(10, 10 + context)))
            began = time.perf_counter()
            target.score(list(range(200, 200 + n)), list(range(n)), None)
            best = min(best, time.perf_counter() - began)
            target.commit([])
        costs[n] = best
    return costs


def interpolate(costs: dict[int, float], n: float) -> float:
    sizes = sorted(costs)
    for lo, hi in zip(sizes, sizes[1:], strict=False):
        if n <= hi:
            return costs[lo] + (costs[hi] - costs[lo]) * (n - lo) / (hi - lo)
    return costs[sizes[-1]] * n / sizes[-1]


def run(loaded, ids: list[int], method: str, max_new_tokens: int, **options) -> tuple[list[int], DecodeStats]:
    params = SamplingParams()
    proposer = build_proposer(method, loaded, params, **options)
    stats = DecodeStats()
    target = TransformersTarget(loaded.model)
    out: list[int] = []
    for chunk in decode(target, proposer, ids, max_new_tokens, params, loaded.eos_token_ids, stats):
        out.extend(chunk)
    return out, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--configs", nargs="+", default=["2,5,2"], help="lookahead W,N,G triples")
    parser.add_argument("--categories", nargs="+", default=list(PROMPTS))
    parser.add_argument("--no-pld", action="store_true")
    parser.add_argument("--lead-costs", action="store_true",
                        help="model pass costs with the lead's quiet-machine numbers (1-12: 50, 16: 78, 32: 107 ms)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    loaded = load_model("default")
    if args.lead_costs:
        costs = {1: 0.050, 12: 0.050, 16: 0.078, 32: 0.107}
    else:
        costs = pass_costs(loaded, [1, 4, 8, 12, 16, 24, 32, 48])
    print("pass cost (ms): " + ", ".join(f"{n}: {1e3 * c:.0f}" for n, c in costs.items()))
    methods: list[tuple[str, str, dict]] = [] if args.no_pld else [("pld", "pld", {})]
    for config in args.configs:
        w, n, g = (int(x) for x in config.split(","))
        methods.append((f"la W{w} N{n} G{g}", "lookahead", {"window": w, "ngram": n, "guesses": g}))
    table: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    for category in args.categories:
        for prompt in PROMPTS[category]:
            ids = encode_prompt(loaded.tokenizer, prompt)
            reference, base = run(loaded, ids, "ar", args.max_new_tokens)
            for label, method, options in methods:
                out, stats = run(loaded, ids, method, args.max_new_tokens, **options)
                assert out == reference, f"{label} differs from ar on {prompt!r}"
                scored = stats.scored_tokens / stats.target_passes
                modelled = stats.mean_accepted * costs[1] / interpolate(costs, scored)
                row = (stats.mean_accepted, scored, base.wall_s / stats.wall_s, modelled)
                table.setdefault((category, label), []).append(row)
                print(f"{category:8s} {label:16s} tokens/pass {row[0]:.2f}  scored/pass {row[1]:5.1f}  "
                      f"speedup {row[2]:.2f}x  modelled {row[3]:.2f}x  ({len(out)} tokens)", flush=True)
    print("\nmean per category:")
    for (category, label), rows in table.items():
        means = [statistics.mean(col) for col in zip(*rows, strict=True)]
        print(f"{category:8s} {label:16s} tokens/pass {means[0]:.2f}  scored/pass {means[1]:5.1f}  "
              f"speedup {means[2]:.2f}x  modelled {means[3]:.2f}x")


if __name__ == "__main__":
    main()
