"""The decode engine: one worker thread that owns the model and runs continuous batching. No HTTP here.

Each new job is prefilled once with the chunked scan, its recurrent state is concatenated onto the running
batch, and every step decodes all running sequences with one ``model.step`` (O(1) per token, no KV cache);
finished or cancelled rows leave the batch. Per sequence, a small state machine constrains the assistant
turn: the first token is ``<|START_RESPONSE|>`` (text) or ``<|START_ACTION|>`` (tool calls), as
``tool_choice`` allows; text is free (or JSON-schema constrained for ``response_format``); an action block
is constrained by a grammar of ``[{"tool_call_id", "tool_name", "parameters": <that tool's schema>}, ...]``
so every call parses, and each call is validated with jsonschema before it is returned. Sampling
(``generation.sample``) and UTF-8-safe detokenisation with stop strings (``generation.TextState``) are
the ones ``aetheris generate`` uses. The worker hands per-step deltas to the event loop
(``call_soon_threadsafe``) as ``("deltas", [Delta])``, then ``("done", usage)`` or ``("error", ApiError)``.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jsonschema
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from torch import Tensor

from .. import chat
from ..generation import SamplingParams, TextState, left_pad, sample
from ..model import AetherisCache
from .errors import ApiError, library_message
from .grammar import Grammars
from .limits import Limits

# ---------------------------------------------------------------------------------------------------
# Tool-call streaming: turn the growing action text into OpenAI tool-call deltas
# ---------------------------------------------------------------------------------------------------

_CALL_HEAD = re.compile(r'\s*(?:\}\s*)?[\[,]\s*\{\s*"tool_call_id"\s*:\s*"(?:[^"\\]|\\.)*"\s*,\s*"tool_name"\s*:\s*'
                        r'"((?:[^"\\]|\\.)*)"\s*,\s*"parameters"\s*:\s*')


class ActionStream:
    """Incremental parser of ``[{"tool_call_id": .., "tool_name": .., "parameters": {..}}, ...]``: a call's
    header delta (index, id, type, name) as soon as its name is complete, then its arguments in one delta
    once they are complete and ``check(name, arguments)`` accepted them (a JSON-schema validation, so no
    argument text reaches a client before it is known valid). Brace depth is tracked outside strings, so
    the call object's own closing brace is never part of the arguments."""

    def __init__(self, check: Callable[[str, str], None] | None = None):
        self.buf = ""
        self.pos = 0
        self.calls: list[dict] = []   # {"id", "name", "arguments"}
        self.depth = -1               # -1: between calls; >= 0: nesting inside the parameters
        self.in_string = self.escape = False
        self.check = check

    def feed(self, text: str) -> list[dict]:
        self.buf += text
        deltas = []
        while True:
            if self.depth < 0:
                m = _CALL_HEAD.match(self.buf, self.pos)
                if not m:
                    return deltas
                call = {"id": "call_" + secrets.token_hex(12), "name": json.loads(f'"{m.group(1)}"'), "arguments": ""}
                self.calls.append(call)
                deltas.append({"index": len(self.calls) - 1, "id": call["id"], "type": "function",
                               "function": {"name": call["name"], "arguments": ""}})
                self.pos, self.depth = m.end(), 0
            if self.depth == 0:  # the value has not started: skip the separator's whitespace
                while self.pos < len(self.buf) and self.buf[self.pos].isspace():
                    self.pos += 1
            start, closed = self.pos, False
            while self.pos < len(self.buf) and not closed:
                c = self.buf[self.pos]
                self.pos += 1
                if self.in_string:
                    self.escape, self.in_string = (False, True) if self.escape else (c == "\\", c != '"')
                elif c == '"':
                    self.in_string = True
                elif c in "{[":
                    self.depth += 1
                elif c in "}]":
                    self.depth -= 1
                    closed = self.depth == 0
            call = self.calls[-1]
            call["arguments"] += self.buf[start:self.pos]
            if not closed:
                return deltas
            if self.check is not None:
                self.check(call["name"], call["arguments"])
            deltas.append({"index": len(self.calls) - 1, "function": {"arguments": call["arguments"]}})
            self.depth = -1

    def flush(self) -> list[dict]:
        """The arguments of a call cut off by max_tokens (incomplete, so not validated; finish_reason 'length')."""
        if self.depth < 0 or not self.calls or not self.calls[-1]["arguments"]:
            return []
        return [{"index": len(self.calls) - 1, "function": {"arguments": self.calls[-1]["arguments"]}}]


# ---------------------------------------------------------------------------------------------------
# Jobs and sequences
# ---------------------------------------------------------------------------------------------------


