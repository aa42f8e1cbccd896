"""OpenAI-compatible HTTP API, in the HTTP process, over :class:`EngineClient` (the engine process).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
server-sent-event streaming), ``GET /v1/models``, ``POST /v1/load_lora_adapter``,
``POST /v1/unload_lora_adapter``, ``GET /health``, ``GET /metrics``.

The adapter of a request is its ``model``: the served model name (or nothing) is
the base model, an adapter's name or ``base:adapter`` selects that adapter.
Every error, for any body, route or method, uses OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Optional

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.config import ServerConfig
from loraplex.errors import AdapterError, InvalidRequestError
from loraplex.lora.pool import validate_adapter_name
from loraplex.server import protocol as P
from loraplex.server.engine_client import EngineClient, EngineDeadError
from loraplex.server.openai_routes import create_chat_completion, create_completion
from loraplex.server.serving import (APIError, ClientGone, Serving, ShuttingDown, error_response, parse_body,
                                     validation_message)

logger = logging.getLogger("loraplex.server")


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

        async def limited_receive() -> dict:  # chunked bodies have no content-length: count as they come
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise APIError(413, f"request body exceeds the limit of {self.max_body} bytes")
            return message

        await self.app(scope, limited_receive, send)


def build_app(client: EngineClient, cfg: ServerConfig, model_path: str, tokenizer: Any,
              chat_template: Optional[str] = None) -> FastAPI:
    """The FastAPI app over a started engine client. ``chat_template`` (template text) defaults to
    ``cfg.chat_template`` loaded as a file or inline Jinja. ``app.state.on_engine_dead`` (set by the
    runner) is called about a second after the engine process dies, to stop the server."""
    if chat_template is None and cfg.chat_template:
        from loraplex.multimodal.chat import load_chat_template

        chat_template = load_chat_template(cfg.chat_template)
    sv = Serving(client, cfg, model_path, tokenizer, chat_template)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client.attach(asyncio.get_running_loop())
        try:
            yield
        finally:  # after uvicorn's graceful shutdown: in-flight requests are done or cut
            await asyncio.get_running_loop().run_in_executor(None, client.shutdown)

    app = FastAPI(title="loraplex", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.serving = sv
    app.state.on_engine_dead = None

    def engine_dead(reason: str) -> None:
        hook: Optional[Callable[[], None]] = app.state.on_engine_dead
        if hook is not None:  # /health answers 503 meanwhile
            asyncio.get_running_loop().call_later(1.0, hook)

    client.on_dead = engine_dead

    # ---- errors ---------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = validation_message(e)
        return error_response(400, message, param=param)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(_: Request, e: InvalidRequestError) -> JSONResponse:
        return error_response(400, str(e))

    @app.exception_handler(AdapterError)
    async def _adapter(_: Request, e: AdapterError) -> JSONResponse:
        return error_response(400, str(e))

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return error_response(503, str(e), "internal_error")

    @app.exception_handler(ShuttingDown)
    async def _shutting_down(_: Request, e: ShuttingDown) -> JSONResponse:
        return error_response(503, str(e), "server_error")

    @app.exception_handler(ClientGone)
    async def _gone(_: Request, e: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; no traceback in the log

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif e.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(e.detail)
        return error_response(e.status_code, message, code=e.status_code)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:  # a bug of ours: still OpenAI's shape
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(e).__name__}", "internal_error")

    # ---- routes ---------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if not client.is_running:
            return error_response(503, f"the engine is not running: {client.dead or 'stopped'}", "internal_error")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prom() -> Response:
        return Response(sv.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        cards = [P.ModelCard(id=sv.served, root=model_path, max_model_len=sv.max_model_len, vocab_size=sv.vocab_size)]
        cards += [P.ModelCard(id=name, root=path, parent=sv.served, max_model_len=sv.max_model_len,
                              vocab_size=sv.vocab_for(name), versions=client.lora_versions.get(name),
                              pinned=name in client.lora_pinned)
                  for name, path in sorted(client.loras.items())]
        return P.ModelList(data=cards).model_dump()

    @app.post("/v1/pin_lora_adapter")
    async def pin_lora(http: Request) -> Response:
        """loraplex's own route: keep an adapter in a device slot ({"lora_name", "pinned": true}) or release
        it ("pinned": false)."""
        sv.runtime_updates_allowed()
        body = await parse_body(http, P.PinLoRARequest)
        if body.lora_name not in client.loras:
            raise APIError(404, f"adapter {body.lora_name[:300]!r} is not loaded", param="lora_name",
                           code="model_not_found")
        await client.pin_lora(body.lora_name, body.pinned)
        return Response(f"adapter {body.lora_name!r} {'pinned' if body.pinned else 'unpinned'}",
                        media_type="text/plain")

    @app.post("/v1/load_lora_adapter")
    async def load_lora(http: Request) -> Response:
        sv.runtime_updates_allowed()
        body = await parse_body(http, P.LoadLoRARequest)
        if body.lora_name == sv.served:
            raise APIError(400, f"adapter name {body.lora_name!r} is the served model's name", param="lora_name")
        try:
            validate_adapter_name(body.lora_name)
        except AdapterError as e:
            raise APIError(400, str(e), param="lora_name") from None
        path = sv.checked_lora_path(body.lora_path)
        await client.load_lora(body.lora_name, path, reload=body.load_inplace, root=cfg.lora_root)
        verb = "reloaded" if body.load_inplace else "loaded"
        return Response(f"adapter {body.lora_name!r} {verb}", media_type="text/plain")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(http: Request) -> Response:
        sv.runtime_updates_allowed()
        body = await parse_body(http, P.UnloadLoRARequest)
        if body.lora_name not in client.loras:
            raise APIError(404, f"adapter {body.lora_name[:300]!r} is not loaded", param="lora_name",
                           code="lora_not_found")
        await client.unload_lora(body.lora_name)
        return Response(f"adapter {body.lora_name!r} unloaded", media_type="text/plain")

    @app.post("/v1/completions")
    async def completions(http: Request) -> Any:
        return await create_completion(sv, await parse_body(http, P.CompletionRequest), http)

    @app.post("/v1/chat/completions")
    async def chat(http: Request) -> Any:
        return await create_chat_completion(sv, await parse_body(http, P.ChatCompletionRequest), http)

    return app


def wrap(app: FastAPI, cfg: ServerConfig) -> GuardMiddleware:
    """The ASGI app to serve: ``app`` behind the API-key and body-size guard."""
    return GuardMiddleware(app, cfg.api_key, cfg.max_request_body_bytes)


class HTTPServer(uvicorn.Server):
    """uvicorn's server that cuts requests still running when the graceful-shutdown period ends
    (an SSE error event for streams, 503 for the rest) instead of leaving them to be cancelled
    mid-write, and that stops when the engine process dies (``engine_died`` is then set)."""

    def __init__(self, app: FastAPI, cfg: ServerConfig, **kwargs: Any) -> None:
        self.grace = cfg.timeout_graceful_shutdown
        # uvicorn's own cancel is a backstop behind our cut
        super().__init__(uvicorn.Config(wrap(app, cfg), host=cfg.host, port=cfg.port, lifespan="on",
                                        timeout_graceful_shutdown=self.grace + 5.0, **kwargs))
        self.serving: Serving = app.state.serving
        self.engine_died = False

        def stop() -> None:
            self.engine_died = True
            self.should_exit = True

        app.state.on_engine_dead = stop

    async def shutdown(self, sockets: Any = None) -> None:
        self.serving.begin_shutdown(max(0.0, self.grace - 0.5))
        await super().shutdown(sockets)
