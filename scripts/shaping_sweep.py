"""Greedy exactness of shaped decoding on every shipped bench prompt: each method equals ``ar`` token for token.

Two settings: penalties plus a logit bias, and ``json_object`` plus ``min_p`` (a question with its own
``response_format`` keeps its schema). Prints the number of comparisons and every mismatch; exits 1 on any.
Usage: ``python scripts/shaping_sweep.py [--max-new-tokens 48]`` (about 4 minutes on 2 idle cores).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tqdm import tqdm

from hasten.api import generate
from hasten.bench.prompts import read_prompts
from hasten.models import load_model

SETTINGS: dict[str, dict[str, Any]] = {
    "penalties": {"presence_penalty": 0.6, "frequency_penalty": 0.3, "repetition_penalty": 1.15,
                  "logit_bias": {29: -3.0}},
    "json_object+min_p": {"response_format": {"type": "json_object"}, "min_p": 0.1},
}
METHODS = ("pld", "lookahead", "draft", "auto")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    loaded = load_model("default")
    mismatches, checked = [], 0
    for prompt in tqdm(read_prompts(), desc="prompts"):
        for name, setting in SETTINGS.items():
            options = dict(setting)
            if prompt.response_format is not None:
                options["response_format"] = prompt.response_format
            reference = generate(loaded, prompt.turns[0], "ar", max_new_tokens=args.max_new_tokens, **options)
            for method in METHODS:
                result = generate(loaded, prompt.turns[0], method, max_new_tokens=args.max_new_tokens, **options)
                checked += 1
                if result.token_ids != reference.token_ids:
                    mismatches.append((prompt.question_id, name, method))
    print(f"checked {checked}, mismatches {mismatches}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
