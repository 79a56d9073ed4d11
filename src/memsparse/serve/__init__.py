"""The HTTP server (`memsparse serve`): an engine and its bank behind an OpenAI-compatible API (FastAPI). The web
stack is imported on first use of `create_app` or `serve`, not by `Settings`."""

from .settings import Settings

__all__ = ["Settings", "create_app", "serve"]


def __getattr__(name: str):
    if name in ("create_app", "serve"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
