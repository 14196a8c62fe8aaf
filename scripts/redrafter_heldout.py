"""Held-out top-1 agreement of ReDrafter heads on one data directory's held-out split (as the trainer splits it).

Each head is scored on the same held-out sequences (``hasten train redrafter``'s seeded split: ``--holdout`` and
``--seed`` as the run used), at response positions, against the target's top-K distribution restricted to that
head's own draft vocabulary, so heads trained on other data are compared on equal terms.

  python scripts/redrafter_heldout.py /tmp/rd/greedy512 hasten/artifacts/redrafter /tmp/rd/head
"""

from __future__ import annotations

import argparse
import json

from hasten.models import load_model
from hasten.redrafter.head import ReDrafterHead
from hasten.training.redrafter import Examples, TrainConfig, evaluate, split_sequences
from hasten.training.selfdistill import load_shards


def main() -> None:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="a `hasten train data` directory")
    parser.add_argument("heads", nargs="+", help="head folders")
    parser.add_argument("--holdout", type=float, default=defaults.holdout)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args()
    data = load_shards(args.data)
    _, held = split_sequences(data, args.holdout, args.seed)
    if held is None:
        raise SystemExit("the held-out split is empty")
    target = load_model(data.meta.get("model", "default"), backend="transformers").model
    for path in args.heads:
        head = ReDrafterHead.load(path).attach(target)
        examples = Examples(held, head.draft_ids, target.get_input_embeddings().weight.shape[0], head.config.horizon)
        print(json.dumps({"head": path, "held_out_sequences": held.num_sequences, **evaluate(head, examples)}))


if __name__ == "__main__":
    main()