@dataclass
class Spec:
    """Everything the worker needs for one request (already validated)."""
    prompts: list[list[int]]
    n: int
    params: SamplingParams
    chat: bool
    first_tokens: list[int] = field(default_factory=list)  # chat: allowed openers of the assistant turn
    tool_grammar: object = None
    json_grammar: object = None
    logprobs: int | None = None
    logit_bias: Tensor | None = None   # (V,) added to every step's logits
    tool_schemas: dict[str, dict] = field(default_factory=dict)

    def check_call(self, name: str, arguments: str) -> None:
        """Validate a generated call against its tool's schema before anything of it is returned."""
        schema = self.tool_schemas.get(name)
        try:
            value = json.loads(arguments)
            if schema is None or not isinstance(value, dict):
                raise ValueError("not a JSON object of a known tool")
            jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)(schema).validate(value)
        except (ValueError, RecursionError, jsonschema.ValidationError) as err:
            raise ApiError(500, f"the model's call of {name!r} does not match the tool's schema "
                           f"({library_message(err)}); it was not returned", code="invalid_tool_call") from None


@dataclass
class Delta:
    index: int
    text: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None


class Job:
    def __init__(self, spec: Spec, loop: asyncio.AbstractEventLoop):
        self.spec = spec
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.arrival = time.perf_counter()
        self.first_token: float | None = None
        self.prompt_tokens = sum(len(p) for p in spec.prompts)
        self.completion_tokens = 0
        self.open = spec.n * len(spec.prompts)

    def emit(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # event loop closed (shutdown)
            self.cancelled = True


def _deliver(items: list[tuple[Job, tuple]]) -> None:
    for job, event in items:
        job.events.put_nowait(event)


class Sequence:
    """One choice being decoded: phase state machine, grammar matcher, text assembly."""

    def __init__(self, job: Job, index: int, ids: "TokenIds", grammars: Grammars | None, tokenizer):
        spec = job.spec
        self.job, self.index, self.ids, self.grammars = job, index, ids, grammars
        self.params = spec.params
        self.phase = "open" if spec.chat else "text"
        self.text = TextState(tokenizer, list(spec.params.stop))
        self.action = ActionStream(spec.check_call)
        self.action_text = TextState(tokenizer, [])
        self.matcher = None
        self.stop_ids = ids.chat_stops if spec.chat else ids.completion_stops
        self.tokens = 0
        self.finish: str | None = None
        self.made_calls = False
        seed = (spec.params.seed + index) % (1 << 63) if spec.params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed)

    def choose(self, raw: Tensor) -> int:
        """raw (1, V) -> next token, constrained by the current phase."""
        bias = self.job.spec.logit_bias
        logits = raw + bias if bias is not None else raw.clone()
        if self.phase == "open":
            allowed = torch.full_like(logits, float("-inf"))
            allowed[0, self.job.spec.first_tokens] = logits[0, self.job.spec.first_tokens]
            logits = allowed
        elif self.phase in ("json", "action"):
            self.grammars.mask(self.matcher, logits, self.ids.end_response if self.phase == "json" else self.ids.end_action)
        return int(sample(logits, self.params, self.generator))

    def advance(self, token: int, raw: Tensor) -> Delta:
        """Take the sampled token; return what the client should see."""
        self.tokens += 1
        last = self.tokens >= self.params.max_new_tokens
        delta = Delta(self.index)
        spec = self.job.spec
        if self.phase == "open":
            if token == self.ids.start_action:
                self.phase, self.made_calls = "action", True
                self.matcher = self.grammars.matcher(spec.tool_grammar, self.ids.end_action)
            else:
                self.phase = "json" if spec.json_grammar is not None else "text"
                if self.phase == "json":
                    self.matcher = self.grammars.matcher(spec.json_grammar, self.ids.end_response)
            if last:
                self.finish = "length"
        elif self.phase == "action":
            if not self.matcher.accept_token(token):
                raise RuntimeError(f"grammar rejected token {token} it allowed")
            if token == self.ids.end_action:
                self.finish = "tool_calls"
            else:
                self.action_text.push(token, False, last)
                delta.tool_calls = self.action.feed(self.action_text.ready())
                if last:
                    delta.tool_calls += self.action.flush()
                    self.finish = "length"
        else:
            if self.phase == "json" and not self.matcher.accept_token(token):
                raise RuntimeError(f"grammar rejected token {token} it allowed")
            is_stop = token in self.stop_ids if self.phase == "text" else token == self.ids.end_response
            if spec.logprobs is not None and not is_stop:
                delta.logprobs.append(self.ids.logprob_entry(raw, token, spec.logprobs))
            self.text.push(token, is_stop, last)
            delta.text = self.text.ready()
            self.finish = self.text.finish
        delta.finish_reason = self.finish
        return delta


