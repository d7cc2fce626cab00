"""The OpenAI-compatible HTTP face: ``create_app(settings)`` → a FastAPI app.

- The port opens at once; the model loads in a background thread and runs a one-token warm-up.
  Until then every ``/v1/*`` request gets 503 + Retry-After; ``/ready`` turns 200 afterwards.
- One engine thread owns the model (``vlm.engine.start()``). A chat request prepares its prompt
  (image fetching and decoding) in the thread pool, submits one engine request per choice and reads
  their deltas through an asyncio queue; concurrent requests share the engine's decode batch.
- A client that goes away, a request past ``request_timeout``, or a stream its client stops reading for
  ``write_timeout`` cancels its generation (the engine frees its KV cache at its next step).
- Auth, cold-start, overload (more than ``max_batch + max_queue`` chat requests in flight), body-size and
  body-time checks happen in one ASGI middleware, before the body is parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..engine.sampling import SamplingParams
from ..engine.types import ChatDelta, ChatResult
from ..engine.types import TokenLogprob as EngineTokenLogprob
from ..errors import JvlmError, OverloadedError
from . import types as t
from .body import JSONBodyRoute
from .errors import EXCEPTION_HANDLERS, APIError, from_jvlm, internal_error, loading_response
from .images import make_image_loader, with_pixel_budget
from .metrics import CONTENT_TYPE, Metrics
from .settings import Settings

if TYPE_CHECKING:
    from ..api import VLM
    from ..engine.engine import RequestHandle

log = logging.getLogger("jvlm.server")

DISCONNECT_POLL_S = 0.5  # longest wait for a delta before checking again that the client is still there
FINGERPRINT = f"jvlm-{__version__}"
CHAT_ROUTE = "/v1/chat/completions"
ERROR_RESPONSES = {status: {"model": t.ErrorResponse} for status in (400, 401, 404, 408, 413, 500, 503, 504)}
STREAM_RESPONSE = {"content": {"text/event-stream": {"schema": {  # before OpenAPI 3.2 the schema is one event's
    "type": "object", "required": ["data"], "description": "With stream=true, server-sent events.",
    "properties": {"data": {"type": "string", "description": "A ChatCompletionChunk as JSON; an error body "
                                                              "({'error': ...}) if the stream fails; last, [DONE]."}},
}}}}


def load_vlm(settings: Settings) -> VLM:
    import jvlm

    return jvlm.load(settings.model, dtype=settings.dtype, threads=settings.threads, max_batch=settings.max_batch,
                     max_waiting=settings.max_queue, prefix_cache_bytes=settings.prefix_cache_bytes,
                     feature_cache_bytes=settings.image_cache_bytes)


class ModelHost:
    """Loads the model in a background thread, warms it up, and stops its engine at shutdown."""

    def __init__(self, settings: Settings, vlm: VLM | None = None, loader: Callable[[], VLM] | None = None):
        self.settings = settings
        self.vlm = vlm
        self.loader = loader or (lambda: load_vlm(settings))
        self.state = "loading"  # → "ready" | "failed"
        self.error: str | None = None
        self.loaded_at = int(time.time())
        self.on_failure: Callable[[], None] | None = None  # e.g. the CLI stops the server
        self._closed = False

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def start(self) -> None:
        threading.Thread(target=self._load, name="jvlm-loader", daemon=True).start()

    def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            if self.vlm is None:
                self.vlm = self.loader()
            if self._closed:
                return
            self.vlm.engine.start()
            self.vlm.chat([{"role": "user", "content": "Hi"}], max_new_tokens=1)  # a real forward pass
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            self.state = "failed"
            # jvlm's own errors (no snapshot, a broken checkpoint…) say what is wrong in one line
            log.error("loading model %s failed: %s", self.settings.model, self.error,
                      exc_info=None if isinstance(e, JvlmError) else e)
            if self.on_failure is not None:
                self.on_failure()
            return
        self.loaded_at = int(time.time())
        self.state = "ready"
        log.info("model %s ready (loaded and warmed up in %.1fs)", self.settings.model, time.perf_counter() - t0)

    def cancel_after(self, seconds: float) -> None:
        """On shutdown: what is still generating after ``seconds`` is cancelled, so each such request gets
        jvlm's 503 (or a final error event on a stream) before the server's own deadline cuts connections."""
        def cancel() -> None:
            if self.vlm is not None:
                log.warning("shutdown timeout: cancelling the requests still in flight")
                self.vlm.engine.cancel_all()

        timer = threading.Timer(seconds, cancel)
        timer.daemon = True
        timer.start()

    def close(self, timeout: float) -> None:
        self._closed = True
        if self.vlm is not None:
            self.vlm.engine.stop(cancel=True, timeout=timeout)
            self.vlm = None  # FastAPI's caches may keep the app's routes alive, and with them this host


# ---------------------------------------------------------------------------------------------- edge checks
class EdgeMiddleware:
    """Per-request checks that must not wait for the body to be parsed: auth (401), cold start (503),
    overload (503), body size (413) and time (408); records every response's status for /metrics and turns
    stray errors into 500s.

    Chat requests are counted from here until their response is sent (a stream to its end), so the
    requests held at once (their bodies, images and generations) are bounded whatever the clients do."""

    def __init__(self, app: ASGIApp, host: ModelHost, metrics: Metrics):
        self.app, self.host, self.metrics = app, host, metrics
        self.settings = host.settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 0

        async def send_recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        counted = False
        try:
            refusal = self._refuse(scope)
            if refusal is None and scope["path"] == CHAT_ROUTE and scope["method"] == "POST":
                limit = self.settings.max_in_flight
                if self.metrics.in_flight >= limit:
                    refusal = from_jvlm(OverloadedError(
                        f"{self.metrics.in_flight} chat requests in flight, the limit is {limit}")).response()
                else:
                    self.metrics.in_flight += 1
                    counted = True
            if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
                receive, refusal = await self._read_body(scope, receive)
            if refusal is not None:
                await refusal(scope, receive, send_recording)
            else:
                await self.app(scope, receive, send_recording)
        except Exception as e:
            if status:  # the response has started: nothing better to do than to drop the connection
                raise
            await internal_error(e).response()(scope, receive, send_recording)
        finally:
            if counted:
                self.metrics.in_flight -= 1
            self.metrics.observe_http(scope["path"], status or 500)

    def _refuse(self, scope: Scope) -> Response | None:
        path = scope["path"]
        if not (path == "/v1" or path.startswith("/v1/")):
            return None
        key = self.settings.api_key
        if key is not None:
            headers = dict(scope["headers"])
            scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not given.strip():
                return _unauthorized("Missing API key: send it as 'Authorization: Bearer YOUR_KEY'.")
            if not hmac.compare_digest(given.strip().encode(), key.encode()):
                return _unauthorized("Incorrect API key provided.")
        if self.host.state == "failed":
            return APIError(503, f"The model failed to load: {self.host.error}", type="server_error",
                            code="model_load_failed").response()
        if not self.host.ready:
            return loading_response(self.settings.served_model_name)
        return None

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[Receive, Response | None]:
        """Read the whole body (at most ``max_body_bytes``) and hand the app a receive that replays it."""
        encodings = [v.decode("latin-1").strip() for k, v in scope["headers"] if k == b"content-encoding"]
        encoding = ", ".join(e for e in encodings if e and e.lower() != "identity")
        if encoding:  # nothing decompresses it, and JSON parsing would fail on it with a less clear message
            return receive, APIError(415, f"Content-Encoding {encoding} is not supported; send an uncompressed body.",
                                     code="unsupported_content_encoding").response()
        limit = self.settings.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return receive, _too_large(int(declared), limit)
        chunks, size, more = [], 0, True
        try:
            async with asyncio.timeout(self.settings.body_timeout):
                while more:
                    message = await receive()
                    if message["type"] != "http.request":  # disconnected
                        return receive, Response(status_code=499)
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > limit:
                        return receive, _too_large(size, limit, at_least=True)
                    more = message.get("more_body", False)
        except TimeoutError:  # a client that stalls half-way through its body
            return receive, APIError(408, f"The request body did not arrive within {self.settings.body_timeout:g} "
                                          f"seconds ({size:,} bytes received).", code="request_timeout",
                                     headers={"Connection": "close"}).response()
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replaying_receive() -> Message:
            return replay.pop() if replay else await receive()

        return replaying_receive, None


def _unauthorized(message: str) -> Response:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}).response()


def _too_large(size: int, limit: int, at_least: bool = False) -> Response:
    return APIError(413, f"The request body is {'over ' if at_least else ''}{size:,} bytes; the limit is {limit:,} "
                         "bytes.", code="request_too_large").response()


# ---------------------------------------------------------------------------------------------- generation
class ClientDisconnected(Exception):
    pass


class Generation:
    """The engine requests of one chat request (one per choice), read without blocking the event loop:
    a small thread per handle iterates it and hands each delta to the loop's queue."""

    def __init__(self, handles: list[RequestHandle]):
        self.handles = handles
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[ChatDelta] = asyncio.Queue()
        for handle in handles:
            threading.Thread(target=self._pump, args=(handle,), name="jvlm-pump", daemon=True).start()

    @classmethod
    def submit(cls, vlm: VLM, prompt, params: SamplingParams, n: int) -> Generation:
        handles: list[RequestHandle] = []
        try:
            for i in range(n):  # a seeded request gets a different seed per choice, so they can differ
                seed = None if params.seed is None else params.seed + i
                handles.append(vlm.submit(prompt, dataclasses.replace(params, seed=seed), i))
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        return cls(handles)

    def _pump(self, handle: RequestHandle) -> None:
        for delta in handle:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, delta)
            except RuntimeError:  # the event loop is gone (shutdown): stop the work, drain to the end
                handle.cancel()

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    async def deltas(self, request: Request, deadline: float | None) -> AsyncIterator[ChatDelta]:
        """Every delta of every choice until all have finished. Raises ``ClientDisconnected`` or a 504
        ``APIError`` (after cancelling) when the client leaves or the deadline passes."""
        left = len(self.handles)
        try:
            while left:
                if await request.is_disconnected():
                    raise ClientDisconnected()
                wait = DISCONNECT_POLL_S
                if deadline is not None:
                    wait = min(wait, deadline - self.loop.time())
                    if wait <= 0:
                        raise _timeout_error()
                try:
                    delta = await asyncio.wait_for(self.queue.get(), wait)
                except TimeoutError:
                    continue
                if delta.result is not None:
                    left -= 1
                yield delta
        finally:
            if left:
                self.cancel()


