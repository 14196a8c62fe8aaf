"""``hasten serve``: an OpenAI-compatible HTTP server, speculative decoding with continuous batching on one thread."""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":  # imported on use, so that the command line starts without FastAPI
        from hasten.server.app import create_app

        return create_app
    raise AttributeError(f"module 'hasten.server' has no attribute {name!r}")
