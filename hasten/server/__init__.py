"""``hasten serve``: an OpenAI-compatible HTTP server with speculative decoding on one worker thread."""

from hasten.server.app import create_app

__all__ = ["create_app"]
