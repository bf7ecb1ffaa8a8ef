"""Abuse timings of ``aetheris serve``: how fast hostile requests are refused, and how fast abandoned work is freed.

The same random-weight checkpoint as ``benchmarks/serve.py``, served by ``aetheris serve`` in a subprocess
(default limits). Measured, each against the server's own clock-free observables (HTTP round trips and
``/metrics``):

1. Abandoned non-streaming requests: ``--clients`` clients ask for ``max_tokens`` 2048 (stop tokens
   banned with ``logit_bias``, so they never finish on their own) and give up after 1.5 s; reported: the
   time from the last give-up until ``aetheris_active_sequences`` is 0, and the latency of the next request.
2. Refusals that used to cost seconds: a tool with 2,000 (and 1,200) properties, a 3 MB prompt
   (median round trip of 5 on an open connection, request body already encoded; each must be a 400).
3. ``logit_bias`` with 300 entries, n = 8, 256 tokens, against the same request without it.

    AETHERIS_DATA_DIR=../shared/data python benchmarks/abuse.py --json bench-results/abuse.json [--quick]
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from common import emit, parser, setup
from serve import build_checkpoint, start_server

from aetheris import chat
from aetheris.tokenizer import load_tokenizer


def active_sequences(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("aetheris_active_sequences "):
            return float(line.split()[1])
    raise RuntimeError("no aetheris_active_sequences in /metrics")


async def abandon(url: str, clients: int, ban: dict) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 2048,
            "temperature": 1.0, "logit_bias": ban}
    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=clients + 4)) as http:
        async def give_up(i: int) -> bool:
            try:
                await http.post("/v1/chat/completions", json={**body, "seed": i}, timeout=1.5)
                return False
            except httpx.ReadTimeout:
                return True
        gave_up = await asyncio.gather(*(give_up(i) for i in range(clients)))
    gone = time.perf_counter()
    peak = 0.0
    while (active := active_sequences(url)) > 0:
        peak = max(peak, active)
        if time.perf_counter() - gone > 120:
            break
        time.sleep(0.02)
    freed = time.perf_counter() - gone
    start = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": 8, "logit_bias": {}}, timeout=120)
    return {"clients": clients, "gave_up": sum(gave_up), "active_after_give_up": peak,
            "slots_freed_after_s": round(freed, 3), "next_request_s": round(time.perf_counter() - start, 3),
            "next_request_status": r.status_code}


def refusal_seconds(url: str, body: dict, repeats: int = 5) -> dict:
    """Round trips on one open connection (a fresh httpx client costs tens of ms to set up)."""
    times, statuses = [], set()
    raw = json.dumps(body).encode()
    with httpx.Client(timeout=120) as http:
        http.get(url + "/health")
        for _ in range(repeats):
            start = time.perf_counter()
            r = http.post(url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
            times.append(time.perf_counter() - start)
            statuses.add((r.status_code, r.json()["error"]["code"] if r.status_code >= 400 else None))
    return {"median_ms": round(1e3 * statistics.median(times), 1), "max_ms": round(1e3 * max(times), 1),
            "answers": sorted(f"{s} {c}" for s, c in statuses)}


def tool_with(properties: int) -> dict:
    return {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(properties)}}}}


def main() -> None:
    p = parser(__doc__.splitlines()[0], clock=False)
    p.add_argument("--clients", type=int, default=32, help="abandoning clients")
    args = p.parse_args()
    setup(args)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bench-model"
        torch.manual_seed(0)
        model_info = build_checkpoint(folder, args.quick)
        tokenizer = load_tokenizer(folder)
        stops = {tokenizer.convert_tokens_to_ids(t) for t in (chat.END_RESPONSE, chat.END_TURN)} | {tokenizer.eos_token_id}
        ban = {str(i): -100 for i in stops}
        proc, url = start_server(folder, max_batch=32, max_queue=args.clients + 8)
        try:
            hello = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            httpx.post(url + "/v1/chat/completions", json=hello, timeout=60)  # warm-up
            results["abandoned_non_streaming"] = asyncio.run(abandon(url, args.clients, ban))
            results["refused_2000_property_tool"] = refusal_seconds(url, {**hello, "tools": [tool_with(2000)]})
            results["refused_1200_property_tool"] = refusal_seconds(url, {**hello, "tools": [tool_with(1200)]})
            results["refused_3MB_prompt"] = refusal_seconds(url, {**hello, "messages": [
                {"role": "user", "content": "word " * 600_000}]}, repeats=3)
            many = {**hello, "max_tokens": 32 if args.quick else 256, "n": 8, "temperature": 1.0, "seed": 0}
            bias = {str(i): 0.5 for i in range(300)}
            timed = {"without": [], "with_300": []}
            for _ in range(3):  # interleaved, so drift on a shared machine hits both
                for name, extra in (("without", {}), ("with_300", {"logit_bias": bias})):
                    start = time.perf_counter()
                    r = httpx.post(url + "/v1/chat/completions", json={**many, **extra}, timeout=300)
                    assert r.status_code == 200, r.text[:200]
                    timed[name].append(time.perf_counter() - start)
            results["logit_bias_300_n8"] = {k: round(statistics.median(v), 3) for k, v in timed.items()}
            results["logit_bias_300_n8"]["ratio"] = round(statistics.median(
                a / b for a, b in zip(timed["with_300"], timed["without"])), 3)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    emit(args, {"benchmark": "abuse", "model": model_info, "command": " ".join(["python", "benchmarks/abuse.py",
                                                                               *sys.argv[1:]]), **results})


if __name__ == "__main__":
    main()
