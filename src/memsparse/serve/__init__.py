"""The HTTP server (`memsparse serve`): an engine and its bank behind an OpenAI-compatible API (FastAPI)."""

from .server import Settings, create_app, serve

__all__ = ["Settings", "create_app", "serve"]
