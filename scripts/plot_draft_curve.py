"""Plot a draft training run's validation top-1 agreement (and loss) against steps, from its ``config.json``.

Usage: python scripts/plot_draft_curve.py CHECKPOINT_DIR OUT.png [--baseline 0.4766 --baseline-label "shipped"]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a draft checkpoint directory (its config.json holds the history)")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--baseline", type=float, default=None, help="a horizontal reference line (agreement)")
    parser.add_argument("--baseline-label", default="before")
    args = parser.parse_args()
    config = json.loads((Path(args.run) / "config.json").read_text())
    history = [h for h in config["history"] if "step" in h]
    steps = [h["step"] for h in history]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(steps, [h["val_top1"] for h in history], marker="o", label="validation top-1 agreement")
    if args.baseline is not None:
        top.axhline(args.baseline, color="grey", linestyle="--", label=args.baseline_label)
    top.set_ylabel("top-1 agreement\n(held-out prompts)")
    top.grid(alpha=0.3)
    top.legend(loc="lower right")
    bottom.plot(steps, [h["val_loss"] for h in history], marker="o", label="validation loss")
    trained = [h for h in history if "train_loss" in h]
    bottom.plot([h["step"] for h in trained], [h["train_loss"] for h in trained], marker=".", label="train loss")
    bottom.set_xlabel(f"step ({config['train']['batch_tokens']} padded tokens a batch)")
    bottom.set_ylabel("cross-entropy")
    bottom.grid(alpha=0.3)
    bottom.legend(loc="upper right")
    fig.suptitle(f"draft: {config['num_layers']} layers, {config['draft_vocab']} tokens")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)


if __name__ == "__main__":
    main()
