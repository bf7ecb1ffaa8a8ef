"""The HTTP side of ``aetheris serve``: FastAPI routes in the OpenAI API's shapes, around the engine.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /health``
(503 while warming up), ``GET /metrics`` (Prometheus), ``/docs`` and ``/openapi.json``. Request and
response shapes, SSE chunks and the error object follow the OpenAI API reference
(platform.openai.com/docs/api-reference/chat/create, /completions/create, /chat-streaming, "Error codes");
the official ``openai`` client is the test driver.

How a request flows:

1. ``Gate`` (ASGI middleware) caps the requests in flight, counts responses by path and status, and
   answers anything that escaped the app in OpenAI's error shape.
2. The route reads the body (size-capped, within a deadline) and hands it, off the event loop, to
   ``specs.Server``: ``schema`` validates it (errors -> ``{"error": {message, type, param, code}}``), then
   the prompt is rendered and tokenised and the grammars it needs are compiled.
3. The ``Job`` goes on the engine's bounded queue (full -> 429); ``engine`` decodes it with the others.
4. Its events become one response (``collect``) or SSE chunks (``stream``) -- one writer and one
   aggregator for both endpoints, which differ only in how a delta becomes a choice. Each waiting request
   polls its connection on a timer: a client that disconnects cancels its job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import playground
from .engine import Delta, Job, Metrics
from .errors import ApiError
from .limits import Limits
from .schema import ChatRequest, CompletionRequest, validation_error
from .specs import Server

DISCONNECT_POLL_S = 0.2  # how often a waiting request checks that its client is still there
KNOWN_PATHS = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(model=None, tokenizer=None, *, loader: Callable[[], tuple] | None = None, model_name: str = "aetheris",
               api_key: str | None = None, limits: Limits | None = None) -> FastAPI:
    """The FastAPI app. Give ``model`` + ``tokenizer`` (ready at once), or a ``loader`` returning them,
    run in the background at startup while ``/health`` answers 503."""
    server = Server(model_name, limits or Limits(), api_key)

    @asynccontextmanager
    async def lifespan(app):
        def load():
            try:
                m, t = (model, tokenizer) if loader is None else loader()
                server.load(m, t)
            except Exception as err:  # noqa: BLE001
                server.load_error = err
        if loader is None:
            load()
            if server.load_error is not None:
                raise server.load_error
        else:
            threading.Thread(target=load, daemon=True).start()
        yield
        if server.engine is not None:
            server.engine.stop()

    # No slash redirects (a POST answered with 307 is lost on many clients: the trailing slash is
    # dropped by the Gate instead); the docs routes are defined below, behind the API key.
    app = FastAPI(title="Aetheris", lifespan=lifespan, redirect_slashes=False, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server
    app.add_middleware(Gate, server=server)

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        if err.status >= 400:
            server.metrics.errors.labels(err.code or err.type).inc()
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err: RequestValidationError):
        return await _api_error(request, validation_error(list(err.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return error_response(ApiError(err.status_code, str(err.detail), code=code))

    # --- routes ------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if server.engine is None:
            detail = f"failed to load: {server.load_error}" if server.load_error else "loading"
            return JSONResponse({"status": detail}, status_code=503)
        return {"status": "ok"}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request):
        authorize(server, request)
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request):
        authorize(server, request)
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Aetheris API")

    @app.get("/metrics")
    async def metrics(request: Request):
        authorize(server, request)
        if server.engine is not None:
            server.metrics.queue_depth.set(server.engine.pending.qsize())
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "aetheris"}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(server, request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str, request: Request):
        authorize(server, request)
        if name != server.model_name:
            raise ApiError(404, f"The model '{name[:100]}' does not exist.", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions", openapi_extra=_request_body(ChatRequest))
    async def chat_completions(request: Request):
        job, (spec, req) = await submit(server, request, server.chat_spec)
        head = _head(server, "chatcmpl-", "chat.completion.chunk")
        if req.stream:
            def choices(d: Delta) -> list[dict]:
                delta = {}
                if d.text:
                    delta["content"] = d.text
                if d.tool_calls:
                    delta["tool_calls"] = d.tool_calls
                lp = {"content": d.logprobs, "refusal": None} if spec.logprobs is not None and d.logprobs else None
                out = []
                if delta:
                    out.append({"index": d.index, "delta": delta, "logprobs": lp, "finish_reason": None})
                    lp = None
                if d.finish_reason is not None:
                    out.append({"index": d.index, "delta": {}, "logprobs": lp, "finish_reason": d.finish_reason})
                return out
            opening = [{"index": i, "delta": {"role": "assistant", "content": "", "refusal": None}, "logprobs": None,
                        "finish_reason": None} for i in range(spec.n)]
            return stream(server, job, request, head, req.include_usage, opening, choices)
        collected = await collect(job, request, spec.n)
        if collected is None:  # client went away
            return Response(status_code=499)
        results, usage = collected
        out = []
        for i, c in enumerate(results):
            message = {"role": "assistant", "content": c.text if (c.text or not c.calls) else None, "refusal": None}
            if c.calls:
                message["tool_calls"] = [c.calls[k] for k in sorted(c.calls)]
            out.append({"index": i, "message": message, "finish_reason": c.finish,
                        "logprobs": {"content": c.logprobs, "refusal": None} if spec.logprobs is not None else None})
        return {**head, "object": "chat.completion", "choices": out, "usage": usage}

    @app.post("/v1/completions", openapi_extra=_request_body(CompletionRequest))
    async def completions(request: Request):
        job, (spec, req, prompt_texts) = await submit(server, request, server.completion_spec)
        head = _head(server, "cmpl-", "text_completion")
        n_choices = spec.n * len(spec.prompts)
        echoed = [prompt_texts[i // spec.n] if req.echo else "" for i in range(n_choices)]
        if req.stream:
            offsets = [len(text) for text in echoed]

            def choices(d: Delta) -> list[dict]:
                if not d.text and d.finish_reason is None:
                    return []
                lp = completion_logprobs(d.logprobs, offsets[d.index]) if spec.logprobs is not None else None
                offsets[d.index] += len(d.text)
                return [{"index": d.index, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason}]
            opening = [{"index": i, "text": text, "logprobs": None, "finish_reason": None}
                       for i, text in enumerate(echoed)] if req.echo else []
            return stream(server, job, request, head, req.include_usage, opening, choices)
        collected = await collect(job, request, n_choices)
        if collected is None:  # client went away
            return Response(status_code=499)
        results, usage = collected
        out = [{"index": i, "text": echoed[i] + c.text, "finish_reason": c.finish,
                "logprobs": completion_logprobs(c.logprobs, 0) if spec.logprobs is not None else None}
               for i, c in enumerate(results)]
        return {**head, "choices": out, "usage": usage}

    playground.add_routes(app)  # GET /: the chat playground page, GET /static/{name}: its script and styles
    return app


# ---------------------------------------------------------------------------------------------------
# Request plumbing shared by the routes
# ---------------------------------------------------------------------------------------------------


def error_response(err: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status in (429, 503) else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _request_body(model) -> dict:
    """The request body's schema for /openapi.json (the route reads the body itself, with size caps)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _head(server: Server, prefix: str, kind: str) -> dict:
    return {"id": prefix + secrets.token_hex(12), "object": kind, "created": int(time.time()),
            "model": server.model_name, "system_fingerprint": server.fingerprint}


