"""Replay an adaptive proposer along greedy ``ar`` outputs, on a measured cost curve: a policy's speedup in seconds.

Greedy output is the target's whatever is drafted, so the bench's ``ar`` records (prompt and answer ids) say what
every step accepts. Each step the real proposer drafts from the context, the reference decides its accepted
prefix, the step costs ``cost(pass width)`` on the curve plus the proposer's own measured time, and the proposer
learns as it would in a generation. One acceptance model spans the prompts in order, as in one bench process (each
generation's cost curve starts from the calibration, where a process would carry its online scale over; the scale
does not change what is drafted).

The curve is a saved cost curve (``~/.cache/hasten/costs/KEY.json``), the same at every context, or curves measured
at several context lengths (``{"widths": [...], "by_context": {"50": [...], "600": [...]}}``), interpolated at
each step's context: a long prompt's passes cost more at every width, as they do for real.

    python scripts/policy_replay.py docs/results/kv-q8-f16/auto-gate/results.json --method pld \
        --curve docs/results/policy/epyc-by-context.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections import defaultdict
from pathlib import Path

from hasten.adaptive.chooser import AcceptanceModel, DraftPolicy
from hasten.adaptive.cost import CostModel
from hasten.proposers.auto import AutoProposer
from hasten.proposers.base import Proposer, StepOutcome
from hasten.proposers.prompt_lookup import PromptLookupProposer
from hasten.tree import ROOT, TokenTree


def accepted_path(tree: TokenTree, reference: list[int]) -> list[int]:
    """The nodes of the longest path below the root whose tokens equal ``reference``'s first tokens."""
    children, path, parent = tree.children(), [], ROOT
    for token in reference:
        child = next((c for c in children.get(parent, []) if tree.tokens[c] == token), None)
        if child is None:
            break
        path.append(child)
        parent = child
    return path


class ContextCost:
    """Pass time by width and context: cost curves measured at several context lengths, interpolated between
    them (and extrapolated linearly past the longest)."""

    def __init__(self, curve: dict) -> None:
        if "contexts" in curve:  # a saved grid (hasten's own curves): one row of times per context
            curve = {"widths": curve["widths"], "by_context": dict(zip(map(str, curve["contexts"]),
                                                                      curve.get("grid", curve["millis"]), strict=True))}
        by_context = curve.get("by_context") or {"0": curve["millis"]}
        self.contexts = sorted(int(c) for c in by_context)
        self.curves = [CostModel(curve["widths"], by_context[str(c)]) for c in self.contexts]

    def __call__(self, width: int, context: int) -> float:
        contexts, curves = self.contexts, self.curves
        if context <= contexts[0] or len(contexts) == 1:
            return curves[0](width)
        hi = next((i for i, c in enumerate(contexts) if c >= context), len(contexts) - 1)
        lo = hi - 1
        share = (context - contexts[lo]) / (contexts[hi] - contexts[lo])
        return curves[lo](width) + share * (curves[hi](width) - curves[lo](width))

    def curve_at(self, context: int = 200) -> CostModel:
        """The curve a calibration at ``context`` cached tokens would measure (hasten's is at 200)."""
        widths = self.curves[0].widths
        return CostModel(widths, [self(w, context) for w in widths])


def replay(proposer: Proposer, prompt: list[int], answer: list[int], cost: ContextCost, noise: float = 0.0,
           rng: random.Random | None = None) -> tuple[float, float, int]:
    """Milliseconds the answer takes after its first token, what ``ar`` would take, and the passes it takes.

    With ``noise`` each pass the proposer is told of takes ``1 + noise * |N(0, 1)|`` times its cost (real passes
    only ever run slower than a calibration's fastest round); the totals use the curve itself.
    """
    rng = rng or random.Random(0)
    proposer.start(prompt + answer[:1], None)
    done, millis, plain, passes = 1, 0.0, 0.0, 0
    while done < len(answer):
        context = prompt + answer[:done]
        began = time.perf_counter()
        tree = proposer.propose(context, len(answer) - done - 1).tree
        nodes = accepted_path(tree, answer[done:])
        width, step = 1 + len(tree), len(nodes) + 1
        pass_ms = cost(width, len(context))
        told = pass_ms * (1 + noise * abs(rng.gauss(0, 1)))
        outcome = StepOutcome([tree.tokens[i] for i in nodes], answer[done + len(nodes)], None, None, nodes,
                              width, told)
        proposer.update(outcome)
        millis += pass_ms + (time.perf_counter() - began) * 1000
        plain += sum(cost(1, len(context) + i) for i in range(step))
        done += step
        passes += 1
    return millis, plain, passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a bench results.json with ar records")
    parser.add_argument("--method", choices=("pld", "auto"), default="pld")
    parser.add_argument("--noise", type=float, default=0.1, help="spread of the pass times the proposer is told")
    parser.add_argument("--curve", required=True, help="a cost curve JSON (~/.cache/hasten/costs/KEY.json)")
    args = parser.parse_args()
    cost = ContextCost(json.loads(Path(args.curve).read_text()))
    records = [r for r in json.loads(Path(args.results).read_text())["records"]
               if r["method"] == "ar"]
    acceptance, gains, rng = AcceptanceModel(), {}, random.Random(0)
    by_category: dict[str, list[float]] = defaultdict(list)
    ratios, totals = [], [0.0, 0.0]
    for record in records:  # one generation per turn, each with a fresh proposer, as in the bench
        millis = plain = 0.0
        passes = 0
        for prompt, answer in zip(record["prompt_ids"], record["token_ids"], strict=True):
            if len(answer) < 2:
                continue
            policy = DraftPolicy(cost.curve_at(), acceptance, gains)
            if args.method == "pld":
                proposer: Proposer = PromptLookupProposer(8, 4, 1, 3, policy=policy)
            else:
                proposer = AutoProposer(policy, None, 8, None)
            turn_ms, turn_plain, turn_passes = replay(proposer, prompt, answer, cost, args.noise, rng)
            millis, plain, passes = millis + turn_ms, plain + turn_plain, passes + turn_passes
        if not millis:
            continue  # no turn had a second token to time
        ratio = plain / millis
        ratios.append(ratio)
        totals[0], totals[1] = totals[0] + plain, totals[1] + millis
        by_category[record["category"]].append(ratio)
        print(f"{record['category'][:8]:8} {record['question_id']:>3} decode x{ratio:.3f} passes {passes:3d} "
              f"tokens {record['new_tokens']}")
    print("median", round(statistics.median(ratios), 3), "min", round(min(ratios), 3),
          "all prompts", round(totals[0] / totals[1], 3))
    for category, values in by_category.items():
        print(f"  {category:14} {statistics.median(values):.3f}")


if __name__ == "__main__":
    main()
