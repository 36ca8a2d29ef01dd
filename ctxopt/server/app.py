"""The HTTP side of the gateway: a FastAPI app over a :class:`Gateway`.

Routes: ``POST /v1/chat/completions`` (streamed as server-sent events in OpenAI's chunk format, or not),
``GET /v1/models``, ``GET /health`` (200 only once the model is loaded and the engine lists its model) and
``GET /metrics`` (Prometheus text). With an API key, the ``/v1`` routes need ``Authorization: Bearer <key>``
(compared in constant time); ``/health`` and ``/metrics`` stay open for probes and scrapers.

Every error is OpenAI's error JSON (``{"error": {"message", "type", "param", "code"}}``). A streamed request
waits for its first piece of text before answering, so an error before it (a bad method, a context too long,
the engine down) still gets its HTTP status; an error after it ends the stream with an error event.
"""
from __future__ import annotations

import asyncio
import hmac
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..text import StreamTrimmer
from .gateway import Gateway, Job, ServeConfig, api_error
from .metrics import INVALID
from .schema import ApiError, chunk_body, completion_body, decode_json, parse_chat_request, sse, usage

CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection": counted, never sent


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (by its Content-Length, or while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"The request body has {int(declared)} bytes; the gateway takes at most {limit}.",
                       "invalid_request_error", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"The request body is over {limit} bytes, the most the gateway takes.",
                           "invalid_request_error", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def watch_disconnect(request: Request, job: Job) -> None:
    """Post ("disconnect", None) to the job when the client goes away (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.events.put_nowait(("disconnect", None))
            return


def create_app(config: ServeConfig | None = None, **settings: Any) -> FastAPI:
    """The gateway app for ``config`` (or a ServeConfig built from ``settings``)."""
    config = config if config is not None else ServeConfig(**settings)
    gateway = Gateway(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        gateway.start()
        yield
        await gateway.shutdown()

    app = FastAPI(title="ctxopt gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gateway
    key = config.api_key.encode() if config.api_key else None

    def check_key(request: Request) -> None:
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(given, key):
            raise ApiError(401, "Missing or wrong API key: send Authorization: Bearer <key>.",
                           "authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                                       kind, headers=dict(error.headers or {})))

    @app.get("/health")
    async def health() -> JSONResponse:
        status, body = await gateway.health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type=gateway.metrics.content_type)

    def model_entry() -> dict[str, Any]:
        return {"id": gateway.served_name, "object": "model", "created": 0, "owned_by": "ctxopt"}

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        try:
            check_key(request)
        except ApiError as error:
            return error_response(error)
        return JSONResponse({"object": "list", "data": [model_entry()]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> JSONResponse:
        try:
            check_key(request)
            if name != gateway.served_name:
                raise ApiError(404, f"The gateway serves {gateway.served_name!r}, not {name!r}.", "not_found_error",
                               code="model_not_found", param="model")
        except ApiError as error:
            return error_response(error)
        return JSONResponse(model_entry())

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        method = INVALID
        try:
            check_key(request)
            body = decode_json(await read_body(request, config.max_body_bytes))
            parsed = parse_chat_request(body)
            gateway.check_available()
            if parsed.model is not None and parsed.model != gateway.served_name:
                raise ApiError(404, f"The gateway serves {gateway.served_name!r}, not {parsed.model!r}.",
                               "not_found_error", code="model_not_found", param="model")
            settings = gateway.settings_for(parsed.overrides)
            method = settings.method
            job = gateway.admit(parsed, settings)
        except ClientDisconnect:
            gateway.metrics.failed(method, CLIENT_CLOSED, "client_closed")
            return Response(status_code=CLIENT_CLOSED)
        except ApiError as error:
            gateway.metrics.failed(method, error.status, error.kind)
            return error_response(error)
        watcher = asyncio.create_task(watch_disconnect(request, job))
        gateway.run(job)
        try:
            event = await job.next_event()
            while event[0] == "text" and not parsed.stream:  # not streamed: only the end matters
                event = await job.next_event()
        finally:
            watcher.cancel()
        if event[0] == "text":
            return StreamingResponse(stream(job, event), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        if event[0] == "done":
            summary = gateway.summary(job, event[1])
            gateway.record(job, summary, event[1])
            if parsed.stream:  # done before any text (an empty answer): stream it all at once
                return StreamingResponse(stream(job, event, summary), media_type="text/event-stream")
            return JSONResponse(completion_body(
                job.id, job.created, gateway.served_name, summary["text"], summary["finish_reason"],
                usage(summary["prompt_tokens"], summary["completion_tokens"]), summary["ctxopt"]))
        return error_response(end_with(job, event))

    def end_with(job: Job, event: tuple[str, Any]) -> ApiError:
        """Stop the job for an event that ends it without an answer; count it; the error to answer with."""
        kind, value = event
        if kind == "disconnect":
            job.cancel()
            error = ApiError(CLIENT_CLOSED, "The client went away.", "client_closed")
        elif kind == "timeout":
            job.cancel()
            error = ApiError(504, f"The request did not finish within {config.request_timeout:g} s (the gateway's "
                             "--request-timeout).", "timeout_error", code="request_timeout")
        else:
            error = api_error(value)
        gateway.metrics.failed(job.settings.method, error.status, error.kind)
        return error

    async def stream(job: Job, first: tuple[str, Any], summary: dict | None = None):
        """The server-sent events of one answer, from its first event on. A client that goes away cancels the
        job (Starlette cancels this generator)."""
        rid, created, name = job.id, job.created, gateway.served_name
        trimmer = StreamTrimmer()
        finished = False
        try:
            yield sse(chunk_body(rid, created, name, {"role": "assistant", "content": ""}))
            event = first
            while True:
                kind, value = event
                if kind == "text":
                    piece = trimmer.feed(value)
                    if piece:
                        yield sse(chunk_body(rid, created, name, {"content": piece}))
                elif kind == "done":
                    if summary is None:
                        summary = gateway.summary(job, value)
                        gateway.record(job, summary, value)
                    yield sse(chunk_body(rid, created, name, {}, summary["finish_reason"], ctxopt=summary["ctxopt"]))
                    if job.request.include_usage:
                        use = usage(summary["prompt_tokens"], summary["completion_tokens"])
                        yield sse(chunk_body(rid, created, name, None, usage=use))
                    finished = True
                    yield sse("[DONE]")
                    return
                else:
                    error = end_with(job, event)
                    finished = True
                    yield sse(error.body())
                    yield sse("[DONE]")
                    return
                event = await job.next_event()
        finally:
            if not finished:
                job.cancel()
                gateway.metrics.failed(job.settings.method, CLIENT_CLOSED, "client_closed")

    return app
