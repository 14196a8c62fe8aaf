"""Aggregate tokens/s of N sequences decoded together (``generate_batch``) vs one after another (``generate``).

Usage: flock /tmp/hasten-timing.lock python scripts/batch_throughput.py [--n 8] [--method ar] [--new 96]
Greedy outputs must be equal token for token; the script exits non-zero when they are not.
"""

from __future__ import annotations

import argparse
import sys
import time

from hasten.api import generate, generate_batch
from hasten.models import load_model

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "List three uses of copper.",
    "Translate to French: The cat sat on the mat.",
    "What is the capital of Japan? Answer briefly.",
    "Write a Python function that adds two numbers.",
    "Summarise the plot of Romeo and Juliet.",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "Describe a sunrise in two sentences.",
    "What does HTTP stand for?",
    "Name five animals that live in the ocean.",
    "How do vaccines work?",
    "Write a haiku about autumn.",
    "What is the boiling point of water?",
    "Explain recursion to a child.",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="sequences")
    parser.add_argument("--method", default="ar")
    parser.add_argument("--new", type=int, default=96, help="max new tokens per sequence")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    loaded = load_model("default", threads=args.threads)
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS[: args.n]]
    generate(loaded, prompts[0], args.method, max_new_tokens=4)  # warm up
    best_single, best_batch = float("inf"), float("inf")
    for _ in range(args.rounds):
        began = time.perf_counter()
        single = [generate(loaded, p, args.method, max_new_tokens=args.new).token_ids for p in prompts]
        best_single = min(best_single, time.perf_counter() - began)
        began = time.perf_counter()
        batched = [r.token_ids for r in generate_batch(loaded, prompts, args.method, max_new_tokens=args.new)]
        best_batch = min(best_batch, time.perf_counter() - began)
    tokens = sum(len(ids) for ids in single)
    print(f"{args.n} sequences, {args.method}, {tokens} new tokens, {args.threads} threads (best of {args.rounds})")
    print(f"one after another: {best_single:.2f} s, {tokens / best_single:.1f} tok/s")
    print(f"batched:           {best_batch:.2f} s, {tokens / best_batch:.1f} tok/s")
    print(f"speed-up: {best_single / best_batch:.2f}x; outputs equal: {batched == single}")
    return 0 if batched == single else 1


if __name__ == "__main__":
    sys.exit(main())
