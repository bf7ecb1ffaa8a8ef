"""``aetheris serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for Aetheris checkpoints.

Modules, in the order a request meets them: ``limits`` (every cap, and the flags derived from it),
``app`` (routes, middleware, the SSE writer and aggregator), ``schema`` (the request bodies as pydantic
models), ``grammar`` (JSON schemas the grammar can enforce; xgrammar), ``specs`` (a validated request ->
the engine's ``Spec``), ``engine`` (continuous batching on a worker thread; no HTTP), ``errors`` (OpenAI's
error shape), ``cli`` (flags, checkpoint loading, uvicorn).
"""

from .app import create_app
from .cli import add_arguments, api_key_from, load_checkpoint, run, uvicorn_config
from .errors import ApiError
from .limits import Limits

__all__ = ["ApiError", "Limits", "add_arguments", "api_key_from", "create_app", "load_checkpoint", "run",
           "uvicorn_config"]
