"""The calibrated cost curve against measured verification passes: widths 1-16 at several cache lengths.

Calibrates the model's curve afresh (``hasten.adaptive.cost.measure``, timed), then times verification passes as
the engine runs them, every row's logits read: a chain and a bushy tree of each width (the fastest of
``--rounds``, going round the widths), after each of ``--contexts`` cached tokens, some between the calibrated
ones. Prints and writes (``--out``) calibrated against measured milliseconds: their ratio, and the ratio of
shapes (each relative to its own one-token pass: what the online scale cannot correct), and how much of the
CPUs other processes took meanwhile. Run it on an idle machine, alone:

    flock /tmp/hasten-timing.lock python scripts/cost_check.py --model default --backend llamacpp --threads 2 \
        --out docs/results/cost/default-llamacpp
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from hasten.adaptive.cost import CostModel, bushy, chain, clock_for, cpu_name, extend, fastest, measure
from hasten.backends.base import Target
from hasten.bench.load import OthersClock, others_share
from hasten.models import load_model


def measured_passes(target: Target, contexts: list[int], widths: list[int], rounds: int, clock: Any
                    ) -> dict[int, dict[int, dict[str, float]]]:
    """By context and width, the fastest chain and (from 3 tokens) bushy tree verification pass, in ms (the
    rounds going round the shapes, and the contexts cut down from the longest, as the calibration's)."""
    filler = [(7 * i + 3) % target.vocab_size for i in range(contexts[-1])]
    target.start(filler[: contexts[0]])
    extend(target, filler, contexts[-1])
    out: dict[int, dict[int, dict[str, float]]] = {}
    for context in reversed(contexts):
        target.truncate(context)
        fastest(target, {"warm-up": chain(1)}, 1, clock)
        shapes = {**{("chain", w): chain(w) for w in widths}, **{("tree", w): bushy(w) for w in widths if w > 2}}
        out[context] = {w: {} for w in widths}
        for (shape, width), millis in fastest(target, shapes, rounds, clock).items():
            out[context][width][shape] = millis
    return dict(sorted(out.items()))


def compare(curve: CostModel, passes: dict[int, dict[int, dict[str, float]]]) -> list[dict[str, Any]]:
    """One row per context and width: calibrated ms, measured chain and tree ms, calibrated over the dearer, and
    the same relative to each one's own one-token pass (``shape``)."""
    rows = []
    for context, by_width in passes.items():
        one = max(by_width[min(by_width)].values())
        for width, times in by_width.items():
            dearer, calibrated = max(times.values()), curve(width, context)
            rows.append({"context": context, "width": width, "calibrated": calibrated, "chain": times["chain"],
                         "tree": times.get("tree"), "ratio": calibrated / dearer,
                         "shape": (calibrated / curve(min(by_width), context)) / (dearer / one)})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| context | width | calibrated ms | chain ms | tree ms | calibrated / dearer | shape ratio |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        tree = f"{row['tree']:.2f}" if row["tree"] is not None else "-"
        lines.append(f"| {row['context']} | {row['width']} | {row['calibrated']:.2f} | {row['chain']:.2f} | {tree} | "
                     f"{row['ratio']:.3f} | {row['shape']:.3f} |")
    return "\n".join(lines)


def parse_widths(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(w) for w in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--widths", default="1-16", help="widths to check: 1-16 or 1,2,4")
    parser.add_argument("--contexts", default="64,256,512,768,1024,1536",
                        help="cache lengths to check (clamped to the model's context)")
    parser.add_argument("--rounds", type=int, default=5, help="passes per measurement; the fastest counts")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and report.md")
    args = parser.parse_args()

    loaded = load_model(args.model, args.backend, threads=args.threads)
    backend = loaded.backend
    clock = clock_for(getattr(backend, "device", "cpu"))
    widths = parse_widths(args.widths)
    others, load_before, wall_before = OthersClock(), os.getloadavg(), time.perf_counter()
    others.start()
    target = backend.new_target()
    began = time.perf_counter()
    curve = measure(target, clock=clock)
    calibration_s = time.perf_counter() - began
    room = target.max_context - max(widths) - 2
    contexts = sorted({min(int(c), room) for c in args.contexts.split(",")})
    passes = measured_passes(target, contexts, widths, args.rounds, clock)
    rows = compare(curve, passes)
    others_cpu_share = others_share(others.stop(), time.perf_counter() - wall_before) or 0.0
    ratios = [row["ratio"] for row in rows]
    threads = getattr(backend, "threads", None) or torch.get_num_threads()
    summary = {"model": loaded.name, "backend": backend.backend, "threads": threads, "cpu": cpu_name(),
               "load_average_before": load_before, "load_average_after": os.getloadavg(),
               "others_cpu_share": others_cpu_share, "calibration_s": calibration_s,
               "calibrated_contexts": curve.contexts,
               "within_10_percent": sum(abs(r - 1) <= 0.10 for r in ratios) / len(ratios),
               "ratio_min": min(ratios), "ratio_max": max(ratios),
               "shape_within_10_percent": sum(abs(row["shape"] - 1) <= 0.10 for row in rows) / len(rows)}
    title = f"{loaded.name} on {backend.backend}, {summary['threads']} threads, {summary['cpu']}"
    text = (f"# Cost curve check: {title}\n\n"
            f"Calibration: {calibration_s:.1f} s at {curve.contexts} cached tokens. Calibrated over measured (the "
            f"dearer of chain and tree, every row read, fastest of {args.rounds}): {min(ratios):.3f} to "
            f"{max(ratios):.3f}, {100 * summary['within_10_percent']:.0f}% of cells within 10%; relative to one token, "
            f"{100 * summary['shape_within_10_percent']:.0f}%. Other processes "
            f"took {100 * others_cpu_share:.1f}% of the CPUs meanwhile.\n\n{table(rows)}\n")
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(
            {**summary, "curve": curve.to_json(), "rows": rows}, indent=1))
        (args.out / "report.md").write_text(text)


if __name__ == "__main__":
    main()
