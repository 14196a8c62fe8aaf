"""Greedy acceptance by depth of distilled drafts on the shipped bench prompts (teacher-forced chains).

The reference answers are the default model's own greedy answers (``ar``, hasten's API, its default backend:
llama.cpp), first turn of each prompt; the ``structured`` category is skipped unless ``--categories`` names it
(then it is answered as free text, without its ``response_format``). They are cached in ``--out`` and reused.

Each draft runs as hasten runs it on that backend (``load_draft_backend``: on llama.cpp its reduced GGUF export,
f16 layers, the target's quantized head rows and token embeddings) and its logits are mapped back to the full
vocabulary as ``ReducedVocabDraftProposer.vocab_logits`` does. A greedy draft whose guesses match sees exactly the
true prefix, so one pass over prompt + answer gives its top-1 at every answer position t; the chain from t is
accepted to depth d when the guesses at t..t+d-1 all match. Positions: t = 1 .. n-D (token 0 comes from the
prefill, never drafted; a chain of D must fit in the answer). ``--check N`` replays the first N prompts through
hasten's proposer (``draft_tree`` at every position, built as a greedy chain: no policy, one child per node and
one node per depth) and counts the positions whose accepted run agrees.

  python scripts/draft_acceptance.py --drafts hasten/artifacts/draft /tmp/draft-distill-snap \
      --out /tmp/draft-acc.json --plot /tmp/draft-acc.png
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import hasten
from hasten.api import prompt_ids
from hasten.backends.base import ModelBackend
from hasten.bench.prompts import read_prompts
from hasten.draft.backend import load_draft_backend
from hasten.proposers.reduced_draft import ReducedVocabDraftProposer
from hasten.sampling import SamplingParams

MODEL = "default"


def leading_run(matches: Sequence[bool], start: int, depth: int) -> int:
    """How many guesses from ``start`` on match, at most ``depth``."""
    return sum(1 for _ in itertools.takewhile(bool, matches[start : start + depth]))


def acceptance(rows: Sequence[Sequence[bool]], depth: int) -> dict[str, Any]:
    """P(the first d guesses match), d = 1..depth, over every position of ``rows`` where ``depth`` guesses fit;
    and the expected accepted tokens per step of a chain of k = 1..depth (the running sums)."""
    hits, positions = [0] * depth, 0
    for row in rows:
        for start in range(len(row) - depth + 1):
            positions += 1
            for d in range(leading_run(row, start, depth)):
                hits[d] += 1
    by_depth = [h / positions if positions else 0.0 for h in hits]
    return {"positions": positions, "acceptance": by_depth, "expected_accepted": list(itertools.accumulate(by_depth))}


def reference_answers(args: argparse.Namespace, loaded: Any, cached: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The target's greedy answers to the first turn of each chosen prompt (from ``cached`` where it has them)."""
    prompts = [p for p in read_prompts() if p.category in args.categories][: args.limit]
    answers = {}
    for prompt in tqdm(prompts, desc="reference answers (ar)"):
        key = str(prompt.question_id)
        if key not in cached or cached[key]["turn"] != prompt.turns[0]:
            result = hasten.generate(loaded, prompt.turns[0], "ar", max_new_tokens=args.max_new_tokens)
            ids = prompt_ids(loaded, prompt.turns[0])
            cached[key] = {"category": prompt.category, "turn": prompt.turns[0], "prompt_ids": ids,
                           "answer_ids": result.token_ids}
        answers[key] = cached[key]
    return answers


def full_vocab_top1(logits: torch.Tensor, vocab_ids: torch.Tensor, vocab_size: int) -> list[int]:
    """The argmax of each row over the full vocabulary, the reduced rows placed as ``vocab_logits`` places them."""
    full = torch.full((len(logits), vocab_size), float("-inf"), dtype=logits.dtype)
    full[:, vocab_ids] = logits
    return full.argmax(-1).tolist()


def teacher_forced_matches(draft: ModelBackend, vocab_ids: torch.Tensor, vocab_size: int, prompt: list[int],
                           answer: list[int]) -> list[bool]:
    """Whether the draft's top-1 equals the answer's token at positions 1..n-1 (one pass over prompt + answer)."""
    seq = draft.new_target()
    try:
        seq.start(prompt[:-1])
        feed = [prompt[-1], *answer[:-1]]
        logits = seq.score(feed, list(range(-1, len(feed) - 1))).logits
    finally:
        seq.close()  # type: ignore[attr-defined]
    top1 = full_vocab_top1(logits, vocab_ids, vocab_size)
    return [guess == token for guess, token in zip(top1[1:], answer[1:], strict=True)]


