"""The ``hasten`` command line: sub-commands, one-line errors, no tracebacks for bad input."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from hasten.errors import HastenError

COMMANDS = ["hasten.commands.generate", "hasten.commands.train", "hasten.commands.serve",
            "hasten.commands.bench", "hasten.commands.export"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hasten", description="Lossless speculative decoding for LLMs.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        import torch

        torch.set_num_threads(int(os.environ.get("HASTEN_THREADS", min(os.cpu_count() or 1, 8))))
        return args.run(args)
    except HastenError as error:
        print(f"hasten: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