class TokenIds:
    """Ids of the chat markers in this tokenizer, and per-token bytes for logprobs."""

    def __init__(self, tokenizer, vocab_size: int, token_bytes: list[bytes]):
        def tid(t):
            i = tokenizer.convert_tokens_to_ids(t)
            return i if isinstance(i, int) and i != tokenizer.unk_token_id and 0 <= i < vocab_size else None

        self.start_response, self.end_response = tid(chat.START_RESPONSE), tid(chat.END_RESPONSE)
        self.start_action, self.end_action = tid(chat.START_ACTION), tid(chat.END_ACTION)
        eos = tokenizer.eos_token_id
        self.chat_stops = {i for i in (self.end_response, tid(chat.END_TURN), eos) if i is not None}
        self.completion_stops = {i for i in (eos, tid(chat.END_TURN)) if i is not None}
        self.token_bytes = token_bytes

    def logprob_entry(self, raw: Tensor, token: int, top: int) -> dict:
        lp = torch.log_softmax(raw[0].float(), -1)

        def one(i: int) -> dict:
            b = self.token_bytes[i] if i < len(self.token_bytes) else b""
            return {"token": b.decode("utf-8", errors="replace"), "logprob": float(lp[i]), "bytes": list(b)}

        entry = one(token)
        entry["top_logprobs"] = [one(i) for i in lp.topk(top).indices.tolist()] if top else []
        return entry


# ---------------------------------------------------------------------------------------------------
# Engine: one worker thread, continuous batching over the recurrent state
# ---------------------------------------------------------------------------------------------------


