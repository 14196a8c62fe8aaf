"""``hasten export-draft``: the distilled draft as a standalone full-vocabulary model (transformers folder + GGUF)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hasten.errors import HastenError
from hasten.models import DEFAULT_MODEL


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-draft", help="write the distilled draft as a standalone model for other servers",
        description="Write the distilled draft in the target's full vocabulary: OUT as a transformers folder "
                    "(transformers' assisted generation, vLLM's draft-model speculation) and OUT/draft.gguf "
                    "(llama.cpp's --model-draft). Output rows outside the draft's vocabulary are zero.",
    )
    parser.add_argument("--draft", default=None, help="draft folder (default: the shipped draft)")
    parser.add_argument("--target", default=DEFAULT_MODEL, help="'default' or the target's .gguf file")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--gguf-weights", default="f16", choices=["f16", "q8_0", "f32"],
                        help="the GGUF's layer weights (the target's embedding and head rows keep their own type)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="the transformers folder's weights (float32: what hasten's draft computes)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from hasten.draft.model import SHIPPED_DRAFT
    from hasten.draft.standalone import DTYPES, export_standalone
    from hasten.models import load_tokenizer, resolve

    draft = Path(args.draft) if args.draft else SHIPPED_DRAFT
    if not draft.is_dir():
        raise HastenError(f"--draft {draft} is not a folder")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise HastenError(f"--out {out} exists and is not a folder")
    folder, gguf_file = resolve(args.target)
    if gguf_file is None:
        raise HastenError(f"--target {args.target}: export-draft needs the target as a .gguf file")
    print(f"exporting {draft} onto {folder / gguf_file} into {out}", file=sys.stderr)
    tokenizer = load_tokenizer(folder, gguf_file)
    try:
        hf, gguf = export_standalone(draft, folder / gguf_file, tokenizer, out, args.gguf_weights,
                                     DTYPES[args.dtype])
    except OSError as error:
        raise HastenError(f"could not write {out}: {error}") from error
    size = (hf / "model.safetensors").stat().st_size
    print(f"wrote {hf} (transformers, {size / 2**20:.0f} MB) and {gguf} (GGUF, "
          f"{gguf.stat().st_size / 2**20:.0f} MB)", file=sys.stderr)
    return 0
