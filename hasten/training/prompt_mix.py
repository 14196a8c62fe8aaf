"""``hasten train prompts``: distillation prompts for every bench category, built from text at hand.

The bench has eight categories (translation, summarization, RAG, structured output, chat, QA, code, math); the
shared prompt files cover only chat, QA, code and math, and the drafters trained on them agree with the target
far less on the other four (review 2026-12-07, third part, F2). This builds prompts for all eight from the shared
files (``../shared/data/*.jsonl``) and from documentation installed with packages (``text_sources``), in hasten's own
wording (``prompt_templates``), never from hasten's bench prompts: a prompt sharing six words in a row with a bench
prompt is dropped.

Output (``--out``): ``train.jsonl`` and ``heldout.jsonl`` in the shared format (``id``, ``category``, ``prompt``, plus
``kind`` and ``source``) and ``summary.json`` (counts). The split is by source document (a seeded hash of its name,
so adding documents moves no other prompt); a shared file's prompts are never held out (the shipped drafters were
trained on all of them), and are left out where a prompt made from the same row is held out. Seeded and
deterministic: the same files and seed give the same output.

  hasten train prompts --out out/prompt-mix
  hasten train data --prompts out/prompt-mix/train.jsonl --max-prompt-chars 1500 --batch-size 16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sysconfig
from collections import Counter
from pathlib import Path
from typing import Any

from hasten.errors import HastenError
from hasten.training import prompt_templates as templates
from hasten.training.prompt_templates import Built
from hasten.training.selfdistill import SHARED_PROMPTS
from hasten.training.text_sources import TextAtHand, harvest

CATEGORIES = ("translation", "summarization", "rag", "structured", "chat", "qa", "code", "math")
BENCH_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "bench_prompts.jsonl"
NGRAM = 6  # words in a row that a built prompt may not share with a bench prompt
DEFAULT_OUT = "out/prompt-mix"


def default_roots() -> list[str]:
    """Where installed documentation lives: the Python packages, then the system's docs and message catalogs."""
    paths = sysconfig.get_paths()
    return sorted({paths["purelib"], paths["platlib"]}) + ["/usr/share/doc", "/usr/share/locale"]


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    """The runs of ``n`` words of ``text`` (lower-cased letters and digits)."""
    tokens = re.findall(r"[a-z0-9]+", text.lower())
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def bench_ngrams(path: str | Path = BENCH_PROMPTS) -> set[tuple[str, ...]]:
    """Every run of ``NGRAM`` words in every turn of the bench prompts."""
    found: set[tuple[str, ...]] = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            for turn in json.loads(line)["turns"]:
                found |= ngrams(turn)
    return found


def read_shared(paths: list[str | Path]) -> dict[str, list[dict[str, Any]]]:
    """The rows of each shared prompt file, by file stem (``alpacaeval_dev``, ``gsm8k_dev``, ``mbpp``)."""
    shared: dict[str, list[dict[str, Any]]] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise HastenError(f"prompt file {path} not found")
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                    rows.append({**row, "id": str(row.get("id", f"{path.stem}/{number}")), "prompt": row["prompt"]})
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise HastenError(f"{path}:{number}: expected a JSON object with a 'prompt' field") from error
        shared[path.stem] = rows
    return shared


def candidates(text: TextAtHand, shared: dict[str, list[dict[str, Any]]], seed: int) -> list[Built]:
    """Every prompt the builders make, in a fixed order (each builder has its own seeded generator)."""
    def rng(name: str) -> random.Random:
        return random.Random(f"{seed}:{name}")

    return [*templates.translation(text, rng("translation")), *templates.summarization(text, rng("summarization")),
            *templates.rag(text, rng("rag")), *templates.structured(text, shared, rng("structured")),
            *templates.chat(text, shared, rng("chat")), *templates.qa(text, shared, rng("qa")),
            *templates.code(text, shared, rng("code")), *templates.math(shared, rng("math"))]


