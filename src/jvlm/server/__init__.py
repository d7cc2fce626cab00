"""The OpenAI-compatible HTTP server (``jvlm serve``): FastAPI routes in ``app``, request / response
models in ``types``, error mapping in ``errors``, settings (and CLI flags) in ``settings`` / ``cli``."""

from .app import create_app
from .cli import add_serve_arguments, serve_main
from .settings import Settings

__all__ = ["Settings", "add_serve_arguments", "create_app", "serve_main"]
