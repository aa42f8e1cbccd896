"""OpenAI-compatible HTTP API over :class:`AsyncLLMEngine`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
server-sent-event streaming), ``GET /v1/models``, ``POST /v1/load_lora_adapter``,
``POST /v1/unload_lora_adapter``, ``GET /health``, ``GET /metrics``.

The adapter of a request is its ``model``: the served model name (or nothing) is
the base model, an adapter's name or ``base:adapter`` selects that adapter.
Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import hmac
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from loraplex.config import ServerConfig
from loraplex.errors import AdapterError, InvalidRequestError
from loraplex.server import protocol as P
from loraplex.server.async_engine import AsyncLLMEngine, EngineDeadError
from loraplex.server.openai_routes import create_chat_completion, create_completion
from loraplex.server.serving import APIError, Serving, error_response
from loraplex.types import LoRARequest


class GuardMiddleware:
    """API-key check (every route but /health) and a request-body size limit, as raw ASGI
    so oversized bodies are refused before they are read into memory."""

    def __init__(self, app: Any, api_key: Optional[str], max_body: int) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope.get("path") != "/health":
            auth = headers.get("authorization", "")
            if not hmac.compare_digest(auth.encode(), f"Bearer {self.api_key}".encode()):
                return await error_response(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                                            "authentication_error")(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await error_response(413, f"request body of {length} bytes exceeds the limit of {self.max_body}")(
                scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise APIError(413, f"request body exceeds the limit of {self.max_body} bytes")
            return message

        await self.app(scope, limited_receive, send)


def build_app(engine: AsyncLLMEngine, cfg: ServerConfig, model_path: str) -> FastAPI:
    sv = Serving(engine, cfg, model_path)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:  # after uvicorn's graceful shutdown: in-flight requests are done or aborted
            engine.shutdown()

    app = FastAPI(title="loraplex", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.serving = sv

    # ---- errors ---------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", []) if x != "body")
        return error_response(400, f"invalid request: {where}: {first.get('msg', 'invalid value')}",
                              param=where or None)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(_: Request, e: InvalidRequestError) -> JSONResponse:
        return error_response(400, str(e))

    @app.exception_handler(AdapterError)
    async def _adapter(_: Request, e: AdapterError) -> JSONResponse:
        return error_response(400, str(e))

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return error_response(500, str(e), "internal_error")

    # ---- routes ---------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            return error_response(503, "engine is not running", "internal_error")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prom() -> Response:
        return Response(sv.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        cards = [P.ModelCard(id=sv.served, root=model_path, max_model_len=sv.max_model_len)]
        cards += [P.ModelCard(id=r.name, root=r.path, parent=sv.served, max_model_len=sv.max_model_len)
                  for r in engine.list_loras()]
        return P.ModelList(data=cards).model_dump()

    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: P.LoadLoRARequest) -> Response:
        sv.runtime_updates_allowed()
        if body.lora_name == sv.served or ":" in body.lora_name:
            raise APIError(400, f"invalid adapter name {body.lora_name!r}", param="lora_name")
        path = sv.checked_lora_path(body.lora_path)
        await engine.load_lora(LoRARequest(body.lora_name, path), reload=body.load_inplace)
        verb = "reloaded" if body.load_inplace else "loaded"
        return Response(f"adapter {body.lora_name!r} {verb}", media_type="text/plain")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: P.UnloadLoRARequest) -> Response:
        sv.runtime_updates_allowed()
        if body.lora_name not in [r.name for r in engine.list_loras()]:
            raise APIError(404, f"adapter {body.lora_name!r} is not loaded", param="lora_name", code="lora_not_found")
        await engine.unload_lora(body.lora_name)
        return Response(f"adapter {body.lora_name!r} unloaded", media_type="text/plain")

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, http: Request) -> Any:
        return await create_completion(sv, body, http)

    @app.post("/v1/chat/completions")
    async def chat(body: P.ChatCompletionRequest, http: Request) -> Any:
        return await create_chat_completion(sv, body, http)

    return app


def wrap(app: FastAPI, cfg: ServerConfig) -> GuardMiddleware:
    """The ASGI app to serve: ``app`` behind the API-key and body-size guard."""
    return GuardMiddleware(app, cfg.api_key, cfg.max_request_body_bytes)
