"""``hasten train``: build self-distillation data and train drafters; each sub-command lives in its own module."""

from __future__ import annotations

import argparse
import importlib

# Each module has ``register(train_subparsers)`` adding one ``hasten train <name>`` sub-command.
TRAIN_COMMANDS = ["hasten.training.prompt_mix", "hasten.training.selfdistill", "hasten.training.draft",
                  "hasten.training.redrafter"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="build training data and train drafters")
    train_subparsers = parser.add_subparsers(dest="train_command", required=True)
    for name in TRAIN_COMMANDS:
        importlib.import_module(name).register(train_subparsers)
