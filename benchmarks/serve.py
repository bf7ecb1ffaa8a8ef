"""Load test of ``aetheris serve``: many concurrent streaming chat clients against one server on loopback.

A small random-weight Aetheris (with a BPE tokenizer trained on the offline 70-language corpus) is
saved to a temporary folder and served by ``aetheris serve`` in a subprocess (so client and server do
not share a GIL). ``--clients`` streaming clients run at once, each sending ``--rounds`` requests back to
back (every 4th request asks for a grammar-constrained tool call). Reported per server setting
(continuous batching on, and ``--max-batch 1`` for comparison): errors, incomplete streams, p50/p99
time to first token (request sent -> first content or tool-call delta), aggregate completion tokens
per second (usage tokens / wall time), p50 per-stream decode rate. Loopback only; bounded in requests
and time (``--timeout``).

    AETHERIS_DATA_DIR=../shared/data python benchmarks/serve.py --json bench-results/serve.json [--quick]
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from common import emit, parser, setup

from aetheris import chat
from aetheris.checkpoint import save_model
from aetheris.config import AetherisConfig
from aetheris.model import Aetheris

TOOL = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"]}}}


def build_checkpoint(folder: Path, quick: bool) -> dict:
    from aetheris.sources import offline_corpus_documents
    from aetheris.tokenizer import train_bpe_tokenizer

    docs = offline_corpus_documents(max_lines_per_language=40 if quick else 120)
    tok = train_bpe_tokenizer((line for d in docs for line in d.text.split("\n")), vocab_size=2048 if quick else 8192)
    chat.install_chat_template(tok)
    D, L, H = (128, 4, 4) if quick else (256, 8, 4)
    cfg = AetherisConfig(vocab_size=len(tok), d_model=D, n_layer=L, n_heads=H, head_dim=D // H, d_state=D // H,
                         n_groups=2, d_ff=(D * 11) // 4, chunk_size=64)
    model = Aetheris(cfg).eval()
    save_model(model, folder, tok)
    return {"d_model": D, "n_layer": L, "vocab_size": len(tok), "parameters": model.num_parameters()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, max_batch: int, max_queue: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "aetheris.cli", "serve", "--model", str(folder), "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", "bench", "--max-batch", str(max_batch),
           "--max-queue", str(max_queue), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not become healthy")
        time.sleep(0.2)


async def one_stream(http: httpx.AsyncClient, i: int, max_tokens: int) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": f"Request {i}: tell me a story."}],
            "max_tokens": max_tokens, "temperature": 1.0, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}}
    if i % 4 == 3:
        body.update(tools=[TOOL], tool_choice="required")
    start = time.perf_counter()
    first = end = None
    usage, finish, done, error = None, None, False, None
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]["message"]
                    break
                if event.get("usage"):
                    usage = event["usage"]
                for c in event["choices"]:
                    if first is None and (c["delta"].get("content") or c["delta"].get("tool_calls")):
                        first = time.perf_counter()
                    finish = c.get("finish_reason") or finish
        end = time.perf_counter()
    except httpx.HTTPError as err:
        error = repr(err)
    tokens = usage["completion_tokens"] if usage else 0
    return {"error": error, "complete": done and finish is not None and usage is not None,
            "ttft": (first or end or start) - start, "tokens": tokens, "finish": finish,
            "decode_tps": (tokens - 1) / (end - first) if first and end and end > first and tokens > 1 else None}


async def load(url: str, clients: int, rounds: int, max_tokens: int, timeout: float) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        async def client(c: int) -> list[dict]:
            return [await one_stream(http, c * rounds + k, max_tokens) for k in range(rounds)]
        start = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(client(c) for c in range(clients))), timeout)
        wall = time.perf_counter() - start
    flat = [r for rs in results for r in rs]
    ok = [r for r in flat if not r.get("error")]
    ttft = sorted(r["ttft"] for r in ok)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None
    tokens = sum(r["tokens"] for r in ok)
    rates = sorted(r["decode_tps"] for r in ok if r["decode_tps"])
    return {"requests": len(flat), "errors": len(flat) - len(ok), "incomplete": sum(not r["complete"] for r in ok),
            "error_samples": [r["error"] for r in flat if r.get("error")][:3],
            "finish_reasons": {f: sum(r["finish"] == f for r in ok) for f in {r["finish"] for r in ok}},
            "wall_s": round(wall, 2), "completion_tokens": tokens,
            "ttft_p50_ms": round(1e3 * pct(ttft, 0.5), 1), "ttft_p99_ms": round(1e3 * pct(ttft, 0.99), 1),
            "aggregate_tokens_per_s": round(tokens / wall, 1),
            "per_stream_decode_tokens_per_s_p50": round(statistics.median(rates), 1) if rates else None}


def main() -> None:
    p = parser(__doc__.splitlines()[0], clock=False)
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (>= 32 for the acceptance run)")
    p.add_argument("--rounds", type=int, default=None, help="requests per client (default 2, quick 1)")
    p.add_argument("--max-tokens", type=int, default=None, help="per request (default 64, quick 32)")
    p.add_argument("--timeout", type=float, default=300, help="bound on each load run, seconds")
    p.add_argument("--batches", default="32,1", help="server --max-batch settings to compare")
    args = p.parse_args()
    setup(args)
    rounds = args.rounds or (1 if args.quick else 2)
    max_tokens = args.max_tokens or (32 if args.quick else 64)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bench-model"
        torch.manual_seed(0)
        model_info = build_checkpoint(folder, args.quick)
        for max_batch in (int(b) for b in args.batches.split(",")):
            proc, url = start_server(folder, max_batch, max_queue=args.clients * rounds + 8)
            try:
                asyncio.run(load(url, 4, 1, 8, args.timeout))  # warm-up (not reported)
                load_before = os.getloadavg()[0]  # other work on the machine skews every number here
                runs[f"max_batch={max_batch}"] = asyncio.run(load(url, args.clients, rounds, max_tokens, args.timeout))
                runs[f"max_batch={max_batch}"]["load_average_1min_before"] = round(load_before, 2)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    emit(args, {"benchmark": "serve", "model": model_info, "clients": args.clients, "rounds": rounds,
                "max_tokens": max_tokens, "command": " ".join(["python", "benchmarks/serve.py", *sys.argv[1:]]),
                "runs": runs})


if __name__ == "__main__":
    main()
