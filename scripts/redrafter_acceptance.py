"""Beam acceptance of ReDrafter heads on the shipped bench prompts: drafted tokens accepted per target pass.

Each head runs as ``--method redrafter`` with fixed beams (``adaptive=False``: every step sends the same beam
tree, so heads are compared on equal terms) on the default model through transformers (hidden states come with
every pass there), greedy, first turn of each prompt (the ``structured`` category is skipped). Every output is
checked against ``ar``'s. The numbers are acceptance, not speed.

  python scripts/redrafter_acceptance.py --heads hasten/artifacts/redrafter /tmp/rd/head \
      --out docs/results/redrafter/acceptance.json --plot docs/redrafter-acceptance.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

import hasten
from hasten.bench.prompts import balanced_subset, read_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", nargs="+", help="head folders (head.safetensors + config.json)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="no run: join earlier result files into --out (and --plot)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--beam-width", type=int, default=2)
    parser.add_argument("--beam-length", type=int, default=5)
    parser.add_argument("--limit", type=int, default=None, help="N prompts, spread over the categories")
    parser.add_argument("--out", required=True, help="JSON results")
    parser.add_argument("--plot", default=None, help="PNG: accepted tokens per pass by category, one bar per head")
    args = parser.parse_args()
    if args.merge:
        merged(args.merge, args.out, args.plot)
        return
    if not args.heads:
        parser.error("--heads or --merge is required")

    loaded = hasten.load_model("default", backend="transformers", device="cpu")
    prompts = balanced_subset([p for p in read_prompts() if p.category != "structured"], args.limit)
    results: dict[str, dict] = {}
    references = [hasten.generate(loaded, p.turns[0], "ar", max_new_tokens=args.max_new_tokens).token_ids
                  for p in tqdm(prompts, desc="ar", unit="prompt")]
    for head in args.heads:
        by_category: dict[str, list[float]] = defaultdict(list)
        drafted = accepted = passes = tokens = 0
        for prompt, want in zip(tqdm(prompts, desc=Path(head).name, unit="prompt"), references, strict=True):
            got = hasten.generate(loaded, prompt.turns[0], "redrafter", max_new_tokens=args.max_new_tokens,
                                  head=head, adaptive=False, beam_width=args.beam_width,
                                  beam_length=args.beam_length)
            if got.token_ids != want:
                raise SystemExit(f"{head}: prompt {prompt.question_id} differs from ar")
            steps = max(got.target_passes - 1, 1)  # the prefill drafts nothing
            by_category[prompt.category].append(got.accepted_drafts / steps)
            drafted, accepted = drafted + got.drafted_tokens, accepted + got.accepted_drafts
            passes, tokens = passes + steps, tokens + len(got.token_ids)
        results[head] = {
            "accepted_per_pass": accepted / passes, "tokens_per_pass": (tokens - len(prompts)) / passes,
            "drafted_per_pass": drafted / passes, "prompts": len(prompts),
            "categories": {c: statistics.mean(v) for c, v in by_category.items()},
        }
        print(head, json.dumps(results[head]))
    setup = {"model": "default", "backend": "transformers (fp32, CPU)", "max_new_tokens": args.max_new_tokens,
             "beam_width": args.beam_width, "beam_length": args.beam_length, "adaptive": False}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"setup": setup, "heads": results}, indent=1) + "\n")
    if args.plot:
        plot(results, args.plot, args.beam_width, args.beam_length)


def plot(results: dict[str, dict], path: str, beam_width: int, beam_length: int) -> None:
    """Accepted drafted tokens per pass by category, one bar per head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = sorted({c for r in results.values() for c in r["categories"]})
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(results)
    for i, (head, result) in enumerate(results.items()):
        xs = [j + i * width for j in range(len(categories) + 1)]
        ys = [result["categories"].get(c, 0.0) for c in categories] + [result["accepted_per_pass"]]
        ax.bar(xs, ys, width, label=Path(head).name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(categories) + 1)], [*categories, "all"], rotation=20)
    ax.set_ylabel("drafted tokens accepted per pass")
    ax.set_title(f"ReDrafter beam acceptance ({beam_width} beams x {beam_length - 1} tokens, greedy)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def merged(paths: list[str], out: str, plot_path: str | None) -> None:
    """Join result files of earlier runs (same setup) into one, and plot it."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    if any(run["setup"] != runs[0]["setup"] for run in runs):
        raise SystemExit("the result files were measured with different setups")
    results = {head: result for run in runs for head, result in run["heads"].items()}
    Path(out).write_text(json.dumps({"setup": runs[0]["setup"], "heads": results}, indent=1) + "\n")
    if plot_path:
        plot(results, plot_path, runs[0]["setup"]["beam_width"], runs[0]["setup"]["beam_length"])

if __name__ == "__main__":
    main()