def proposer_runs(draft: ModelBackend, vocab_ids: torch.Tensor, vocab_size: int, prompt: list[int],
                  answer: list[int], depth: int) -> list[int]:
    """The accepted run at each position 1..n-depth when hasten's proposer drafts a chain of ``depth`` there."""
    proposer = ReducedVocabDraftProposer(draft, vocab_ids, vocab_size, SamplingParams(), num_tokens=depth)
    assert proposer.policy is None and proposer.sizes(greedy=True) == (1, 1)  # a greedy chain: its tree's only path
    proposer.start([*prompt, answer[0]], None)
    runs = []
    for t in range(1, len(answer) - depth + 1):
        paths, _ = proposer.draft_tree([*prompt, *answer[:t]], depth, greedy=True).paths()
        chain = paths[0] if paths else []
        runs.append(leading_run([a == b for a, b in zip(chain, answer[t:], strict=False)], 0, depth))
        proposer.rollback([])  # back to the true prefix; the next position feeds the true token
    return runs


def measure(directory: str, loaded: Any, answers: dict[str, dict[str, Any]], args: argparse.Namespace
            ) -> dict[str, Any]:
    draft, vocab_ids, config = load_draft_backend(loaded.backend, directory)
    vocab_size = loaded.backend.vocab_size
    rows: dict[str, list[bool]] = {}
    for key, item in tqdm(answers.items(), desc=f"draft {directory}"):
        rows[key] = teacher_forced_matches(draft, vocab_ids, vocab_size, item["prompt_ids"], item["answer_ids"])
    agree = checked = 0
    for key in list(answers)[: args.check]:
        item, row = answers[key], rows[key]
        runs = proposer_runs(draft, vocab_ids, vocab_size, item["prompt_ids"], item["answer_ids"], args.depth)
        forced = [leading_run(row, t, args.depth) for t in range(len(runs))]
        checked += len(runs)
        agree += sum(a == b for a, b in zip(runs, forced, strict=True))
    history = config.get("history") or [{}]
    result = {"dir": directory, "steps_done": config.get("steps_done"), "epochs_done": config.get("epochs_done"),
              "val_top1": history[-1].get("val_top1"), "val_step": history[-1].get("step"),
              "proposer_check": {"prompts": min(args.check, len(answers)), "positions": checked, "agree": agree},
              **acceptance(list(rows.values()), args.depth), "by_category": {}}
    for category in sorted({item["category"] for item in answers.values()}):
        result["by_category"][category] = acceptance(
            [rows[k] for k, item in answers.items() if item["category"] == category], args.depth)
    return result


def print_table(results: list[dict[str, Any]], depth: int) -> None:
    heads = "".join(f"   d{d}" for d in range(1, depth + 1)) + f"  E[acc|k={depth}]"
    for result in results:
        check = result["proposer_check"]
        print(f"\n{result['dir']} (steps {result['steps_done']}, val top-1 {result['val_top1']}, "
              f"proposer check {check['agree']}/{check['positions']} positions agree)")
        print(f"{'':16s}{'pos':>6s}{heads}")
        for name, part in [("all", result), *result["by_category"].items()]:
            cells = "".join(f"{a:6.3f}" for a in part["acceptance"])
            print(f"{name:16s}{part['positions']:6d}{cells}{part['expected_accepted'][-1]:10.3f}")


def plot(results: list[dict[str, Any]], depth: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.2 + 2.2 * len(results), 4))
    width = 0.8 / depth
    for d in range(depth):
        xs = [i + (d - (depth - 1) / 2) * width for i in range(len(results))]
        ax.bar(xs, [r["acceptance"][d] for r in results], width, label=f"depth {d + 1}")
    def label(r: dict[str, Any]) -> str:
        done = f"step {r['steps_done']}" if r["steps_done"] is not None else f"{r['epochs_done']} epochs"
        return f"{Path(r['dir']).name}\n{done}"

    ax.set_xticks(range(len(results)), [label(r) for r in results])
    ax.set_ylabel("P(first d draft tokens accepted)")
    ax.set_title("Greedy acceptance by depth, shipped bench prompts (teacher-forced)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafts", nargs="+", required=True, help="draft folders (shipped format or checkpoint)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--limit", type=int, default=None, help="first N chosen prompts")
    parser.add_argument("--categories", nargs="+", default=None, help="default: every category but structured")
    parser.add_argument("--check", type=int, default=2, help="prompts replayed through hasten's proposer")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: hasten's)")
    parser.add_argument("--out", default="draft-acceptance.json")
    parser.add_argument("--plot", default=None, help="PNG bar chart")
    args = parser.parse_args()
    all_categories = sorted({p.category for p in read_prompts()})
    args.categories = args.categories or [c for c in all_categories if c != "structured"]
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    settings = {"model": MODEL, "method": "ar", "max_new_tokens": args.max_new_tokens}
    cached = previous.get("answers", {}) if previous.get("settings") == settings else {}
    loaded = hasten.load_model(MODEL, threads=args.threads)
    answers = reference_answers(args, loaded, cached)
    results = [measure(directory, loaded, answers, args) for directory in args.drafts]
    out.write_text(json.dumps({"settings": settings, "backend": loaded.backend.backend, "depth": args.depth,
                               "categories": args.categories, "results": results, "answers": cached}, indent=1))
    print_table(results, args.depth)
    if args.plot:
        plot(results, args.depth, args.plot)


if __name__ == "__main__":
    main()
