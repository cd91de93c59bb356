"""The HTTP side of ``detox serve``: a FastAPI app speaking the OpenAI completions and chat completions API.

Every request is validated (size, JSON, types, limits) before it reaches the model; errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``. Generation runs on the scheduler's worker thread; this side only
turns its events into a JSON body or server-sent events (``data: {...}`` chunks, then ``data: [DONE]``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from detox.serve.engine import Delta, Done, Failed, Finish, GenRequest, Job, QueueFull, Scheduler, TokenInfo
from detox.serve.metrics import ServeMetrics
from detox.serve.model import ServedModel
from detox.serve.schema import ChatRequest, CompletionRequest

log = logging.getLogger("detox.serve")


@dataclass
class ServeSettings:
    """The server's limits and options (``detox serve`` flags)."""

    api_key: str | None = None
    max_queue: int = 64
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 1024
    max_n: int = 8
    default_completion_tokens: int = 16  # OpenAI's default max_tokens for /v1/completions
    batch_wait: float = 0.05


class APIError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _validation_message(err: ValidationError) -> tuple[str, str | None]:
    first = err.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


def create_app(backend: ServedModel, settings: ServeSettings | None = None) -> FastAPI:
    """The OpenAI-compatible app around a loaded :class:`~detox.serve.model.ServedModel`; starts its scheduler
    (stopped on shutdown)."""
    settings = settings or ServeSettings()
    scheduler = Scheduler(backend, max_queue=settings.max_queue, batch_wait=settings.batch_wait)
    metrics = ServeMetrics(
        {"model": backend.model_id, "backend": backend.kind, "calibrator": backend.calibrator_label,
         "fusion": backend.fusion_mode, "default_strength": f"{backend.default_strength:g}"},
        queue_depth=lambda: scheduler.depth, running=lambda: scheduler.running)
    scheduler.on_batch = metrics.observe_batch
    scheduler.on_done = metrics.observe_job
    created = int(time.time())

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(scheduler.close)

    app = FastAPI(title="detox serve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.backend, app.state.scheduler, app.state.metrics = backend, scheduler, metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        metrics.observe_error(request.url.path, err.status, err.code or err.type)
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if err.status_code == 404 else "method_not_allowed" if err.status_code == 405 else "http_error"
        return await _api_error(request, APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}",
                                                  code=code))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return await _api_error(request, APIError(500, f"internal error ({type(err).__name__}); see the server's log",
                                                  "server_error", code="internal_error"))

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            raise APIError(413, f"request body of {length} bytes exceeds the limit of {settings.max_body_bytes} bytes",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise APIError(413, f"request body exceeds the limit of {settings.max_body_bytes} bytes",
                               code="request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from err

    def parse(model: type[BaseModel], body: Any) -> Any:
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_request")
        try:
            req = model.model_validate(body)
        except ValidationError as err:
            message, param = _validation_message(err)
            raise APIError(400, message, param=param, code="invalid_value") from err
        if req.model != backend.model_id:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {backend.model_id!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")
        return req

    def gen_request(req: Any, prompt_ids: list[int], token_limit: int | None, default_tokens: int,
                    logprobs: int | None) -> GenRequest:
        ctx = backend.context_window
        if req.n > settings.max_n:
            raise APIError(400, f"n={req.n} exceeds this server's limit of {settings.max_n}", param="n",
                           code="invalid_value")
        if len(prompt_ids) >= ctx:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this model's context window is {ctx} tokens",
                           param="messages" if isinstance(req, ChatRequest) else "prompt", code="context_length_exceeded")
        room = ctx - len(prompt_ids)
        param = "max_completion_tokens" if isinstance(req, ChatRequest) and req.max_completion_tokens else "max_tokens"
        if token_limit is not None:
            if token_limit > settings.max_tokens_limit:
                raise APIError(400, f"{param}={token_limit} exceeds this server's limit of {settings.max_tokens_limit}",
                               param=param, code="invalid_value")
            if token_limit > room:
                raise APIError(400, f"the prompt ({len(prompt_ids)} tokens) plus {param}={token_limit} exceeds this "
                                    f"model's context window of {ctx} tokens", param=param,
                               code="context_length_exceeded")
            max_tokens = token_limit
        else:
            max_tokens = min(default_tokens, room, settings.max_tokens_limit)
        opts = req.detox
        strength: float | None = None
        if opts.enabled:
            try:
                strength = backend.check_strength(backend.default_strength if opts.strength is None else opts.strength)
            except ValueError as err:
                raise APIError(400, f"detox.strength: {err}", param="detox.strength", code="invalid_value") from err
        elif opts.strength is not None:
            raise APIError(400, "detox.strength has no effect with detox.enabled=false; drop one of them",
                           param="detox", code="invalid_value")
        return GenRequest(prompt_ids=prompt_ids, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                          seed=req.seed, stop=tuple(req.stop or ()), strength=strength, logprobs=logprobs, n=req.n)

    def detox_info(gen: GenRequest) -> dict[str, Any]:
        if gen.strength is None:
            return {"enabled": False, "calibrator": None, "strength": None}
        return {"enabled": True, "calibrator": backend.calibrator_label, "strength": gen.strength}

    def detox_headers(gen: GenRequest) -> dict[str, str]:
        if gen.strength is None:
            return {"x-detox-calibrator": "none", "x-detox-strength": "off"}
        return {"x-detox-calibrator": backend.calibrator_label, "x-detox-strength": f"{gen.strength:g}"}

    def submit(gen: GenRequest) -> Job:
        job = Job(gen)
        try:
            scheduler.submit(job)
        except QueueFull as err:
            raise APIError(429, str(err), "rate_limit_error", code="queue_full") from err
        return job

    # ----------------------------------------------------------------------------------------------------------
    # Response shapes

    def completion_logprobs(tokens: list[TokenInfo], offset: int) -> dict[str, Any]:
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t.text)
        return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{s: lp for s, lp in t.top} for t in tokens], "text_offset": offsets}

    def chat_logprobs(tokens: list[TokenInfo]) -> dict[str, Any]:
        def entry(text: str, lp: float) -> dict[str, Any]:
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(t.text, t.logprob), "top_logprobs": [entry(s, lp) for s, lp in t.top]}
                            for t in tokens]}

    def usage(done: Done) -> dict[str, int]:
        return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                "total_tokens": done.prompt_tokens + done.completion_tokens}

    async def next_event(request: Request, job: Job) -> Any:
        """The job's next event; cancels the job if the client of a non-streaming request goes away meanwhile."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()

    async def answer(request: Request, job: Job, endpoint: str, chat: bool, stream: bool,
                     include_usage: bool) -> Response:
        gen = job.request
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
                "model": backend.model_id}
        info = detox_info(gen)
        headers = detox_headers(gen)

        if not stream:
            texts = [""] * gen.n
            tokens: list[list[TokenInfo]] = [[] for _ in range(gen.n)]
            reasons: list[str | None] = [None] * gen.n
            failed: Failed | None = None
            try:
                while True:
                    event = await next_event(request, job)
                    if isinstance(event, Delta):
                        texts[event.index] += event.text
                        tokens[event.index] += event.tokens
                    elif isinstance(event, Finish):
                        reasons[event.index] = event.reason
                    elif isinstance(event, Failed):
                        failed = event
                        job.cancel()
                    elif isinstance(event, Done):
                        break
            except BaseException:  # the request task was cancelled (server shutting down)
                job.cancel()
                metrics.observe_request(endpoint, "cancelled")
                raise
            if failed is not None:
                metrics.observe_request(endpoint, "500")
                err = APIError(failed.status, failed.message, "server_error", code="generation_failed")
                metrics.errors.labels("generation_failed").inc()
                return err.response()
            if job.cancelled.is_set():
                metrics.observe_request(endpoint, "cancelled")
                return Response(status_code=499)
            metrics.observe_request(endpoint, "200")
            if chat:
                choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                            "logprobs": chat_logprobs(tokens[i]) if gen.logprobs is not None else None,
                            "finish_reason": reasons[i]} for i in range(gen.n)]
                obj = "chat.completion"
            else:
                choices = [{"index": i, "text": texts[i],
                            "logprobs": completion_logprobs(tokens[i], 0) if gen.logprobs is not None else None,
                            "finish_reason": reasons[i]} for i in range(gen.n)]
                obj = "text_completion"
            body = {**base, "object": obj, "choices": choices, "usage": usage(event), "detox": info}
            return JSONResponse(body, headers=headers)

        async def chunks() -> AsyncIterator[str]:
            status = "cancelled"
            offsets = [0] * gen.n
            opened = [False] * gen.n

            def chunk(index: int, text: str | None, toks: list[TokenInfo], finish: str | None) -> str:
                if chat:
                    delta: dict[str, Any] = {}
                    if not opened[index]:
                        opened[index] = True
                        delta["role"] = "assistant"
                    if text is not None:
                        delta["content"] = text
                    choice = {"index": index, "delta": delta,
                              "logprobs": chat_logprobs(toks) if toks else None, "finish_reason": finish}
                else:
                    choice = {"index": index, "text": text or "",
                              "logprobs": completion_logprobs(toks, offsets[index]) if toks else None,
                              "finish_reason": finish}
                    offsets[index] += len(text or "")
                return json.dumps({**base, "choices": [choice], "detox": info})

            try:
                if chat:
                    for i in range(gen.n):
                        yield chunk(i, "", [], None)
                while True:
                    event = await job.events.get()
                    if isinstance(event, Delta):
                        yield chunk(event.index, event.text, event.tokens, None)
                    elif isinstance(event, Finish):
                        if event.reason != "cancelled":
                            yield chunk(event.index, None if chat else "", [], event.reason)
                    elif isinstance(event, Failed):
                        metrics.errors.labels("generation_failed").inc()
                        status = "500"
                        yield json.dumps({"error": {"message": event.message, "type": "server_error", "param": None,
                                                    "code": "generation_failed"}})
                        return
                    elif isinstance(event, Done):
                        if job.cancelled.is_set():
                            return
                        if include_usage:
                            yield json.dumps({**base, "choices": [], "usage": usage(event), "detox": info})
                        status = "200"
                        yield "[DONE]"
                        return
            finally:
                if status != "200":
                    job.cancel()  # the client left (or the stream failed): free the slot at the next token
                metrics.observe_request(endpoint, status)

        return EventSourceResponse(chunks(), headers=headers, ping=15)

    # ----------------------------------------------------------------------------------------------------------
    # Endpoints

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        req: CompletionRequest = parse(CompletionRequest, await read_json(request))
        ids = backend.encode(req.prompt_text)
        gen = gen_request(req, ids, req.max_tokens, settings.default_completion_tokens, req.logprobs)
        job = submit(gen)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await answer(request, job, "/v1/completions", False, req.stream, include_usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        req: ChatRequest = parse(ChatRequest, await read_json(request))
        try:
            prompt = backend.render_chat([m.as_template_input() for m in req.messages])
        except Exception as err:  # noqa: BLE001 - a template may raise anything on odd input (jinja's raise_exception)
            raise APIError(400, f"messages: the chat template refused them: {err}", param="messages",
                           code="invalid_value") from err
        ids = backend.encode(prompt, chat=True)
        k = (req.top_logprobs or 0) if req.logprobs else None
        gen = gen_request(req, ids, req.token_limit, settings.max_tokens_limit, k)
        job = submit(gen)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await answer(request, job, "/v1/chat/completions", True, req.stream, include_usage)

    def model_card() -> dict[str, Any]:
        return {"id": backend.model_id, "object": "model", "created": created, "owned_by": "detox",
                "detox": {"backend": backend.kind, "calibrator": backend.calibrator_label, "fusion": backend.fusion_mode,
                          "default_strength": backend.default_strength, "context_window": backend.context_window}}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> dict[str, Any]:
        authorize(request)
        if model_id != backend.model_id:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {backend.model_id!r}",
                           param="model", code="model_not_found")
        return model_card()

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = scheduler.alive
        return JSONResponse({"status": "ok" if ok else "worker stopped"}, status_code=200 if ok else 503)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """200 while the model is loaded and the queue has room: a load balancer's signal to send traffic here."""
        ok = scheduler.alive and scheduler.depth < settings.max_queue
        body = {"status": "ready" if ok else "busy", "queue_depth": scheduler.depth, "max_queue": settings.max_queue,
                "model": backend.model_id, "calibrator": backend.calibrator_label}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        authorize(request)
        return Response(metrics.render(), media_type=metrics.content_type)

    return app