def _timeout_error() -> APIError:
    return APIError(504, "The request took longer than the server's request timeout and was cancelled.",
                    type="timeout_error", code="request_timeout")


def _check_result(result: ChatResult) -> None:
    if result.finish_reason == "error":
        raise internal_error(f"generation failed: {result.error}")
    if result.finish_reason == "cancelled":
        raise APIError(503, "The request was cancelled because the server is shutting down.", type="server_error",
                       code="cancelled")


class _ClientStalled(Exception):
    pass


class _SSEResponse(StreamingResponse):
    """A streaming response that always cancels its generation when it ends, however it ends
    (finished, client gone before or during the stream, client not reading, server shutdown).

    A client that stops reading makes a send wait (uvicorn waits for the socket to drain): after
    ``write_timeout`` seconds of that the generation is cancelled and the response abandoned, which makes
    uvicorn close the connection. Meanwhile the engine never waits for it: its deltas queue up, at most
    the request's token budget."""

    def __init__(self, content: AsyncIterator[str], generation: Generation, write_timeout: float):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation, self.write_timeout = generation, write_timeout
        self.content = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cancel()
            await self.content.aclose()

    async def stream_response(self, send: Send) -> None:
        async def bounded_send(message: Message) -> None:
            try:
                async with asyncio.timeout(self.write_timeout):
                    await send(message)
            except TimeoutError:
                raise _ClientStalled() from None

        try:
            await super().stream_response(bounded_send)
        except _ClientStalled:
            self.generation.cancel()
            log.warning("a client did not read its stream for %gs: request cancelled, connection dropped",
                        self.write_timeout)