def is_held_out(source: str, fraction: float, seed: int) -> bool:
    """Whether the source document ``source`` is held out: a seeded hash of its name."""
    digest = hashlib.sha256(f"{seed}:{source}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def select(items: list[Built], per_category: int, per_source: int, seed: int) -> list[Built]:
    """Up to ``per_category`` prompts of each category: its kinds in turn (each shuffled, seeded), at most
    ``per_source`` from one source document, no prompt twice."""
    chosen: list[Built] = []
    for category in CATEGORIES:
        kinds: dict[str, list[Built]] = {}
        for item in items:
            if item.category == category:
                kinds.setdefault(item.kind, []).append(item)
        rng = random.Random(f"{seed}:select:{category}")
        queues = [rng.sample(group, len(group)) for _, group in sorted(kinds.items())]
        per_doc: Counter[str] = Counter()
        seen: set[str] = set()
        taken = 0
        while taken < per_category and any(queues):
            for queue in queues:
                while queue:
                    item = queue.pop()
                    if item.prompt not in seen and per_doc[item.source] < per_source:
                        seen.add(item.prompt)
                        per_doc[item.source] += 1
                        chosen.append(item)
                        taken += 1
                        break
                if taken >= per_category:
                    break
    return chosen


def build_mix(text: TextAtHand, shared: dict[str, list[dict[str, Any]]], per_category: int = 400,
              held_out: float = 0.15, seed: int = 0, max_chars: int = 1500, per_source: int = 3,
              bench: str | Path = BENCH_PROMPTS) -> tuple[list[dict[str, str]], list[dict[str, str]], dict[str, Any]]:
    """(train rows, held-out rows, summary) of the prompt mix."""
    if per_category < 1 or per_source < 1 or not 0 <= held_out < 1:
        raise HastenError("--per-category and --per-source must be >= 1 and --held-out in [0, 1)")
    forbidden = bench_ngrams(bench)
    made = candidates(text, shared, seed)
    fitting = [item for item in made if len(item.prompt) <= max_chars]
    clean = [item for item in fitting if not ngrams(item.prompt) & forbidden]
    chosen = select(clean, per_category, per_source, seed)
    # A held-out document with a prompt of its own: its shared prompts (GSM8K's problem beside a prompt made from its
    # worked solution) leave train too, so that no source feeds both sides; they are never held out (trained on).
    held_sources = {item.source for item in chosen if not item.shared and is_held_out(item.source, held_out, seed)}
    rows: dict[bool, list[dict[str, str]]] = {False: [], True: []}
    counts: Counter[tuple[str, str, str]] = Counter()
    for index, item in enumerate(chosen):
        held = item.source in held_sources
        if held and item.shared:
            counts[(item.category, item.kind, "left out")] += 1
            continue
        rows[held].append({"id": f"mix/{item.category}/{index:05d}", "category": item.category,
                           "prompt": item.prompt, "kind": item.kind, "source": item.source})
        counts[(item.category, item.kind, "heldout" if held else "train")] += 1
    summary = {"seed": seed, "per_category": per_category, "held_out": held_out, "max_chars": max_chars,
               "text_at_hand": text.counts(), "candidates": len(made), "too_long": len(made) - len(fitting),
               "sharing_text_with_bench": len(fitting) - len(clean),
               "train": len(rows[False]), "heldout": len(rows[True]),
               "by_category": {c: {f"{k}/{split}": n for (cat, k, split), n in sorted(counts.items()) if cat == c}
                               for c in CATEGORIES}}
    return rows[False], rows[True], summary


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def register(train_subparsers: argparse._SubParsersAction) -> None:
    parser = train_subparsers.add_parser("prompts", help="build distillation prompts for every bench category")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for train.jsonl, heldout.jsonl, summary.json")
    parser.add_argument("--docs", nargs="+", default=None,
                        help="folders of installed documentation (default: site-packages, /usr/share/doc, "
                             "/usr/share/locale)")
    parser.add_argument("--shared", nargs="+", default=None,
                        help="shared prompt files (default: ../shared/data beside the checkout)")
    parser.add_argument("--per-category", type=int, default=400, help="prompts of each category")
    parser.add_argument("--per-source", type=int, default=3, help="prompts of a category from one document")
    parser.add_argument("--held-out", type=float, default=0.15, help="share of source documents held out")
    parser.add_argument("--max-chars", type=int, default=1500, help="longest prompt kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    shared = read_shared(args.shared or [p for p in SHARED_PROMPTS if Path(p).is_file()])
    text = harvest(args.docs or default_roots(), seed=args.seed)
    train, held, summary = build_mix(text, shared, args.per_category, args.held_out, args.seed, args.max_chars,
                                     args.per_source)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "heldout.jsonl", held)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {len(train)} train and {len(held)} held-out prompts to {out}")
    return 0
