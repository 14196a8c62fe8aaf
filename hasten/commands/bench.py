"""``hasten bench``: every method against plain decoding on a prompt set, with a report, tables and plots."""

from __future__ import annotations

import argparse
import shlex
import sys

from hasten.bench import balanced_subset, read_prompts, run_bench, select_categories, with_response_format, write_report
from hasten.bench.report import anchor_lines, table
from hasten.errors import HastenError
from hasten.models import BACKENDS, DEFAULT_MODEL, LoadedModel, has_chat_template
from hasten.response_format import read_response_format
from hasten.sampling import SamplingParams

DTYPES = ("auto", "float32", "bfloat16", "float16")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="benchmark every method against plain decoding (Spec-Bench style)",
        description="Run each method on each prompt (and each backend), interleaved in one process after a warm-up; "
                    "write results.json, records.csv, report.md, speedup.png and cost_curve.png; check greedy outputs "
                    "equal their backend's ar token for token.",
    )
    parser.add_argument("--prompts", default=None,
                        help="JSONL prompts: Spec-Bench format or {\"prompt\", \"category\"} (default: shipped set)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods (each runs on every backend; name@backend for one) and "
                             "anchors (hf_generate, hf_pld, hf_assisted, hf_static, llamacpp_generate, "
                             "llamacpp_pld); "
                             "default: all that can run. ar is always added as the baseline")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="'default', 'gemma3-270m' (a base model), a model folder or a .gguf file")
    parser.add_argument("--no-chat", action="store_true",
                        help="prompts as raw text (each question's turns joined by blank lines), as a base model such "
                             "as gemma3-270m takes them; a model with a chat template runs every prompt through it")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="primary backend: every speedup is against its ar (auto = llama.cpp for a .gguf)")
    parser.add_argument("--compare-backend", default=None, metavar="B[,B]",
                        help="also load the model on these backends and run every method there too, "
                             "labelled method@backend (e.g. transformers)")
    parser.add_argument("--device", default=None,
                        help="auto (CUDA where a GPU is present, else the CPU), cpu or cuda[:N]; every backend, the "
                             "draft and the transformers anchors run there (default: auto)")
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="weights of the transformers backend (default: auto = bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--draft-model", default=None, help="draft model for draft and hf_assisted")
    parser.add_argument("--fixed-sizes", action="store_true",
                        help="every method drafts its fixed sizes (adaptive=False) instead of what the cost model says")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="per turn")
    parser.add_argument("--category", default=None, metavar="C[,C]",
                        help="only the prompts of these categories (e.g. structured)")
    parser.add_argument("--limit", type=int, default=None, help="at most N prompts, taken evenly across categories")
    parser.add_argument("--response-format", default=None, metavar="json_object|FILE",
                        help="constrain the answers of every prompt without its own response_format: json_object, "
                             "or a JSON file holding a response_format object or a bare JSON schema; each answer "
                             "is checked against it. Anchors leave those prompts out")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (exactness is checked)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed questions run by every method first")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of torch and llama.cpp (default: llama.cpp 2, torch its own); "
                             "use 1 on a busy shared machine")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def parse_methods(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise HastenError("--methods is empty")
    return names


def parse_categories(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise HastenError("--category is empty")
    return names


def parse_backends(primary: str, compare: str | None) -> list[str]:
    """The backends to load, the primary first (``auto`` stays to be resolved against the model file)."""
    backends = [primary]
    for name in (compare or "").split(","):
        name = name.strip()
        if not name:
            continue
        if name not in BACKENDS or name == "auto":
            raise HastenError(f"--compare-backend: unknown backend {name!r}; choose llamacpp or transformers")
        if name in backends:
            raise HastenError(f"--compare-backend {name} is already loaded")
        backends.append(name)
    if compare is not None and len(backends) == 1:
        raise HastenError("--compare-backend is empty")
    return backends


def check_raw_text(loaded: LoadedModel, no_chat: bool) -> None:
    """A model without a chat template is benchmarked on raw text (said once unless ``--no-chat`` said it); one
    with a template always runs through it, so ``--no-chat`` is refused there."""
    if has_chat_template(loaded.tokenizer):
        if no_chat:
            raise HastenError(f"--no-chat: model {loaded.name!r} has a chat template, and bench runs every prompt "
                              "through it; --no-chat is for a base model without one")
    elif not no_chat:
        print(f"hasten bench: model {loaded.name!r} has no chat template (a base model): prompts are sent as raw "
              "text (--no-chat)", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    # Check everything cheap before the slow model load.
    if args.max_new_tokens < 1:
        raise HastenError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.warmup < 0:
        raise HastenError(f"--warmup must be >= 0, got {args.warmup}")
    if args.limit is not None and args.limit < 1:
        raise HastenError(f"--limit must be >= 1, got {args.limit}")
    if args.threads is not None and args.threads < 1:
        raise HastenError(f"--threads must be >= 1, got {args.threads}")
    SamplingParams(args.temperature, 0, 1.0, args.seed)
    methods = parse_methods(args.methods)
    backends = parse_backends(args.backend, args.compare_backend)
    response_format = None if args.response_format is None else read_response_format(args.response_format)
    prompts = select_categories(read_prompts(args.prompts), parse_categories(args.category))
    prompts = with_response_format(balanced_subset(prompts, args.limit), response_format)

    import torch

    from hasten.methods import load_draft
    from hasten.models import load_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)  # proposers on torch (draft, ReDrafter head) use it on any backend
    # load_model resolves auto (the device, and the backend for it); only what was asked for is passed on.
    placement = {key: value for key in ("device", "dtype") if (value := getattr(args, key)) is not None}
    models: dict[str, LoadedModel] = {}
    for name in backends:
        loaded = load_model(args.model, name, threads=args.threads, **placement)
        if loaded.backend.backend in models:
            raise HastenError(f"--compare-backend repeats the primary backend ({loaded.backend.backend})")
        models[loaded.backend.backend] = loaded
    primary = next(iter(models.values()))
    check_raw_text(primary, args.no_chat)
    draft = load_draft(primary, args.draft_model) if args.draft_model else None
    options = {"adaptive": False} if args.fixed_sizes else None
    results = run_bench(models, prompts, methods, draft=draft, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, warmup=args.warmup, seed=args.seed,
                        progress=not args.no_progress, options=options)
    command = "hasten " + " ".join(shlex.quote(arg) for arg in sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None
    out = write_report(results, args.out, command)
    for warning in results["warnings"]:
        print(f"hasten bench: {warning}", file=sys.stderr)
    print(table(results))
    for line in anchor_lines(results):
        print(line)
    print(f"wrote {out / 'results.json'}, {out / 'records.csv'}, {out / 'report.md'}, {out / 'speedup.png'}, "
          f"{out / 'cost_curve.png'}")
    return 0
