"""``aetheris serve``: flags, checkpoint loading, and uvicorn set up with the server's deadlines."""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

import torch
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..checkpoint import load_model
from ..generation import add_decode_layout_argument, use_decode_layout
from ..tokenizer import load_tokenizer
from .app import create_app
from .limits import add_limit_arguments, limits_from_args

API_KEY_ENV = "AETHERIS_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder (config.json + model.safetensors + tokenizer)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="the 'model' clients send (default: folder name)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1, /metrics and "
                        f"/docs (visible in ps: prefer --api-key-file or ${API_KEY_ENV})")
    parser.add_argument("--api-key-file", default=None, help="read the API key from this file (first line)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--log-level", default="info")
    add_decode_layout_argument(parser)
    add_limit_arguments(parser)


def api_key_from(args: argparse.Namespace) -> str | None:
    """--api-key, else --api-key-file, else $AETHERIS_API_KEY; None when none is given."""
    key = args.api_key
    if key is None and args.api_key_file is not None:
        path = Path(args.api_key_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--api-key-file {args.api_key_file}: no such file")
        key = (path.read_text(encoding="utf-8").splitlines() or [""])[0]
    if key is None:
        key = os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise ValueError("the API key is empty; give a non-empty key (or none to serve without one)")
    return key.strip() if key is not None else None


def load_checkpoint(path: str, device: str = "cpu", dtype: str | None = None, decode_layout: str = "linear"):
    """Model + tokenizer from a checkpoint folder; every problem is a clear error (never random weights).
    ``decode_layout``: "packed" / "packed-head" put the weights in oneDNN's layout, "compiled" runs batch-1 steps
    through the compiled matvec (``--decode-layout``)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"--model {path}: no such folder. Pass a checkpoint folder (config.json + "
                                "model.safetensors + tokenizer files), e.g. a distillation run's final/ folder.")
    model = load_model(folder, device=device, dtype=getattr(torch, dtype) if dtype else None)
    tokenizer = load_tokenizer(folder)
    if len(tokenizer) > model.cfg.vocab_size:
        raise ValueError(f"the tokenizer in {folder} has {len(tokenizer)} tokens but the model only "
                         f"{model.cfg.vocab_size}; they do not belong together")
    model.eval()
    use_decode_layout(model, decode_layout, "aetheris serve")
    return model, tokenizer


def _h11_protocol(header_timeout_s: float):
    """uvicorn's h11 protocol with a deadline on each request's head: a connection that has not sent
    complete headers within ``header_timeout_s`` of opening (or of its previous response) is closed, so
    slow-header (slowloris) connections cannot pile up. uvicorn's own timeout only covers idle keep-alive."""
    class HeadTimeoutH11(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_head_timer()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_head_timer()

        def connection_lost(self, exc):
            if getattr(self, "head_timer", None) is not None:
                self.head_timer.cancel()
            super().connection_lost(exc)

        def _arm_head_timer(self):
            if getattr(self, "head_timer", None) is not None:
                self.head_timer.cancel()
            self.head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _head_timeout(self):
            waiting_for_head = self.cycle is None or self.cycle.response_complete
            if waiting_for_head and not self.transport.is_closing():
                self.transport.close()

    return HeadTimeoutH11


def uvicorn_config(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """uvicorn settings from the app's Limits: header/body deadlines, keep-alive, header size."""
    limits = app.state.server.limits
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=_h11_protocol(limits.header_timeout_s),
                          timeout_keep_alive=limits.keep_alive_s, h11_max_incomplete_event_size=limits.max_header_bytes,
                          timeout_graceful_shutdown=5)


# ---------------------------------------------------------------------------------------------------
# CLI: aetheris serve
# ---------------------------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound by us: a port in use is one line naming --port (exit 2) instead of
    uvicorn's log message and exit 1. uvicorn is handed this socket, so nothing can take the port in between."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port (or --host), "
                         "or stop the process that holds it") from err
    return sock


def run(args: argparse.Namespace) -> int:
    limits = limits_from_args(args)
    api_key = api_key_from(args)
    # Fail fast: load (strictly) before binding, so a bad checkpoint never becomes a running server.
    model, tokenizer = load_checkpoint(args.model, args.device, args.dtype, args.decode_layout)
    sock = bind(args.host, args.port)
    name = args.served_model_name or Path(args.model).expanduser().resolve().name
    # Grammar tables (TokenizerInfo over the vocabulary) build in the background while /health says 503.
    app = create_app(loader=lambda: (model, tokenizer), model_name=name, api_key=api_key, limits=limits)
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"aetheris serve: warning: binding {args.host} without an API key exposes the model to the network")
    uvicorn.Server(uvicorn_config(app, args.host, args.port, args.log_level)).run(sockets=[sock])
    return 0
