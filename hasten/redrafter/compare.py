"""Side-by-side numbers for ReDrafter: ``python -m hasten.redrafter.compare [--methods ar,redrafter] ...``.

Greedy generation on the default model for a few chat, code and summarisation prompts; prints, per category,
the median tokens per target pass and tokens/s of every method and the speedup over ``ar``, plus how many
tokens per step the prefix merging removed. Outputs are checked to be identical to ``ar``'s.
"""

from __future__ import annotations

import argparse
import json
import statistics

from hasten.api import prompt_ids
from hasten.backends.transformers_target import TransformersTarget
from hasten.engine import DecodeStats, decode
from hasten.methods import build_proposer
from hasten.models import load_model
from hasten.sampling import SamplingParams

PROMPTS = {
    "chat": [
        "What are three good habits for staying healthy? Explain each briefly.",
        "How do I make a cup of tea?",
        "Give me some tips for a job interview.",
    ],
    "code": [
        "Write a Python function that checks whether a string is a palindrome.",
        "Write a Python function to compute the factorial of a number.",
        "Write a Python function that returns the largest element of a list.",
    ],
    "summarisation": [
        "Summarise in two sentences: The city council met on Monday to discuss the new park. Residents asked for "
        "more trees, benches and a playground. The council agreed to spend two million dollars on the project, "
        "which will start next spring and finish by the end of the year.",
        "Summarise this paragraph: Honey bees live in colonies with one queen, thousands of workers and a few "
        "hundred drones. Workers collect nectar and pollen, build the comb and care for the young. The queen lays "
        "all the eggs, up to two thousand a day in summer.",
        "Summarise: The train was late because of snow on the tracks. Passengers waited for two hours at the "
        "station, and the railway company offered them free coffee and a refund of half the ticket price.",
    ],
}


def run_one(loaded, ids: list[int], method: str, max_new_tokens: int, options: dict) -> tuple[list[int], dict]:
    params = SamplingParams()
    proposer = build_proposer(method, loaded, params, None, **options)
    target = TransformersTarget(loaded.model, want_hidden=proposer.needs_hidden)
    stats = DecodeStats()
    tokens = [t for chunk in decode(target, proposer, ids, max_new_tokens, params, loaded.eos_token_ids, stats)
              for t in chunk]
    row = {"tokens": len(tokens), "per_pass": stats.mean_accepted, "tok_s": stats.tokens_per_s}
    tree = getattr(proposer, "tree_stats", None)
    if tree is not None and tree.steps:
        row["beam_tokens_per_step"] = tree.beam_tokens / tree.steps
        row["tree_tokens_per_step"] = tree.tree_tokens / tree.steps
    return tokens, row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="ar,redrafter")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--beam-width", type=int, default=4)
    parser.add_argument("--beam-length", type=int, default=5)
    parser.add_argument("--head", default=None)
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    loaded = load_model("default")
    options = {"beam_width": args.beam_width, "beam_length": args.beam_length}
    if args.head:
        options["head"] = args.head
    results: dict[str, dict[str, list[dict]]] = {}
    for category, prompts in PROMPTS.items():
        for prompt in prompts:
            ids = prompt_ids(loaded, prompt)
            outputs = {}
            for method in methods:
                tokens, row = run_one(loaded, ids, method, args.max_new_tokens,
                                      options if method == "redrafter" else {})
                outputs[method] = tokens
                results.setdefault(category, {}).setdefault(method, []).append(row)
            assert all(out == outputs[methods[0]] for out in outputs.values()), f"outputs differ on {prompt!r}"
    summary = {}
    for category, by_method in results.items():
        base = statistics.median(r["tok_s"] for r in by_method[methods[0]])
        summary[category] = {}
        for method, rows in by_method.items():
            entry = {key: round(statistics.median(r[key] for r in rows), 2) for key in rows[0]}
            entry["speedup"] = round(entry["tok_s"] / base, 2)
            summary[category][method] = entry
            print(f"{category:14s} {method:10s} " + " ".join(f"{k}={v}" for k, v in entry.items()))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
