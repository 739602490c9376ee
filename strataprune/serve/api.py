"""The HTTP routes: OpenAI-compatible completions and chat completions, models, health, metrics, the page.

    POST /v1/completions        {"prompt": "...", "max_tokens": 32, "stream": false, ...}
    POST /v1/chat/completions   {"messages": [{"role": "user", "content": "..."}], ...}
    GET  /v1/models  /health  /metrics  /

Streaming answers are server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``); the last
chunk carries ``finish_reason`` and ``usage``. Every error is OpenAI's error object with the
offending field in ``param``. With an API key set, /v1/* and /metrics need ``Authorization: Bearer KEY``
(compared in constant time); /health and / stay open so that load balancers and browsers can reach them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from strataprune.serve.metrics import ServeMetrics
from strataprune.serve.protocol import (
    DEFAULT_COMPLETION_TOKENS,
    ApiError,
    GenerationRequest,
    bad,
    parse_chat,
    parse_completion,
    parse_json,
)
from strataprune.serve.scheduler import Draining, Event, Overloaded, Scheduler, Sequence

#: seconds between checks that a client of a non-streaming request is still there (and SSE keep-alives)
POLL_SECONDS = 0.5
#: the response header naming the server copy that answered (several behind a load balancer or Ray Serve's proxy)
REPLICA_HEADER = "X-Strataprune-Replica"


@dataclass
class ServerState:
    """What the routes share; ``status`` goes loading -> ok (or error) -> draining."""

    metrics: ServeMetrics
    timeout: float
    max_body_bytes: int
    api_key: str | None = None
    status: str = "loading"
    error: str = ""
    model: Any = None
    scheduler: Scheduler | None = None
    started: float = field(default_factory=time.time)
    #: which copy of the server answers (host/pid, or a Ray Serve replica's id): /health and an X-Strataprune-Replica header
    replica: str = ""

    def ready(self) -> tuple[Any, Scheduler]:
        if self.status == "draining":
            raise ApiError(503, "the server is shutting down", code="shutting_down", kind="server_error")
        if self.status != "ok" or self.model is None or self.scheduler is None:
            message = "the model is still loading" if self.status == "loading" else f"the model failed to load: {self.error}"
            raise ApiError(503, message, code="not_ready", kind="server_error", headers={"Retry-After": "5"})
        return self.model, self.scheduler


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def check_key(state: ServerState, request: Request) -> None:
    if not state.api_key:
        return
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(given.encode("utf-8"), state.api_key.encode("utf-8")):
        raise ApiError(
            401, "a valid API key is required: Authorization: Bearer KEY", code="invalid_api_key", kind="authentication_error"
        )


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body of {declared} bytes exceeds the limit of {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body exceeds the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def counted(state: ServerState, endpoint: str, handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
    """The handler with its answers counted by status and ApiErrors turned into OpenAI error bodies."""

    async def wrapped(request: Request) -> Response:
        try:
            response = await handler(request)
        except ApiError as error:
            response = error_response(error)
        except Exception as exc:  # noqa: BLE001 -- bad input must never kill the server
            response = error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error"))
        state.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        if state.replica:
            response.headers[REPLICA_HEADER] = state.replica
        return response

    return wrapped


# --------------------------------------------------------------------------- generation
def prompt_ids(model: Any, request: GenerationRequest) -> list[int]:
    tokenizer = model.tokenizer
    if request.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise bad("messages", "this model's tokenizer has no chat template; use /v1/completions", "no_chat_template")
        try:
            ids = tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # noqa: BLE001 -- a template may refuse a conversation (e.g. roles out of order)
            raise bad("messages", f"the chat template refused them: {exc}", "template_error") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    if isinstance(request.prompt, list):
        top = max(request.prompt)
        if top >= model.vocab_size:
            raise bad("prompt", f"token id {top} is out of range; allowed: 0 .. {model.vocab_size - 1}")
        return list(request.prompt)
    return [int(i) for i in tokenizer.encode(request.prompt)]


def fit_lengths(model: Any, request: GenerationRequest, ids: list[int], chat: bool) -> None:
    """Check the prompt fits the context and settle max_tokens (refusals name the field)."""
    field_name = "messages" if chat else "prompt"
    context = model.context_length
    if not ids:
        raise bad(field_name, "the prompt is empty (0 tokens); give at least one token")
    if len(ids) >= context:
        raise bad(field_name, f"{len(ids)} tokens; the model's context is {context} tokens (the prompt must leave room for one)")
    room = context - len(ids)
    if request.max_tokens is None:
        request.params.max_tokens = min(room, DEFAULT_COMPLETION_TOKENS) if not chat else room
    elif request.max_tokens > room:
        raise bad(
            "max_tokens",
            f"{request.max_tokens} tokens after a {len(ids)}-token prompt exceed the context of {context}; "
            f"allowed: at most {room}",
        )
    else:
        request.params.max_tokens = request.max_tokens


async def start(state: ServerState, request: Request, chat: bool) -> tuple[Any, GenerationRequest, Sequence, asyncio.Queue]:
    model, scheduler = state.ready()
    check_key(state, request)
    body = parse_json(await read_body(request, state.max_body_bytes))
    parsed = parse_chat(body) if chat else parse_completion(body)
    if parsed.model is not None and parsed.model != model.model_id:
        raise ApiError(
            404, f"model '{parsed.model}' is not served here; this server serves '{model.model_id}'", "model", "model_not_found"
        )
    ids = prompt_ids(model, parsed)
    fit_lengths(model, parsed, ids, chat)
    queue: asyncio.Queue[Event] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def sink(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass

    sequence = Sequence(ids, parsed.params, sink, deadline=time.monotonic() + state.timeout)
    try:
        scheduler.submit(sequence)
    except Overloaded:
        raise ApiError(
            429,
            "the server is at capacity (queue full); retry later",
            code="queue_full",
            kind="rate_limit_error",
            headers={"Retry-After": "1"},
        ) from None
    except Draining:
        raise ApiError(503, "the server is shutting down", code="shutting_down", kind="server_error") from None
    return model, parsed, sequence, queue


def _chunk(
    kind: str, ident: str, model_id: str, created: int, text: str | None, finish: str | None, usage: Any, first: bool
) -> dict:
    if kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": ident, "object": obj, "created": created, "model": model_id, "choices": [choice], "usage": usage}


async def generation(state: ServerState, request: Request, chat: bool) -> Response:
    model, parsed, sequence, queue = await start(state, request, chat)
    scheduler = state.scheduler
    assert scheduler is not None
    kind = "chat" if chat else "text"
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    if parsed.stream:
        return StreamingResponse(
            stream_events(scheduler, request, sequence, queue, kind, ident, model.model_id, created),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    parts: list[str] = []
    checked = time.monotonic()
    try:
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), POLL_SECONDS)
            except asyncio.TimeoutError:
                event = None
            if time.monotonic() - checked >= POLL_SECONDS:  # also while tokens keep coming
                checked = time.monotonic()
                if await request.is_disconnected():
                    scheduler.cancel(sequence, "disconnect")
                    return Response(status_code=499)
            if event is None:
                continue
            if event.kind == "text":
                parts.append(event.text)
            elif event.kind == "error":
                assert event.error is not None
                raise event.error
            else:
                break
    except asyncio.CancelledError:
        scheduler.cancel(sequence, "disconnect")
        raise
    text = "".join(parts)
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": event.finish_reason,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": event.finish_reason}
        obj = "text_completion"
    return JSONResponse(
        {"id": ident, "object": obj, "created": created, "model": model.model_id, "choices": [choice], "usage": event.usage}
    )


async def stream_events(
    scheduler: Scheduler,
    request: Request,
    sequence: Sequence,
    queue: asyncio.Queue,
    kind: str,
    ident: str,
    model_id: str,
    created: int,
) -> AsyncIterator[str]:
    first = True
    try:
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), POLL_SECONDS)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    scheduler.cancel(sequence, "disconnect")
                    return
                yield ": keep-alive\n\n"  # a write to a closed connection also tells us the client left
                continue
            if event.kind == "error":
                assert event.error is not None
                yield f"data: {json.dumps(event.error.body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            finish = event.finish_reason if event.kind == "done" else None
            text = event.text if event.kind == "text" else None
            yield f"data: {json.dumps(_chunk(kind, ident, model_id, created, text, finish, event.usage, first))}\n\n"
            first = False
            if event.kind == "done":
                yield "data: [DONE]\n\n"
                return
    finally:
        if not sequence.finished:
            scheduler.cancel(sequence, "disconnect")


# --------------------------------------------------------------------------- the app
def create_app(state: ServerState) -> Starlette:
    async def completions(request: Request) -> Response:
        return await generation(state, request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await generation(state, request, chat=True)

    async def models(request: Request) -> Response:
        model, _ = state.ready()
        check_key(state, request)
        entry = {"id": model.model_id, "object": "model", "created": int(state.started), "owned_by": "strataprune"}
        entry["max_model_len"] = model.context_length
        return JSONResponse({"object": "list", "data": [entry]})

    async def health(request: Request) -> Response:
        body: dict[str, Any] = {"status": state.status}
        if state.replica:
            body["replica"] = state.replica
        if state.error:
            body["error"] = state.error
        model, scheduler = state.model, state.scheduler
        if model is not None and scheduler is not None:
            body.update(
                {
                    "model": model.model_id,
                    "backend": model.backend,
                    "batching": "continuous" if model.runner.batching else "sequential",
                    "batching_note": model.batching_note,
                    "max_running": scheduler.max_running,
                    "context_length": model.context_length,
                    "running": len(scheduler.active),
                    "waiting": len(scheduler.waiting),
                    "max_batch_seen": scheduler.max_batch_seen,
                    "kv_cache_bytes": model.runner.kv_bytes(),
                    "kv_cache_bound_bytes": scheduler.kv_bound_bytes(),
                    **{k: v for k, v in model.info.facts().items() if v is not None},
                }
            )
        return JSONResponse(body, status_code=200 if state.status == "ok" else 503)

    async def metrics(request: Request) -> Response:
        check_key(state, request)
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def page(request: Request) -> Response:
        from strataprune.serve.page import render_page

        return HTMLResponse(render_page(state))

    def route(path: str, endpoint: str, handler: Callable[[Request], Any], methods: list[str]) -> Route:
        return Route(path, counted(state, endpoint, handler), methods=methods)

    routes = [
        route("/v1/completions", "completions", completions, ["POST"]),
        route("/v1/chat/completions", "chat_completions", chat_completions, ["POST"]),
        route("/v1/models", "models", models, ["GET"]),
        route("/health", "health", health, ["GET"]),
        route("/metrics", "metrics", metrics, ["GET"]),
        route("/", "page", page, ["GET"]),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = "no such route" if status == 404 else f"method {request.method} is not allowed here"
        return error_response(
            ApiError(
                status,
                f"{message}: {request.method} {request.url.path}",
                code="not_found" if status == 404 else "method_not_allowed",
            )
        )

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
