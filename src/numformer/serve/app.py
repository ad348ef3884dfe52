"""The HTTP routes (Starlette): OpenAI's completions, embeddings and models, and a health check.

    GET  /health             {"status": "ok", "model": ..., "queued": ...}
    GET  /v1/models          the one model this server serves
    GET  /v1/models/{id}
    POST /v1/completions     text completion (GPT-2 models); "stream": true for server-sent events
    POST /v1/embeddings      sentence embeddings (BERT models)

Handlers only parse, check and wait: tokenizing runs in Starlette's thread
pool, model work on the engine's thread (:mod:`numformer.serve.engine`).
Every error a client can cause is a 4xx with an OpenAI error object; an
unexpected failure is a 500 with one, and the server goes on serving.

An unexpected exception must not escape the app: Starlette's outermost
middleware would send the 500 and then re-raise, and uvicorn closes the
connection of a response that has started, so the client's next request on
that keep-alive connection meets a reset. :class:`_CatchAll` answers the 500
itself (and logs the traceback) and leaves the connection usable.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from numformer.serve.engine import Delta, Done, Embeddings, Engine, Failed, Finish, Job
from numformer.serve.errors import APIError, invalid, not_found, server_error
from numformer.serve.models import COMPLETION, EMBEDDING, ServedModel, check_embedding_inputs, plan_completion
from numformer.serve.protocol import Limits, parse_completion, parse_embedding, parse_json

log = logging.getLogger("numformer.serve")


# ----------------------------------------------------------------------------- request plumbing


async def read_json(request: Request, limits: Limits) -> dict:
    """The body as a JSON object.

    Refuses a declared media type other than JSON (415), more than
    ``limits.max_body_bytes`` bytes before reading them all (413), and a body
    that has not arrived in full ``limits.body_timeout`` seconds after the
    headers (408, and the connection is closed: the rest of that body
    would otherwise be read as the next request).
    """
    _check_content_type(request.headers.get("content-type"))
    limit = limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise invalid("the Content-Length header is not a number")
        if int(declared) > limit:
            raise _too_large(int(declared), limit)
    body = bytearray()
    try:
        with anyio.fail_after(limits.body_timeout):     # (asyncio.timeout needs Python 3.11)
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise _too_large(len(body), limit)
    except ClientDisconnect:
        raise invalid("the client disconnected before sending the whole body") from None
    except TimeoutError:
        got = f" of the {declared} declared" if declared is not None else ""
        raise APIError(f"the request body did not arrive within {limits.body_timeout:g} s (received {len(body)} "
                       f"bytes{got}); the connection is closed", status=408, code="request_timeout",
                       headers={"Connection": "close"}) from None
    return parse_json(bytes(body))


def _check_content_type(value: str | None) -> None:
    """No Content-Type, or JSON (``application/json``, ``application/*+json``) in UTF-8; else 415."""
    if value is None:
        return
    media, *params = [part.strip().lower() for part in value.split(";")]
    charset = next((p.partition("=")[2].strip('"') for p in params if p.startswith("charset=")), "utf-8")
    if (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))) \
            and charset in ("utf-8", "utf8"):
        return
    raise APIError(f"the request body must be JSON in UTF-8 (Content-Type: application/json), got "
                   f"Content-Type {value[:80]!r}", status=415, code="unsupported_media_type")


def _too_large(size: int, limit: int) -> APIError:
    return APIError(f"the request body has at least {size} bytes; this server accepts at most {limit}",
                    status=413, code="request_too_large")


def _check_auth(request: Request) -> None:
    key = request.app.state.api_key
    sent = request.headers.get("authorization", "").encode()
    if key is not None and not hmac.compare_digest(sent, f"Bearer {key}".encode()):
        raise APIError("missing or wrong API key (send 'Authorization: Bearer KEY')", status=401,
                       code="invalid_api_key")


def _check_model(served: ServedModel, name: str, kind: str) -> None:
    if name != served.name:
        raise not_found(f"the model '{name}' does not exist; this server serves '{served.name}'",
                        param="model", code="model_not_found")
    if served.kind != kind:
        if kind == EMBEDDING:
            raise invalid(f"'{served.name}' is a text-generation model; /v1/embeddings needs an encoder "
                          "(BERT) model", param="model", code="wrong_model_kind")
        raise invalid(f"'{served.name}' is an embedding model; /v1/completions needs a text-generation "
                      "(GPT-2) model", param="model", code="wrong_model_kind")


class _Events:
    """Hands events from the engine thread to this request's coroutine."""

    def __init__(self):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, event) -> None:                  # called on the engine thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def get(self):
        return await self._queue.get()


def _submit(request: Request, kind: str, **work) -> tuple[Job, _Events]:
    events = _Events()
    job = Job(kind, events.put, **work)
    request.app.state.engine.submit(job)
    return job, events


def _dumps(payload) -> str:
    """JSON text that is always valid UTF-8.

    Non-ASCII text is written as is, except where a lone surrogate came in
    from the request (a model name or field name echoed in an error): UTF-8
    cannot encode it, so that payload is written with ASCII escapes.
    """
    text = json.dumps(payload, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(payload)
    return text


def _json(payload: dict, status: int = 200, headers: dict | None = None) -> Response:
    return Response(_dumps(payload), status_code=status, media_type="application/json", headers=headers)


def _usage(prompt_tokens: int, completion_tokens: int | None = None) -> dict:
    if completion_tokens is None:                  # embeddings
        return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ----------------------------------------------------------------------------- routes


async def health(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    ok = engine.running
    return _json({"status": "ok" if ok else "unavailable", "model": request.app.state.served.name,
                  "queued": engine.queued}, 200 if ok else 503)


def _model_card(served: ServedModel) -> dict:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "numformer"}


async def list_models(request: Request) -> Response:
    _check_auth(request)
    return _json({"object": "list", "data": [_model_card(request.app.state.served)]})


async def get_model(request: Request) -> Response:
    _check_auth(request)
    served = request.app.state.served
    name = request.path_params["model"]
    if name != served.name:
        raise not_found(f"the model '{name}' does not exist; this server serves '{served.name}'",
                        param="model", code="model_not_found")
    return _json(_model_card(served))


async def completions(request: Request) -> Response:
    _check_auth(request)
    served: ServedModel = request.app.state.served
    limits: Limits = request.app.state.limits
    req = parse_completion(await read_json(request, limits), limits)
    _check_model(served, req.model, COMPLETION)
    rows, prompt_tokens = await run_in_threadpool(plan_completion, served, req)
    job, events = _submit(request, COMPLETION, rows=rows)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": served.name, "system_fingerprint": None}
    if req.stream:
        return StreamingResponse(_stream_completion(job, events, head, prompt_tokens, req.include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    texts = {r.index: [] for r in rows}
    finish: dict[int, str] = {}
    completion_tokens = 0
    try:
        while True:
            ev = await events.get()
            if isinstance(ev, Delta):
                texts[ev.index].append(ev.text)
            elif isinstance(ev, Finish):
                finish[ev.index] = ev.reason
                completion_tokens += ev.completion_tokens
            elif isinstance(ev, Failed):
                raise ev.error
            elif isinstance(ev, Done):
                break
    finally:
        job.cancel()                               # no-op when done; stops the work if we were cancelled
    choices = [{"text": "".join(texts[i]), "index": i, "logprobs": None, "finish_reason": finish[i]}
               for i in sorted(texts)]
    return _json({**head, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)})


def _sse(payload) -> str:
    return f"data: {_dumps(payload)}\n\n"


async def _stream_completion(job: Job, events: _Events, head: dict, prompt_tokens: int, include_usage: bool):
    """Server-sent events: one chunk per text delta, a chunk with the finish reason per choice,
    optionally a usage chunk, then ``data: [DONE]``.

    The 200 and its headers are sent by now, so a failure here cannot become
    an error status: it is an error event, and the stream still ends cleanly
    (an exception escaping would make uvicorn drop the connection mid-body).
    Everything a client can get wrong was checked before the stream started.
    """
    completion_tokens = 0
    try:
        try:
            while True:
                ev = await events.get()
                if isinstance(ev, Delta):
                    yield _sse({**head, "choices": [{"text": ev.text, "index": ev.index, "logprobs": None,
                                                     "finish_reason": None}]})
                elif isinstance(ev, Finish):
                    completion_tokens += ev.completion_tokens
                    yield _sse({**head, "choices": [{"text": "", "index": ev.index, "logprobs": None,
                                                     "finish_reason": ev.reason}]})
                elif isinstance(ev, Failed):
                    yield _sse(ev.error.to_dict())
                    break
                elif isinstance(ev, Done):
                    if include_usage:
                        yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
                    break
        except Exception as exc:                   # a bug of ours: say so in-band, end the stream cleanly
            log.exception("streamed completion failed")
            yield _sse(server_error(f"internal error ({type(exc).__name__})").to_dict())
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()                               # the client left (or we are done): drop its rows


async def embeddings(request: Request) -> Response:
    _check_auth(request)
    served: ServedModel = request.app.state.served
    limits: Limits = request.app.state.limits
    req = parse_embedding(await read_json(request, limits), limits)
    _check_model(served, req.model, EMBEDDING)
    prompt_tokens = await run_in_threadpool(check_embedding_inputs, served, req)
    job, events = _submit(request, EMBEDDING, texts=req.inputs)
    vectors = None
    try:
        while True:
            ev = await events.get()
            if isinstance(ev, Embeddings):
                vectors = ev.vectors
            elif isinstance(ev, Failed):
                raise ev.error
            elif isinstance(ev, Done):
                break
    finally:
        job.cancel()

    def render() -> bytes:                         # up to max_inputs × dim floats: off the event loop
        if req.encoding_format == "base64":
            data = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
        else:
            data = vectors.astype(float).tolist()
        payload = {"object": "list", "model": served.name, "usage": _usage(prompt_tokens),
                   "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)]}
        return json.dumps(payload).encode("utf-8")

    return Response(await run_in_threadpool(render), media_type="application/json")


# ----------------------------------------------------------------------------- errors


async def _api_error(request: Request, exc: APIError) -> Response:
    return _json(exc.to_dict(), exc.status, exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        err = not_found(f"no route {request.method} {request.url.path} (see /v1/models, /v1/completions, "
                        "/v1/embeddings, /health)")
    elif exc.status_code == 405:
        err = APIError(f"method {request.method} is not allowed on {request.url.path}", status=405)
    else:
        err = APIError(str(exc.detail), status=exc.status_code)
    return _json(err.to_dict(), err.status)


class _CatchAll:
    """ASGI middleware: an exception no handler took becomes a logged 500 with an OpenAI error body.

    It sits inside Starlette's ServerErrorMiddleware, which would send a 500
    too but then re-raise, and uvicorn closes the connection of a response
    that has started: the client's next request on that keep-alive
    connection would meet a reset. Here the exception stops, and the
    connection stays usable. If the response had already started (a body
    cut short), re-raising is the only honest end: uvicorn closes the
    connection, and the client sees a truncated response, not a complete one.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as exc:
            log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            await _json(server_error(f"internal error ({type(exc).__name__})").to_dict(), 500)(scope, receive, send)


# ----------------------------------------------------------------------------- the app


def create_app(served: ServedModel, *, limits: Limits = Limits(), max_batch_rows: int = 32,
               max_queue: int = 256, api_key: str | None = None) -> Starlette:
    """The ASGI app serving ``served``; the engine thread starts and stops with the app's lifespan.

    ``api_key``: when set, /v1 routes require ``Authorization: Bearer api_key``.
    """
    engine = Engine(served, max_batch_rows=max_batch_rows, max_queue=max_queue)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(_CatchAll)],
                    exception_handlers={APIError: _api_error, HTTPException: _http_error})
    app.state.served = served
    app.state.engine = engine
    app.state.limits = limits
    app.state.api_key = api_key
    return app