class Engine:
    def __init__(self, model, tokenizer, limits: Limits, metrics: Metrics):
        self.model, self.tokenizer, self.limits, self.metrics = model, tokenizer, limits, metrics
        vocab = model.cfg.vocab_size
        self.grammars = Grammars(tokenizer, vocab, limits, metrics)
        self.ids = TokenIds(tokenizer, vocab, [bytes(b) if isinstance(b, bytes) else str(b).encode()
                                               for b in self.grammars.info.decoded_vocab])
        self.pending: queue.Queue[Job] = queue.Queue(maxsize=limits.max_queue)
        self.held: Job | None = None  # taken from the queue, waiting for room in the next prefill
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="aetheris-decode", daemon=True)
        self.threads_before = torch.get_num_threads()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)
        torch.set_num_threads(self.threads_before)  # the setting is process-wide (matters when embedded)

    def submit(self, job: Job) -> None:
        try:
            self.pending.put_nowait(job)
        except queue.Full:
            self.metrics.errors.labels("queue_full").inc()
            raise ApiError(429, f"The server is busy ({self.limits.max_queue} requests waiting); retry shortly.",
                           code="queue_full") from None
        self.metrics.queue_depth.set(self.pending.qsize())

    def _prefill(self, jobs: list[Job]) -> tuple[list[Sequence], Tensor, AetherisCache]:
        """All newly admitted prompts in one left-padded chunked-scan pass; each prompt's state is then
        repeated for its n choices."""
        prompts = [ids for job in jobs for ids in job.spec.prompts]
        device = self.model.embed.weight.device
        input_ids, mask = left_pad(prompts, self.tokenizer.pad_token_id or 0, device)
        out = self.model(input_ids, attention_mask=mask if not bool(mask.all()) else None, logits_to_keep=1)
        seqs, rows, p = [], [], 0
        for job in jobs:
            for k in range(len(job.spec.prompts)):
                rows += [p] * job.spec.n
                seqs += [Sequence(job, k * job.spec.n + j, self.ids, self.grammars, self.tokenizer)
                         for j in range(job.spec.n)]
                p += 1
        rows_t = torch.tensor(rows, device=device)
        return seqs, out.logits[:, -1].float()[rows_t], out.cache.select(rows_t)

    @torch.no_grad()
    def _loop(self) -> None:
        # Leave a core to the event loop: OpenMP threads spinning at their barriers while the HTTP side
        # holds a core and the GIL slow decoding ~50x on a 2-core CPU (measured; see docs/SERVING.md).
        torch.set_num_threads(self.limits.threads or max(1, (os.cpu_count() or 2) - 1))
        seqs: list[Sequence] = []
        logits: Tensor | None = None
        cache: AetherisCache | None = None
        while not self.stopping.is_set():
            # 1. Admit waiting jobs (block briefly when idle) and prefill them together, once.
            # The padded prefill is bounded (rows x longest prompt <= prefill_tokens); a job that would
            # exceed it waits for the next step (``held``), so one long prompt never stalls the batch for long.
            admitted, room, rows, longest = [], self.limits.max_batch - len(seqs), 0, 0
            while room > 0:
                job, self.held = self.held, None
                try:
                    job = job or (self.pending.get(timeout=0.05) if not (seqs or admitted) else self.pending.get_nowait())
                except queue.Empty:
                    break
                if job.cancelled:
                    continue
                new_rows, new_longest = rows + len(job.spec.prompts), max([longest, *map(len, job.spec.prompts)])
                if admitted and new_rows * new_longest > self.limits.prefill_tokens:
                    self.held = job
                    break
                admitted.append(job)
                room, rows, longest = room - job.open, new_rows, new_longest
            self.metrics.queue_depth.set(self.pending.qsize())
            if admitted:
                try:
                    new, new_logits, new_cache = self._prefill(admitted)
                except Exception as err:  # noqa: BLE001 - reported to the clients, the worker keeps serving
                    self.metrics.errors.labels("prefill").inc()
                    for job in admitted:
                        job.emit(("error", ApiError(500, f"prefill failed: {library_message(err)}")))
                else:
                    seqs += new
                    logits = new_logits if logits is None else torch.cat([logits, new_logits])
                    cache = new_cache if cache is None else cache.cat(new_cache)
            self.metrics.active.set(len(seqs))
            if not seqs:
                continue
            # 2. One token per running sequence (per-row sampling: each has its own seed and constraints).
            tokens, keep, by_job = [], [], {}
            now = time.perf_counter()
            for i, s in enumerate(seqs):
                if s.job.cancelled:
                    continue
                try:
                    tok = s.choose(logits[i:i + 1])
                    delta = s.advance(tok, logits[i:i + 1])
                except Exception as err:  # noqa: BLE001
                    self.metrics.errors.labels("decode").inc()
                    s.job.cancelled = True
                    s.job.emit(("error", err if isinstance(err, ApiError) else
                                ApiError(500, f"decoding failed: {library_message(err)}")))
                    continue
                job = s.job
                job.completion_tokens += 1
                if job.first_token is None:
                    job.first_token = now
                    self.metrics.ttft.observe(now - job.arrival)
                by_job.setdefault(id(job), (job, []))[1].append(delta)
                if s.finish is None:
                    keep.append(i)
                    tokens.append(tok)
                else:
                    job.open -= 1
            outbox: dict[asyncio.AbstractEventLoop, list] = {}  # one wake-up per event loop per step, not per job
            for job, deltas in by_job.values():
                outbox.setdefault(job.loop, []).append((job, ("deltas", deltas)))
                if job.open == 0:
                    elapsed = max(time.perf_counter() - (job.first_token or job.arrival), 1e-9)
                    self.metrics.completion_tokens.inc(job.completion_tokens)
                    self.metrics.prompt_tokens.inc(job.prompt_tokens)
                    if job.completion_tokens > 1:
                        self.metrics.tokens_per_second.observe(job.completion_tokens / elapsed)
                    outbox[job.loop].append((job, ("done", {
                        "prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
                        "total_tokens": job.prompt_tokens + job.completion_tokens})))
            for loop, items in outbox.items():
                try:
                    loop.call_soon_threadsafe(_deliver, items)
                except RuntimeError:  # event loop closed (shutdown)
                    for job, _ in items:
                        job.cancelled = True
            # 3. Finished and cancelled rows leave the batch; the rest advance by one recurrent step.
            if len(keep) < len(seqs):
                seqs = [seqs[i] for i in keep]
                if not seqs:
                    logits = cache = None
                    continue
                cache = cache.select(torch.tensor(keep))
            logits = self.model.step(torch.tensor(tokens, dtype=torch.long, device=self.model.embed.weight.device),
                                     cache).float()


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("aetheris_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.prompt_tokens = Counter("aetheris_prompt_tokens", "prompt tokens processed", registry=r)
        self.completion_tokens = Counter("aetheris_completion_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("aetheris_time_to_first_token_seconds", "request arrival to first generated token",
                              buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.tokens_per_second = Histogram("aetheris_tokens_per_second", "per-request decode rate after the first token",
                                           buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500), registry=r)
        self.queue_depth = Gauge("aetheris_queue_depth", "requests waiting for the decode worker", registry=r)
        self.active = Gauge("aetheris_active_sequences", "sequences in the running decode batch", registry=r)
        self.errors = Counter("aetheris_errors", "errors by kind", ["kind"], registry=r)
        self.compile_seconds = Histogram("aetheris_grammar_compile_seconds", "one request's grammar compilation",
                                         buckets=(.001, .01, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
