"""``hasten generate``: one prompt, streamed to standard output, statistics to standard error."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hasten.api import GenerationResult, generate_batch, stream
from hasten.commands.common import (
    add_model_options,
    add_sampling_options,
    add_shaping_options,
    check_chat,
    load_options,
    method_options,
    read_text_file,
    shaping_options,
)
from hasten.errors import HastenError
from hasten.models import load_model
from hasten.penalties import Penalties
from hasten.sampling import SamplingParams


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="generate text for one prompt")
    parser.add_argument("prompt", nargs="?", default=None, help="the prompt (a user message, unless --no-chat)")
    parser.add_argument("--prompts", default=None,
                        help="a file of prompts, one per line (or JSONL with a \"prompt\" field), decoded as one batch")
    add_model_options(parser)
    add_sampling_options(parser)
    add_shaping_options(parser)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--prediction", default=None, metavar="FILE",
                        help="text the answer is expected to resemble (e.g. the code being edited): pld, lookahead "
                             "and auto draft from it too; the output is unchanged")
    parser.add_argument("--no-chat", action="store_true",
                        help="send the prompt as raw text, without the chat template (a base model such as "
                             "gemma3-270m needs it)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    parser.set_defaults(run=run)


def read_prompt_file(path: str) -> list[str]:
    """Prompts from a text file (one a line) or a JSONL file (a ``prompt`` field a line); blank lines skipped."""
    try:
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as error:
        raise HastenError(f"cannot read --prompts {path}: {error.strerror}") from error
    prompts = []
    for number, line in enumerate(lines, start=1):
        if line.lstrip().startswith("{"):
            try:
                prompt = json.loads(line).get("prompt")
            except (json.JSONDecodeError, AttributeError) as error:
                raise HastenError(f"{path}:{number}: not a JSON object with a \"prompt\"") from error
            if not isinstance(prompt, str) or not prompt.strip():
                raise HastenError(f"{path}:{number}: \"prompt\" must be a non-empty string")
            prompts.append(prompt)
        else:
            prompts.append(line)
    if not prompts:
        raise HastenError(f"--prompts {path} holds no prompts")
    return prompts


def run(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.prompts is None):
        raise HastenError("give one prompt, or --prompts FILE")
    prompts = read_prompt_file(args.prompts) if args.prompts else None
    if args.prompt is not None and not args.prompt.strip():
        raise HastenError("the prompt is empty")
    if args.max_new_tokens < 1:
        raise HastenError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    SamplingParams(args.temperature, args.top_k, args.top_p, args.seed, args.min_p)  # validate before the load
    shaping = shaping_options(args)
    Penalties(shaping["presence_penalty"], shaping["frequency_penalty"], shaping["repetition_penalty"],
              shaping["logit_bias"])
    if args.threads is not None and args.threads < 1:
        raise HastenError(f"--threads must be >= 1, got {args.threads}")
    prediction = None if args.prediction is None else read_text_file("--prediction", args.prediction)
    loaded = load_model(args.model, args.backend, **load_options(args))
    check_chat(loaded, not args.no_chat)
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
                "top_p": args.top_p, "seed": args.seed, "stop": args.stop, "chat": not args.no_chat,
                "prediction": prediction, **shaping}
    if prompts is not None:
        results = generate_batch(loaded, prompts, args.method, **sampling, **method_options(args, loaded))
        for prompt, result in zip(prompts, results, strict=True):
            if args.json:
                print(json.dumps({"prompt": prompt} | as_json(result)))
            else:
                print(result.text)
                print(summary(result), file=sys.stderr)
        return 0
    events = stream(loaded, args.prompt, args.method, **sampling, **method_options(args, loaded))
    result = None
    for event in events:
        if not args.json:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        result = event.result or result
    assert result is not None
    if args.json:
        print(json.dumps(as_json(result)))
    else:
        sys.stdout.write("\n")
        print(summary(result), file=sys.stderr)
    return 0


JSON_KEYS = ("text", "token_ids", "method", "target_passes", "mean_accepted", "tokens_per_s", "prompt_tokens",
             "finish_reason", "wall_s", "draft_ms_per_step", "method_stats")


def as_json(result: GenerationResult) -> dict:
    """The ``--json`` record: the result's main fields, and its logprobs when asked for."""
    record = {key: getattr(result, key) for key in JSON_KEYS}
    if result.logprobs is not None:
        record["logprobs"] = [{"token_id": entry.token_id, "logprob": entry.logprob,
                               "top": [[token, value] for token, value in entry.top]} for entry in result.logprobs]
    return record


def summary(result: GenerationResult) -> str:
    """The statistics line printed to standard error."""
    return (f"[{result.method}] {len(result.token_ids)} tokens in {result.wall_s:.2f} s = "
            f"{result.tokens_per_s:.1f} tokens/s; {result.target_passes} target passes, "
            f"{result.mean_accepted:.2f} tokens per pass; drafting {result.draft_ms_per_step:.2f} ms per pass"
            + "".join(f"; {key} {value:.2f}" for key, value in result.method_stats.items()))