# ---------------------------------------------------------------------------------------------- conversions
def sampling_params(body: t.ChatCompletionRequest, default_max_tokens: int) -> SamplingParams:
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true.", param="top_logprobs", code="invalid_value")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    given = {
        "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "seed": body.seed,
        "repetition_penalty": body.repetition_penalty, "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
    }
    return SamplingParams(
        max_new_tokens=body.max_completion_tokens or body.max_tokens or default_max_tokens, stop=stop,
        logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0,
        **{k: v for k, v in given.items() if v is not None},
    )


def logprobs_content(entries: list[EngineTokenLogprob] | None, vlm: VLM) -> list[t.TokenLogprob]:
    """OpenAI's ``logprobs.content``; the end-of-turn token is not part of the answer, so it is left out."""
    def top(x) -> t.TopLogprob:  # -9999 stands for -inf, as in OpenAI's answers (JSON has no infinity)
        return t.TopLogprob(token=x.token, logprob=max(x.logprob, -9999.0),
                            bytes=list(vlm.tokenizer.token_bytes(x.token_id)))

    return [t.TokenLogprob(**top(e).model_dump(), top_logprobs=[top(x) for x in e.top_logprobs])
            for e in entries or [] if e.token_id not in vlm.engine.eos_ids]


def usage(results: list[ChatResult]) -> t.Usage:
    """The choices share one prompt: it is counted once."""
    first = results[0].usage
    completion = sum(r.usage.completion_tokens for r in results)
    return t.Usage(prompt_tokens=first.prompt_tokens, completion_tokens=completion,
                   total_tokens=first.prompt_tokens + completion,
                   prompt_tokens_details=t.PromptTokensDetails(cached_tokens=first.cached_tokens,
                                                               image_tokens=first.image_tokens))


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------------------------- the app
def create_app(settings: Settings | None = None, vlm: VLM | None = None,
               loader: Callable[[], VLM] | None = None) -> FastAPI:
    """Args:
        settings: server settings (defaults for everything not given).
        vlm: an already loaded model to serve (it is still warmed up before /ready turns 200).
        loader: called in a background thread at startup to load the model (default: ``jvlm.load``
            with the settings); tests inject a slow one to observe the cold start.
    """
    settings = settings or Settings()
    host = ModelHost(settings, vlm, loader)
    metrics = Metrics()
    image_loader = make_image_loader(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        host.start()
        try:
            yield
        finally:  # uvicorn has already let in-flight requests finish (or cancelled them) by now
            await run_in_threadpool(host.close, 10.0)

    app = FastAPI(title="jvlm", version=__version__, lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS,
                  description="OpenAI-compatible chat completions for jina-vlm.")
    app.router.route_class = JSONBodyRoute  # body parse failures say what is wrong (see body.py)
    app.add_middleware(EdgeMiddleware, host=host, metrics=metrics)
    app.state.host, app.state.metrics, app.state.settings = host, metrics, settings
    app.openapi = functools.partial(_openapi, app)

    @app.get("/health", summary="Liveness: the process is up (also while the model loads).",
             responses={503: {"description": "The model failed to load: {'status': 'failed', 'error': ...}."}})
    async def health():
        if host.state == "failed":
            return JSONResponse({"status": "failed", "error": host.error}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: 200 once the model is loaded and a warm-up forward pass ran.",
             responses={503: {"description": "Loading (with Retry-After) or failed: {'status': ..., 'error': ...}."}})
    async def ready():
        if host.ready:
            return {"status": "ready", "model": settings.served_model_name}
        if host.state == "failed":
            return JSONResponse({"status": "failed", "error": host.error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})

    @app.get("/metrics", summary="Prometheus metrics.", response_class=PlainTextResponse)
    async def prometheus_metrics():
        engine = host.vlm.engine if host.vlm is not None else None
        return PlainTextResponse(metrics.render(engine, host.ready), media_type=CONTENT_TYPE)

    def model_card() -> t.ModelCard:
        return t.ModelCard(id=settings.served_model_name, created=host.loaded_at, root=settings.model,
                           max_model_len=host.vlm.context_length)

    def unknown_model(name: str) -> APIError:
        return APIError(404, f"The model '{name}' does not exist; this server serves "
                             f"'{settings.served_model_name}'.", param="model", code="model_not_found")

    @app.get("/v1/models", response_model=t.ModelList, responses=ERROR_RESPONSES)
    async def list_models():
        return t.ModelList(data=[model_card()])

    @app.get("/v1/models/{model_id:path}", response_model=t.ModelCard, responses=ERROR_RESPONSES)
    async def retrieve_model(model_id: str):
        if model_id not in settings.model_names:
            raise unknown_model(model_id)
        return model_card()

    @app.post(CHAT_ROUTE, response_model=t.ChatCompletion, responses={200: STREAM_RESPONSE, **ERROR_RESPONSES})
    async def chat_completions(body: t.ChatCompletionRequest, request: Request):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.request_timeout if settings.request_timeout else None
        if body.model is not None and body.model not in settings.model_names:
            raise unknown_model(body.model)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed when stream is true.", param="stream_options",
                           code="invalid_value")
        queue_size = host.vlm.engine.max_waiting
        if body.n > queue_size:  # its choices are queued together: they could never all fit
            raise APIError(400, f"n={body.n} choices do not fit this server's queue of {queue_size} requests "
                                "(--max-queue).", param="n", code="invalid_value")
        images = sum(m.images for m in body.messages)
        if images > settings.max_images_per_request:
            raise APIError(400, f"The request has {images} images; the limit is {settings.max_images_per_request}.",
                           param="messages", code="too_many_images")
        params = sampling_params(body, settings.default_max_tokens)
        vlm = host.vlm
        prompt = await run_in_threadpool(vlm.prepare, [m.to_jvlm() for m in body.messages],
                                         max_crops=body.max_crops, max_pixels=body.max_pixels,
                                         image_loader=with_pixel_budget(image_loader, settings.max_total_image_pixels))
        if deadline is not None and loop.time() >= deadline:
            raise _timeout_error()
        generation = Generation.submit(vlm, prompt, params, body.n)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": body.model or settings.served_model_name, "system_fingerprint": FINGERPRINT}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = stream_chunks(generation, request, deadline, meta, body.logprobs, include_usage, vlm, metrics)
            return _SSEResponse(chunks, generation, settings.write_timeout)
        try:
            results = await collect(generation, request, deadline)
        except ClientDisconnected:
            return Response(status_code=499)  # nobody reads it; the status is for the metrics
        metrics.observe_request(results)
        choices = [
            t.Choice(index=i, message=t.AssistantMessage(content=r.text), finish_reason=r.finish_reason,
                     logprobs=t.ChoiceLogprobs(content=logprobs_content(r.logprobs, vlm)) if body.logprobs else None)
            for i, r in enumerate(results)
        ]
        return t.ChatCompletion(**meta, choices=choices, usage=usage(results))

    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema without its 422 answers: validation errors are 400s in OpenAI's error shape."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
    return app.openapi_schema


