"""Helpers for the server tests: a tiny random-weight Aetheris checkpoint with the chat template, and a
uvicorn server on a free loopback port in a background thread."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import httpx
import torch


def tiny_checkpoint(tokenizer, folder: Path, seed: int = 0) -> Path:
    """Save a tiny random Aetheris with ``tokenizer`` (chat template installed, as stage 3 saves it)."""
    from aetheris import chat
    from aetheris.checkpoint import save_model
    from aetheris.config import AetherisConfig
    from aetheris.model import Aetheris

    torch.manual_seed(seed)
    tok = copy.deepcopy(tokenizer)
    chat.install_chat_template(tok)
    cfg = AetherisConfig(vocab_size=len(tok), d_model=64, n_layer=2, n_heads=4, head_dim=16, d_state=16, n_groups=2,
                         d_ff=128, chunk_size=16)
    return save_model(Aetheris(cfg).eval(), folder, tok)


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, app, wait_ready: bool = True):
        import uvicorn

        from aetheris.serve import uvicorn_config

        config = uvicorn_config(app, host="127.0.0.1", port=0, log_level="warning")  # the settings `aetheris serve` uses
        config.timeout_graceful_shutdown = 2
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        while wait_ready and httpx.get(self.url + "/health").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("test server never became healthy")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
