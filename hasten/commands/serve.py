"""``hasten serve``: load a model once and answer OpenAI-compatible requests over HTTP."""

from __future__ import annotations

import argparse

from hasten.commands.common import add_model_options, method_options
from hasten.errors import HastenError
from hasten.models import load_model


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (chat and text completions)")
    add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-queue", type=int, default=8,
                        help="requests that may wait while one generates; more get 503 at once")
    parser.add_argument("--max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    parser.add_argument("--served-model-name", default=None,
                        help="the model id clients send and /v1/models lists (default: the --model value)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise HastenError(f"--port must be in 0..65535, got {args.port}")
    if args.max_queue < 1:
        raise HastenError(f"--max-queue must be >= 1, got {args.max_queue}")
    if args.max_tokens < 1:
        raise HastenError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.method == "draft" and not args.draft_model:
        raise HastenError("--method draft needs a draft model (--draft-model PATH)")
    import uvicorn

    from hasten.server import create_app

    loaded = load_model(args.model, args.backend, threads=args.threads)
    options = method_options(args, loaded)
    draft = options.pop("draft", None)
    app = create_app(loaded, args.method, draft, args.max_queue, default_max_tokens=args.max_tokens,
                     model_name=args.served_model_name, method_options=options)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
