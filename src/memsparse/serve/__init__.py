"""The HTTP server (`memsparse serve`): an engine and its bank behind a JSON API."""

from .server import make_server

__all__ = ["make_server"]
