"""``hasten generate``: one prompt, streamed to standard output, statistics to standard error."""

from __future__ import annotations

import argparse
import json
import sys

from hasten.api import stream
from hasten.commands.common import add_model_options, add_sampling_options, method_options
from hasten.errors import HastenError
from hasten.models import load_model
from hasten.sampling import SamplingParams


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="generate text for one prompt")
    parser.add_argument("prompt", help="the prompt (a user message, unless --no-chat)")
    add_model_options(parser)
    add_sampling_options(parser)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise HastenError("the prompt is empty")
    if args.max_new_tokens < 1:
        raise HastenError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)  # validate before the slow load
    if args.threads is not None and args.threads < 1:
        raise HastenError(f"--threads must be >= 1, got {args.threads}")
    loaded = load_model(args.model, args.backend, threads=args.threads)
    events = stream(
        loaded, args.prompt, args.method,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, stop=args.stop, chat=not args.no_chat,
        **method_options(args, loaded),
    )
    result = None
    for event in events:
        if not args.json:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        result = event.result or result
    assert result is not None
    if args.json:
        keys = ("text", "token_ids", "method", "target_passes", "mean_accepted", "tokens_per_s",
                "prompt_tokens", "finish_reason", "wall_s", "method_stats")
        print(json.dumps({key: result.to_dict()[key] for key in keys}))
    else:
        sys.stdout.write("\n")
        print(
            f"[{result.method}] {len(result.token_ids)} tokens in {result.wall_s:.2f} s = "
            f"{result.tokens_per_s:.1f} tokens/s; {result.target_passes} target passes, "
            f"{result.mean_accepted:.2f} tokens per pass"
            + "".join(f"; {key} {value:.2f}" for key, value in result.method_stats.items()),
            file=sys.stderr,
        )
    return 0
