"""The HTTP side of ``detox serve``: a FastAPI app speaking the OpenAI completions and chat completions API.

Every request is validated (size, JSON, types, limits) before it reaches the model; errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``. Generation runs on the scheduler's worker thread; this side only
turns its events into a JSON body or server-sent events (``data: {...}`` chunks, then ``data: [DONE]``).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
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


def create_app(backend: ServedModel, settings: ServeSettings | None = None) -> FastAPI:
    """The OpenAI-compatible app around a loaded :class:`~detox.serve.model.ServedModel`; starts its scheduler
    (stopped on shutdown)."""
    settings = settings or ServeSettings()
    metrics = ServeMetrics(
        {"model": backend.model_id, "backend": backend.kind, "calibrator": backend.calibrator_label,
         "fusion": backend.fusion_mode, "default_strength": f"{backend.default_strength:g}"},
        queue_depth=lambda: scheduler.depth, running=lambda: scheduler.running)
    scheduler = Scheduler(backend, max_queue=settings.max_queue, batch_wait=settings.batch_wait,
                          on_batch=metrics.observe_batch, on_done=metrics.observe_job)
    created = int(time.time())

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

    guarded = APIRouter(dependencies=[Depends(authorize)])  # every endpoint but /health and /ready needs the key

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
        except ValidationError as err:  # the first problem, as "param: what is wrong"
            first = err.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            msg = first.get("msg", "invalid value").removeprefix("Value error, ")
            raise APIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value") from err
        if req.model != backend.model_id:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {backend.model_id!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")
        return req

    # ----------------------------------------------------------------------------------------------------------
    # Response shapes

    def completion_logprobs(tokens: list[TokenInfo], offset: int) -> dict[str, Any]:
        offsets = list(itertools.accumulate((len(t.text) for t in tokens), initial=offset))[:-1]
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

    async def answer(request: Request, job: Job, chat: bool, stream: bool, include_usage: bool) -> Response:
        gen, endpoint = job.request, request.url.path
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
                "model": backend.model_id}
        fused = gen.strength is not None  # the response's detox field and x-detox-* headers name what was used
        info = {"enabled": fused, "calibrator": backend.calibrator_label if fused else None, "strength": gen.strength}
        headers = {"x-detox-calibrator": backend.calibrator_label if fused else "none",
                   "x-detox-strength": f"{gen.strength:g}" if fused else "off"}

        def choice(index: int, text: str, tokens: list[TokenInfo], finish: str | None, logprobs: bool,
                   offset: int = 0, delta: dict[str, str] | None = None) -> dict[str, Any]:
            """One choice of a response (``delta``: of a chat chunk); the same shape streamed or not."""
            if chat:
                body: dict[str, Any] = {"message": {"role": "assistant", "content": text}} if delta is None \
                    else {"delta": delta}
                lp = chat_logprobs(tokens) if logprobs else None
            else:
                body, lp = {"text": text}, completion_logprobs(tokens, offset) if logprobs else None
            return {"index": index, **body, "logprobs": lp, "finish_reason": finish}

        def settle(status: str) -> None:
            """Record the request's outcome ("200", "500" after a failed generation, "cancelled": the client left or
            the server is shutting down); a request that did not succeed frees its slot at the next token."""
            if status != "200":
                job.cancel()
            if status == "500":
                metrics.errors.labels("generation_failed").inc()
            metrics.observe_request(endpoint, status)

        def failure(event: Failed) -> APIError:
            return APIError(event.status, event.message, "server_error", code="generation_failed")

        if not stream:
            texts = [""] * gen.n
            tokens: list[list[TokenInfo]] = [[] for _ in range(gen.n)]
            reasons: list[str | None] = [None] * gen.n
            status = "cancelled"
            try:
                while not isinstance(event := await next_event(request, job), (Done, Failed)):
                    if isinstance(event, Delta):
                        texts[event.index] += event.text
                        tokens[event.index] += event.tokens
                    elif isinstance(event, Finish):
                        reasons[event.index] = event.reason
                status = "500" if isinstance(event, Failed) else "cancelled" if job.cancelled.is_set() else "200"
            finally:
                settle(status)
            if isinstance(event, Failed):
                return failure(event).response()
            if status == "cancelled":
                return Response(status_code=499)
            choices = [choice(i, texts[i], tokens[i], reasons[i], gen.logprobs is not None) for i in range(gen.n)]
            body = {**base, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                    "usage": usage(event), "detox": info}
            return JSONResponse(body, headers=headers)

        async def chunks() -> AsyncIterator[str]:
            status = "cancelled"
            offsets = [0] * gen.n

            def chunk(index: int, text: str | None, toks: list[TokenInfo], finish: str | None,
                      delta: dict[str, str] | None = None) -> str:
                if chat and delta is None:
                    delta = {} if text is None else {"content": text}
                body = choice(index, text or "", toks, finish, bool(toks), offsets[index], delta)
                offsets[index] += len(text or "")
                return json.dumps({**base, "choices": [body], "detox": info})

            try:
                if chat:  # each choice's first chunk opens the assistant's message
                    for i in range(gen.n):
                        yield chunk(i, "", [], None, {"role": "assistant", "content": ""})
                while not isinstance(event := await job.events.get(), (Done, Failed)):
                    if isinstance(event, Delta):
                        yield chunk(event.index, event.text, event.tokens, None)
                    elif isinstance(event, Finish) and event.reason != "cancelled":
                        yield chunk(event.index, None if chat else "", [], event.reason)
                if isinstance(event, Failed):
                    status = "500"
                    yield json.dumps(failure(event).body())
                elif not job.cancelled.is_set():
                    if include_usage:
                        yield json.dumps({**base, "choices": [], "usage": usage(event), "detox": info})
                    status = "200"
                    yield "[DONE]"
            finally:
                settle(status)

        return EventSourceResponse(chunks(), headers=headers, ping=15)

    # ----------------------------------------------------------------------------------------------------------
    # Endpoints

    async def complete(request: Request, schema: type[CompletionRequest] | type[ChatRequest]) -> Response:
        """One path for completions and chat: validate the request against the server's limits, queue it, answer."""
        req = parse(schema, await read_json(request))
        chat = isinstance(req, ChatRequest)
        if chat:
            try:
                prompt = backend.render_chat([m.as_template_input() for m in req.messages])
            except Exception as err:  # noqa: BLE001 - a template may raise anything on odd input (jinja's raise_exception)
                raise APIError(400, f"messages: the chat template refused them: {err}", param="messages",
                               code="invalid_value") from err
        prompt_ids = backend.encode(prompt if chat else req.prompt_text, chat)
        ctx = backend.context_window
        if req.n > settings.max_n:
            raise APIError(400, f"n={req.n} exceeds this server's limit of {settings.max_n}", param="n",
                           code="invalid_value")
        if len(prompt_ids) >= ctx:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this model's context window is {ctx} tokens",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        room = ctx - len(prompt_ids)
        param = "max_completion_tokens" if chat and req.max_completion_tokens else "max_tokens"
        token_limit = req.token_limit if chat else req.max_tokens
        if token_limit is not None:
            if token_limit > settings.max_tokens_limit:
                raise APIError(400, f"{param}={token_limit} exceeds this server's limit of {settings.max_tokens_limit}",
                               param=param, code="invalid_value")
            if token_limit > room:
                raise APIError(400, f"the prompt ({len(prompt_ids)} tokens) plus {param}={token_limit} exceeds this "
                                    f"model's context window of {ctx} tokens", param=param,
                               code="context_length_exceeded")
            max_tokens = token_limit
        else:  # OpenAI's defaults: 16 tokens for completions, as many as fit for chat
            default_tokens = settings.max_tokens_limit if chat else settings.default_completion_tokens
            max_tokens = min(default_tokens, room, settings.max_tokens_limit)
        opts = req.detox
        strength: float | None = None
        if opts.enabled:
            try:
                strength = backend.check_strength(opts.strength)  # None: the artifact's default
            except ValueError as err:
                raise APIError(400, f"detox.strength: {err}", param="detox.strength", code="invalid_value") from err
        elif opts.strength is not None:
            raise APIError(400, "detox.strength has no effect with detox.enabled=false; drop one of them",
                           param="detox", code="invalid_value")
        logprobs = ((req.top_logprobs or 0) if req.logprobs else None) if chat else req.logprobs
        job = Job(GenRequest(prompt_ids=prompt_ids, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                             seed=req.seed, stop=tuple(req.stop or ()), strength=strength, logprobs=logprobs, n=req.n))
        try:
            scheduler.submit(job)
        except QueueFull as err:
            raise APIError(429, str(err), "rate_limit_error", code="queue_full") from err
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await answer(request, job, chat, req.stream, include_usage)

    @guarded.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, CompletionRequest)

    @guarded.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, ChatRequest)

    def model_card() -> dict[str, Any]:
        return {"id": backend.model_id, "object": "model", "created": created, "owned_by": "detox",
                "detox": {"backend": backend.kind, "calibrator": backend.calibrator_label, "fusion": backend.fusion_mode,
                          "default_strength": backend.default_strength, "context_window": backend.context_window}}

    @guarded.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @guarded.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
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

    @guarded.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    app.include_router(guarded)
    return app