async def collect(generation: Generation, request: Request, deadline: float | None) -> list[ChatResult]:
    """The finished choices in index order (raises for a failed or cancelled one)."""
    results: dict[int, ChatResult] = {}
    async with contextlib.aclosing(generation.deltas(request, deadline)) as deltas:
        async for d in deltas:
            if d.result is not None:
                _check_result(d.result)
                results[d.index] = d.result
    return [results[i] for i in range(len(results))]


async def stream_chunks(generation: Generation, request: Request, deadline: float | None, meta: dict,
                        logprobs: bool, include_usage: bool, vlm: VLM, metrics: Metrics) -> AsyncIterator[str]:
    """SSE events: a role chunk per choice, content chunks, a finish chunk per choice, the usage chunk when
    asked for, ``[DONE]``. A failure after the first event can only be reported as an error event."""

    def chunk(choice: t.ChunkChoice | None, usage: t.Usage | None = None) -> str:
        data = t.ChatCompletionChunk(**meta, choices=[choice] if choice else [], usage=usage).model_dump()
        for c in data["choices"]:  # OpenAI sends only the delta fields that are set
            c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
        if not include_usage:
            data.pop("usage")
        return _sse(data)

    n = len(generation.handles)
    results: dict[int, ChatResult] = {}
    try:
        for i in range(n):
            yield chunk(t.ChunkChoice(index=i, delta=t.ChunkDelta(role="assistant", content="")))
        async with contextlib.aclosing(generation.deltas(request, deadline)) as deltas:
            async for d in deltas:
                content = logprobs_content(d.logprobs, vlm) if logprobs else None
                if d.text or content:
                    lp = t.ChoiceLogprobs(content=content) if logprobs else None
                    yield chunk(t.ChunkChoice(index=d.index, delta=t.ChunkDelta(content=d.text), logprobs=lp))
                if d.result is not None:
                    _check_result(d.result)
                    results[d.index] = d.result
                    yield chunk(t.ChunkChoice(index=d.index, delta=t.ChunkDelta(), finish_reason=d.finish_reason))
        ordered = [results[i] for i in range(n)]
        metrics.observe_request(ordered)
        if include_usage:
            yield chunk(None, usage(ordered))
        yield "data: [DONE]\n\n"
    except ClientDisconnected:
        return
    except APIError as e:
        yield _sse(e.body())
    except Exception as e:
        yield _sse(internal_error(e).body())
