"""The OpenAI-compatible HTTP app: routes, auth, error mapping and SSE streaming.

    app = build_app(ServerContext(async_engine, model_name, api_key=...))   # context.py

/v1/*, /tokenize and /detokenize require `Authorization: Bearer <api_key>` when an api_key is set;
/health, /version, /metrics and the dashboard (dashboard.py) stay open. Every error is OpenAI's body
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from tokenmill import __version__
from tokenmill.engine.async_engine import EngineDeadError, EngineStepError, QueueFullError
from tokenmill.engine.metrics import CONTENT_TYPE
from tokenmill.entrypoints.openai import completions, dashboard, tokenization
from tokenmill.entrypoints.openai.body_limit import BodyLimitMiddleware
from tokenmill.entrypoints.openai.context import ServerContext
from tokenmill.entrypoints.openai.inputs import RequestError
from tokenmill.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
)

logger = logging.getLogger("tokenmill")

_OPEN_PATHS = ("/health", "/version", "/metrics", *dashboard.OPEN_PATHS)


def error_response(status: int, message: str, error_type: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=error_type, param=param, code=status))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI, ctx: ServerContext) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                                  "BadRequestError")
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        return error_response(400, f"{param}: {message}" if param else message, "BadRequestError", param)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.error_type, exc.param)

    @app.exception_handler(QueueFullError)
    async def _queue_full(_: Request, exc: QueueFullError) -> JSONResponse:
        return error_response(429, str(exc), "RateLimitError", headers={"Retry-After": str(ctx.retry_after_s)})

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return error_response(503, str(exc), "ServiceUnavailableError")

    @app.exception_handler(EngineStepError)
    async def _step_failed(_: Request, exc: EngineStepError) -> JSONResponse:
        return error_response(500, str(exc), "InternalServerError")

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error while serving a request")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "InternalServerError")


def _install_auth(app: FastAPI, ctx: ServerContext) -> None:
    if not ctx.api_key:
        return
    expected = f"Bearer {ctx.api_key}".encode()

    @app.middleware("http")
    async def _auth(request: Request, call_next: object) -> Response:
        if request.url.path not in _OPEN_PATHS and request.method != "OPTIONS":
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return error_response(401, "Incorrect or missing API key (send `Authorization: Bearer <key>`).",
                                      "AuthenticationError")
        return await call_next(request)


def build_app(ctx: ServerContext) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        ctx.engine.start()
        try:
            yield
        finally:
            await ctx.engine.shutdown()
            ctx.close()  # the front-end pool

    app = FastAPI(title="tokenmill", version=__version__, lifespan=lifespan)
    app.state.ctx = ctx
    _install_error_handlers(app, ctx)
    _install_auth(app, ctx)
    app.add_middleware(BodyLimitMiddleware, max_bytes=ctx.limits.max_request_bytes)  # outermost: before any parsing
    dashboard.register_dashboard(app, ctx)  # GET /dashboard, /dashboard/data

    @app.get("/health")
    async def health() -> Response:
        if not ctx.engine.is_alive:
            return error_response(503, ctx.engine.dead_message, "ServiceUnavailableError")  # dead, or shutting down
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        body = ctx.engine.metrics.render() if ctx.engine.metrics is not None else b""
        return Response(body, media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=ctx.model_name, root=ctx.model_name, max_model_len=ctx.max_model_len)])

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> Response:
        ctx.check_model(body.model)
        return await ctx.run(tokenization.tokenize, ctx, body)  # off the event loop: it grows with the text

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Response:
        ctx.check_model(body.model)
        return await ctx.run(tokenization.detokenize, ctx, body)

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        return await completions.serve_completion(ctx, body, request, time.monotonic())

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        return await completions.serve_chat(ctx, body, request, time.monotonic())

    return app