def authorize(server: Server, request: Request) -> None:
    if server.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # The scheme is case-insensitive (RFC 9110 §11.1); the key is compared in constant time.
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), server.api_key.encode()):
        raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                       code="invalid_api_key")


async def read_json(server: Server, request: Request) -> dict:
    """The body as a JSON object: at most max_body_bytes, within body_timeout_s, UTF-8, no NaN/Infinity."""
    cap = server.limits.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > cap):
        raise ApiError(413, f"Request body is larger than {cap} bytes.", code="request_too_large")
    raw = bytearray()

    async def read() -> None:
        async for chunk in request.stream():
            raw.extend(chunk)
            if len(raw) > cap:
                raise ApiError(413, f"Request body is larger than {cap} bytes.", code="request_too_large")
    try:  # a client trickling its body byte by byte must not hold the connection for ever
        await asyncio.wait_for(read(), server.limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"The request body did not arrive within {server.limits.body_timeout_s:g} s.",
                       code="request_timeout") from None
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"Request body is not valid UTF-8 (byte {err.start}).", code="invalid_utf8") from None

    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")
    try:
        body = json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError) as err:
        raise ApiError(400, f"We could not parse the JSON body of your request ({str(err)[:200]}). "
                       "Send a JSON object.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


async def submit(server: Server, request: Request, build) -> tuple[Job, tuple]:
    """Authorize, read, validate and prepare (off the event loop), then queue the job."""
    authorize(server, request)
    body = await read_json(server, request)
    engine = server.ready()
    built = await run_in_threadpool(build, body)  # tokenising and grammar compiling stay off the event loop
    job = Job(built[0], asyncio.get_running_loop())
    engine.submit(job)
    return job, built


async def watch_disconnect(job: Job, request: Request) -> None:
    """Poll the connection on a timer, whatever the request kind: a client that went away (a closed
    stream, an abandoned non-streaming request, one still waiting in the queue) cancels its job."""
    while True:
        await asyncio.sleep(DISCONNECT_POLL_S)
        if await request.is_disconnected():
            job.cancelled = True
            job.events.put_nowait(("gone", None))
            return


async def wait_events(job: Job, request: Request) -> AsyncIterator:
    """The job's events until it is done, failed, or its client went away (then it is cancelled)."""
    watcher = asyncio.create_task(watch_disconnect(job, request))
    try:
        while True:
            event = await job.events.get()
            if event[0] == "gone":
                return
            yield event
            if event[0] in ("done", "error"):
                return
    finally:
        watcher.cancel()
        job.cancelled = True


# ---------------------------------------------------------------------------------------------------
# Responses: one aggregator and one SSE writer for both endpoints
# ---------------------------------------------------------------------------------------------------


@dataclass
class Collected:
    """One choice put together from its deltas."""
    text: str = ""
    calls: dict[int, dict] = field(default_factory=dict)  # tool-call index -> {id, type, function}
    logprobs: list[dict] = field(default_factory=list)
    finish: str | None = None

    def add(self, d: Delta) -> None:
        self.text += d.text
        self.logprobs += d.logprobs
        for tc in d.tool_calls:
            entry = self.calls.setdefault(tc["index"], {"id": None, "type": "function",
                                                        "function": {"name": "", "arguments": ""}})
            entry["id"] = tc.get("id", entry["id"])
            entry["function"]["name"] += tc.get("function", {}).get("name", "")
            entry["function"]["arguments"] += tc.get("function", {}).get("arguments", "")
        if d.finish_reason is not None:
            self.finish = d.finish_reason


async def collect(job: Job, request: Request, n_choices: int) -> tuple[list[Collected], dict] | None:
    """Every choice of a finished job and its usage; None when the client went away; an error is raised."""
    choices = [Collected() for _ in range(n_choices)]
    async for event in wait_events(job, request):
        if event[0] == "error":
            raise event[1]
        if event[0] == "done":
            return choices, event[1]
        for d in event[1]:
            choices[d.index].add(d)
    return None


def stream(server: Server, job: Job, request: Request, head: dict, include_usage: bool, opening: list[dict],
           choices: Callable[[Delta], list[dict]]) -> StreamingResponse:
    """An SSE response: the ``opening`` choices, then ``choices(delta)`` for every delta (one chunk each),
    the usage chunk when asked for, and ``[DONE]``; an error becomes an error event that ends the stream."""
    def chunk(choice_list: list[dict], usage: dict | None = None) -> str:
        out = {**head, "choices": choice_list}
        if include_usage:
            out["usage"] = usage
        return "data: " + json.dumps(out, ensure_ascii=False) + "\n\n"

    async def events() -> AsyncIterator[str]:
        for choice in opening:
            yield chunk([choice])
        async for event in wait_events(job, request):
            if event[0] == "error":
                yield "data: " + json.dumps(event[1].body()) + "\n\n"
                return
            if event[0] == "done":
                if include_usage:
                    yield chunk([], event[1])
                yield "data: [DONE]\n\n"
                return
            for d in event[1]:
                for choice in choices(d):
                    yield chunk([choice])
    return StreamingResponse(_cancel_on_exit(events(), job, server.metrics), media_type="text/event-stream",
                             headers=SSE_HEADERS)


async def _cancel_on_exit(chunks: AsyncIterator[str], job: Job, metrics: Metrics) -> AsyncIterator[str]:
    """SSE body that cancels its job however the stream ends (done, error, or the client went away); a
    fault after the 200 was sent becomes an error event, so the stream still ends cleanly."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as err:  # noqa: BLE001
        metrics.errors.labels("internal").inc()
        error = err if isinstance(err, ApiError) else ApiError(500, f"internal error: {err.__class__.__name__}")
        yield "data: " + json.dumps(error.body()) + "\n\n"
    finally:
        job.cancelled = True


def completion_logprobs(entries: list[dict], offset: int) -> dict:
    """/v1/completions' logprobs layout (parallel lists) from per-token entries starting at text ``offset``."""
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        tokens.append(e["token"])
        lps.append(e["logprob"])
        tops.append({t["token"]: t["logprob"] for t in e["top_logprobs"]})
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


# ---------------------------------------------------------------------------------------------------
# Middleware
# ---------------------------------------------------------------------------------------------------


class Gate:
    """Pure ASGI middleware (so streaming is untouched): drops a trailing slash, caps the requests in
    flight (503 in OpenAI's shape), turns any exception that escaped the app into a 500 in OpenAI's shape
    instead of a reset connection, and counts responses by path and status."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path.rstrip("/") or "/", "raw_path": scope.get("raw_path", b"").rstrip(b"/")}
        status, started = 500, False

        async def send_status(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        async def send_error(err: ApiError) -> None:
            body = json.dumps(err.body()).encode()
            await send_status({"type": "http.response.start", "status": err.status, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send_status({"type": "http.response.body", "body": body})

        limits, metrics = self.server.limits, self.server.metrics
        self.in_flight += 1
        try:
            if self.in_flight > limits.max_connections:
                metrics.errors.labels("too_many_requests").inc()
                await send_error(ApiError(503, f"The server is handling {limits.max_connections} requests already; "
                                          "retry shortly.", code="server_overloaded"))
                return
            await self.app(scope, receive, send_status)
        except Exception as err:  # noqa: BLE001 - the last line of defence: log it, answer in OpenAI's shape
            metrics.errors.labels("internal").inc()
            logging.getLogger("aetheris.serve").error("unhandled error on %s", path, exc_info=err)
            if not started:
                await send_error(ApiError(500, f"internal error: {err.__class__.__name__}"))
        finally:
            self.in_flight -= 1
            label = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
            metrics.requests.labels(label, str(status)).inc()
