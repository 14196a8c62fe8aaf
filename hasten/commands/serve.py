"""``hasten serve``: load a model once and answer OpenAI-compatible requests over HTTP."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import TYPE_CHECKING

from hasten.commands.common import add_model_options, load_options, method_options
from hasten.errors import HastenError
from hasten.models import has_chat_template, load_model
from hasten.server.limits import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, KEEPALIVE_S, MAX_BODY_BYTES, MAX_GENERATIONS

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

    from hasten.server.worker import Worker


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (chat and text completions)")
    add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help=f"requests that may wait for room in the batch (default {DEFAULT_MAX_QUEUE}); more get "
                             "503 with Retry-After at once")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                        help=f"generations decoded together, one shared pass per step (default {DEFAULT_MAX_BATCH}; "
                             "1 = one at a time)")
    parser.add_argument("--max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    parser.add_argument("--max-tokens-limit", type=int, default=None,
                        help="the most max_tokens a request may ask for (default and ceiling: the context minus 1)")
    parser.add_argument("--max-generations", type=int, default=MAX_GENERATIONS,
                        help=f"the most prompts x n in one request (default {MAX_GENERATIONS})")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                        help=f"the largest request body; larger ones get 413 (default {MAX_BODY_BYTES})")
    parser.add_argument("--keepalive", type=float, default=KEEPALIVE_S,
                        help=f"seconds between SSE keep-alive comments to a waiting stream (default {KEEPALIVE_S:g})")
    parser.add_argument("--served-model-name", default=None,
                        help="the model id clients send and /v1/models lists (default: the --model value)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise HastenError(f"--port must be in 0..65535, got {args.port}")
    for option in ("max_queue", "max_batch", "max_tokens", "max_tokens_limit", "max_generations", "max_body_bytes",
                   "threads"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            raise HastenError(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    if not args.keepalive > 0:
        raise HastenError(f"--keepalive must be > 0 seconds, got {args.keepalive}")
    import uvicorn

    from hasten.server import create_app

    loaded = load_model(args.model, args.backend, **load_options(args))
    if not has_chat_template(loaded.tokenizer):
        print(f"hasten serve: model {loaded.name!r} has no chat template (a base model): /v1/completions takes raw "
              "text; /v1/chat/completions is refused", file=sys.stderr)
    options = method_options(args, loaded)
    draft = options.pop("draft", None)
    app = create_app(loaded, args.method, draft, args.max_queue, default_max_tokens=args.max_tokens,
                     model_name=args.served_model_name, method_options=options,
                     max_generations=args.max_generations, max_tokens_limit=args.max_tokens_limit,
                     max_body_bytes=args.max_body_bytes, keepalive_s=args.keepalive,
                     max_batch=args.max_batch)
    return serve(app, uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))


def serve(app: FastAPI, config: uvicorn.Config) -> int:
    """uvicorn on a thread, the generation loop on this (the main) thread, where llama.cpp runs fastest.

    Ctrl-C (SIGINT) or SIGTERM stops both: uvicorn shuts down gracefully, which stops the loop.
    """
    import uvicorn

    server = uvicorn.Server(config)
    thread = threading.Thread(target=_run_http, args=(server,), name="hasten-http", daemon=True)
    worker: Worker = app.state.worker
    worker.hold()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: _interrupt())
    thread.start()
    watcher = threading.Thread(target=_stop_when_done, args=(thread, worker), name="hasten-watch", daemon=True)
    watcher.start()
    try:
        worker.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        thread.join(30)
        worker.stop()
        signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise HastenError(f"the server could not listen on {config.host}:{config.port} (see the log above)")
    return 0


def _run_http(server: uvicorn.Server) -> None:
    try:
        server.run()
    except SystemExit:  # uvicorn's exit on a start-up failure (logged): the main thread reports it
        pass


def _interrupt() -> None:
    raise KeyboardInterrupt


def _stop_when_done(thread: threading.Thread, worker: Worker) -> None:
    """If uvicorn ends on its own (a port in use, say), the loop on the main thread stops too."""
    thread.join()
    worker.stop()
