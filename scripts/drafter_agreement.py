"""Bench-like held-out agreement of the shipped draft and ReDrafter head, by category (``hasten.training.agreement``).

A seeded sample of ``hasten train prompts``' held-out split (``--per-category`` of each category) is answered
greedily by the default model on llama.cpp (hasten's ``ar``, ``--batch`` prompts decoded together, cached in
``--answers``), then the shipped draft and head are teacher-forced over prompt + answer through transformers.
``--bench`` measures the same on the first turns of hasten's own bench prompts, for comparison only.
``--write-config`` (with ``--reuse``: from an earlier run's ``--out``) stores the draft's figures in the shipped
draft's ``config.json`` (``held_out_top1``, ``held_out_top1_by_category``; the weights are not touched), which
``hasten.draft.model.bench_like_agreement`` reads.

  hasten train prompts --out out/prompt-mix
  nice -n 19 python scripts/drafter_agreement.py --prompts out/prompt-mix/heldout.jsonl \
      --out docs/results/drafter-agreement/agreement.json --write-config
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import hasten
from hasten.draft.model import CONFIG, HELD_OUT_TOP1, SHIPPED_DRAFT, load_draft_dir
from hasten.proposers.redrafter import SHIPPED_HEAD
from hasten.redrafter.head import ReDrafterHead
from hasten.training.agreement import greedy_answers, measure, sample_by_category

BENCH = Path(hasten.__file__).resolve().parent / "data" / "bench_prompts.jsonl"


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def bench_rows() -> list[dict[str, Any]]:
    return [{"id": f"bench/{r['question_id']}", "category": r["category"], "prompt": r["turns"][0]}
            for r in read_rows(BENCH)]


def answered(loaded: Any, rows: list[dict[str, Any]], cache: dict[str, Any], args: argparse.Namespace
             ) -> list[dict[str, Any]]:
    """``rows`` with their greedy ``answer_ids`` (from ``cache`` where it has them for the same prompt)."""
    missing = [r for r in rows if cache.get(r["id"], {}).get("prompt") != r["prompt"]]
    began = time.perf_counter()
    for start in range(0, len(missing), args.batch):
        if time.perf_counter() - began > args.budget_s:
            print(f"time budget reached: {len(missing) - start} prompts left unanswered")
            break
        chunk = missing[start : start + args.batch]
        answers = greedy_answers(loaded, [r["prompt"] for r in chunk], args.max_new_tokens, args.batch,
                                 progress=False)
        for row, answer in zip(chunk, answers, strict=True):
            cache[row["id"]] = {"prompt": row["prompt"], "category": row["category"], "answer_ids": answer}
        print(f"answered {start + len(chunk)}/{len(missing)} in {time.perf_counter() - began:.0f} s", flush=True)
    return [{**r, "answer_ids": cache[r["id"]]["answer_ids"]} for r in rows if r["id"] in cache]


def table(title: str, report: dict[str, Any]) -> None:
    print(f"\n{title}\n{'category':14s} {'answer tok':>10s} {'draft':>6s} {'d-oov':>6s} {'head d1..d4':>28s} "
          f"{'h-oov':>6s}")
    for name, part in sorted(report.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        draft, head = part.get("draft", {}), part.get("head", {})
        heads = " ".join(f"{v:.3f}" for v in head.get("top1", []))
        print(f"{name:14s} {draft.get('positions', [0])[0]:10d} {draft.get('top1', [0])[0]:6.3f} "
              f"{draft.get('outside_vocab') or 0:6.3f} {heads:>28s} {head.get('outside_vocab') or 0:6.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default=None, help="held-out prompts (JSONL: id, category, prompt)")
    parser.add_argument("--per-category", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8, help="prompts decoded together on llama.cpp")
    parser.add_argument("--budget-s", type=float, default=600, help="stop starting new answer batches after this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads (1: on a shared 2-core machine two spinning threads cost 5x the CPU time)")
    parser.add_argument("--bench", action="store_true", help="also measure on hasten's bench prompts (first turns)")
    parser.add_argument("--answers", default=None, help="answer cache (default: beside --out)")
    parser.add_argument("--out", required=True, help="JSON results")
    parser.add_argument("--draft", default=str(SHIPPED_DRAFT), help="the draft folder measured (default: the shipped)")
    parser.add_argument("--head", default=str(SHIPPED_HEAD), help="the ReDrafter head folder (default: the shipped)")
    parser.add_argument("--write-config", action="store_true", help="store the draft's figures in its config.json")
    parser.add_argument("--reuse", action="store_true", help="measure nothing: take the figures from --out")
    args = parser.parse_args()
    out = Path(args.out)
    if args.reuse:
        if not out.is_file():
            raise SystemExit(f"--reuse: {out} does not exist yet")
        results = {k: v for k, v in json.loads(out.read_text()).items() if k not in ("settings", "validation")}
    elif args.prompts is None:
        parser.error("--prompts is required unless --reuse is given")
    else:
        results = run(args, out)
    if args.write_config:
        store(results["held_out"], Path(args.draft) / CONFIG)


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Answer the sample (and the bench's first turns with ``--bench``), measure, write ``out``; the reports."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cache_path = Path(args.answers) if args.answers else out.with_name("answers.json")
    settings = {"model": "default", "backend": "llamacpp", "method": "ar", "max_new_tokens": args.max_new_tokens}
    saved = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    cache = saved.get("answers", {}) if saved.get("settings") == settings else {}
    sample = sample_by_category(read_rows(Path(args.prompts)), args.per_category, args.seed)
    sets = {"held_out": sample, **({"bench": bench_rows()} if args.bench else {})}
    loaded = hasten.load_model("default", backend="llamacpp", threads=args.threads)
    items = {name: answered(loaded, rows, cache, args) for name, rows in sets.items()}
    cache_path.write_text(json.dumps({"settings": settings, "answers": cache}) + "\n")
    del loaded
    torch.set_num_threads(args.threads)
    target = hasten.load_model("default", backend="transformers")
    draft, vocab_ids, config = load_draft_dir(target.model, Path(args.draft))
    head = ReDrafterHead.load(Path(args.head)).attach(target.model).float().eval()
    results = {name: measure(target, rows, draft, vocab_ids, head) for name, rows in items.items()}
    history = config.get("history") or [{}]
    head_report = json.loads((Path(args.head) / "report.json").read_text()).get("heldout", {})
    document = {"settings": {**settings, "draft": args.draft, "head": args.head, "prompts": args.prompts,
                             "per_category": args.per_category,
                             "seed": args.seed, "answered": {k: len(v) for k, v in items.items()}},
                "validation": {"draft_val_top1": history[-1].get("val_top1"), "head_heldout_top1": head_report.get(
                    "top1")}, **results}
    out.write_text(json.dumps(document, indent=1) + "\n")
    for name, report in results.items():
        table(f"{name} (draft val_top1 {history[-1].get('val_top1')}, head held-out {head_report.get('top1')})",
              report)
    return results


def store(held: dict[str, Any], path: Path) -> None:
    """The draft's held-out agreement, overall and by category, into its ``config.json`` (nothing else changes)."""
    stored = json.loads(path.read_text())
    stored[HELD_OUT_TOP1] = held["all"]["draft"]["top1"][0]
    stored["held_out_top1_by_category"] = {c: r["draft"]["top1"][0] for c, r in sorted(held.items()) if c != "all"}
    stored["held_out_source"] = (f"docs/results/drafter-agreement: {held['all']['draft']['positions'][0]} greedy "
                                 "answer tokens (llama.cpp ar, 96 new tokens) to a sample of `hasten train prompts`' "
                                 "held-out split, teacher-forced")
    path.write_text(json.dumps(stored, indent=1) + "\n")
    print(f"wrote {HELD_OUT_TOP1} = {stored[HELD_OUT_TOP1]} into {path}")

if __name__ == "__main__":
    main()
