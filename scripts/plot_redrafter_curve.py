"""Plot a ReDrafter head's training: the training loss (smoothed) and the held-out top-1 agreement per drafted token.

Usage: python scripts/plot_redrafter_curve.py HEAD_DIR OUT.png [--baseline hasten/artifacts/redrafter/report.json]
HEAD_DIR is ``hasten train redrafter --out``: its ``report.json`` holds the held-out curve, ``trainer_state.pt`` the
loss of every step. A baseline report's final held-out top-1 is drawn as dashed lines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def smoothed(values: list[float], window: int = 50) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("head", help="a head folder written by `hasten train redrafter`")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--baseline", default=None, help="another head's report.json, for reference lines")
    args = parser.parse_args()
    report = json.loads((Path(args.head) / "report.json").read_text())
    history = torch.load(Path(args.head) / "trainer_state.pt", weights_only=True)["history"]
    curve = report.get("curve", [])
    before = json.loads(Path(args.baseline).read_text())["heldout"]["top1"] if args.baseline else []
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    if curve:
        steps = [point["step"] for point in curve]
        for depth in range(len(curve[0]["top1"])):
            line = top.plot(steps, [point["top1"][depth] for point in curve], marker="o", markersize=3,
                            label=f"drafted token {depth + 1}")
            if depth < len(before):
                top.axhline(before[depth], linestyle="--", color=line[0].get_color(), linewidth=0.8)
    top.set_ylabel("held-out top-1 agreement")
    top.set_title("ReDrafter head" + (" (dashed: baseline head)" if args.baseline else ""))
    top.legend(fontsize=8)
    bottom.plot(range(1, len(history) + 1), smoothed(history), label="training loss (50-step mean)")
    if curve:
        bottom.plot(steps, [point["loss"] for point in curve], marker="o", markersize=3, label="held-out loss")
    bottom.set_xlabel("step")
    bottom.set_ylabel("soft cross-entropy, summed over drafted tokens")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
