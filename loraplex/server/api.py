"""OpenAI-compatible HTTP API over :class:`AsyncLLMEngine`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
server-sent-event streaming), ``GET /v1/models``, ``POST /v1/load_lora_adapter``,
``POST /v1/unload_lora_adapter``, ``GET /health``, ``GET /metrics``.

The adapter of a request is its ``model``: the served model name (or nothing) is
the base model, an adapter's name or ``base:adapter`` selects that adapter.
Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loraplex.config import ServerConfig
from loraplex.errors import AdapterError, InvalidRequestError
from loraplex.multimodal.chat import split_chat_images
from loraplex.multimodal.inputs import load_image
from loraplex.server import protocol as P
from loraplex.server.async_engine import AsyncLLMEngine, EngineDeadError, RequestStream
from loraplex.server.metrics import ServerMetrics
from loraplex.types import LoRARequest, RequestOutput, SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[Union[int, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error(status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
           code: Optional[Union[int, str]] = None) -> JSONResponse:
    body = P.ErrorResponse(error=P.ErrorInfo(message=message, type=type_, param=param, code=code or status))
    return JSONResponse(body.model_dump(), status_code=status)


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
                return await _error(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                                    "authentication_error")(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await _error(413, f"request body of {length} bytes exceeds the limit of {self.max_body}")(
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
    served = cfg.served_model_name or os.path.basename(os.path.normpath(model_path))
    eng = engine.engine
    max_model_len = eng.max_model_len
    max_n = eng.scheduler.max_num_seqs
    metrics = ServerMetrics(engine.stats)
    last_token_at: dict[str, float] = {}

    def on_step(outs: list[RequestOutput], dt: float) -> None:
        metrics.step.observe(dt)
        now = time.monotonic()
        for out in outs:  # one new token per output and step: the gap since the previous one
            prev = last_token_at.get(out.request_id)
            if prev is not None:
                metrics.itl.observe(now - prev)
            if out.finished:
                last_token_at.pop(out.request_id, None)
            else:
                last_token_at[out.request_id] = now
        if len(last_token_at) > 4 * max_n + 64:  # aborted requests never finish: forget stale entries
            for rid in [r for r, t in last_token_at.items() if now - t > 60.0]:
                del last_token_at[rid]

    engine._on_step = on_step
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:  # after uvicorn's graceful shutdown: in-flight requests are done or aborted
            engine.shutdown()

    app = FastAPI(title="loraplex", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics

    # ---- errors ---------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return _error(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", []) if x != "body")
        return _error(400, f"invalid request: {where}: {first.get('msg', 'invalid value')}", param=where or None)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(_: Request, e: InvalidRequestError) -> JSONResponse:
        return _error(400, str(e))

    @app.exception_handler(AdapterError)
    async def _adapter(_: Request, e: AdapterError) -> JSONResponse:
        return _error(400, str(e))

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return _error(500, str(e), "internal_error")

    # ---- helpers --------------------------------------------------------------------------
    def resolve_adapter(model: Optional[str]) -> Optional[str]:
        if model is None or model == served:
            return None
        name = model
        if ":" in model:
            base, _, name = model.partition(":")
            if base != served:
                raise APIError(404, f"model {model!r} not found: base model is {served!r}", code="model_not_found")
        known = [r.name for r in engine.list_loras()]
        if name not in known:
            raise APIError(404, f"model {model!r} not found; available: {[served] + known}", param="model",
                           code="model_not_found")
        return name

    def sampling(req: P._SamplingFields, prompt_len: int, max_tokens: Optional[int], logprobs: Optional[int],
                 prompt_logprobs: Optional[int]) -> SamplingParams:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise APIError(400, f"{name} is not supported", param=name)
        if not 1 <= req.n <= max_n:
            raise APIError(400, f"n must be between 1 and {max_n} (max_num_seqs), got {req.n}", param="n")
        room = max_model_len - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens; max_model_len is {max_model_len}",
                           param="messages" if isinstance(req, P.ChatCompletionRequest) else "prompt")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"max_tokens ({max_tokens}) plus the prompt ({prompt_len} tokens) exceeds "
                                f"max_model_len ({max_model_len})", param="max_tokens")
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else room,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=-1 if req.top_k is None else req.top_k,
            seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        )

    def with_seed(params: SamplingParams, j: int) -> SamplingParams:
        if j == 0 or params.seed is None:
            return params
        import dataclasses

        return dataclasses.replace(params, seed=params.seed + j)  # n samples that differ, reproducibly

    def add_all(jobs: list[tuple[Any, SamplingParams, Optional[str], str]]) -> list[RequestStream]:
        """Add every sub-request now, so a bad one fails the call (with its HTTP status)
        before anything runs or streams; nothing is left behind on failure."""
        streams: list[RequestStream] = []
        try:
            for prompt, sp, lora, rid in jobs:
                streams.append(engine.add_request(prompt, sp, lora, rid))
        except BaseException:
            for st in streams:
                st.close()
            raise
        return streams

    async def merged(http: Request, streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of all streams as (index, output) in arrival order. A client that goes away
        aborts every unfinished sub-request (freeing KV blocks and adapter slots)."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, st: RequestStream) -> None:
            try:
                async for out in st:
                    await queue.put((i, out))
            except BaseException as e:
                await queue.put((i, e))

        async def watch_disconnect() -> None:
            while not await http.is_disconnected():
                await asyncio.sleep(0.2)
            await queue.put((-1, ConnectionError("client disconnected")))

        tasks = [asyncio.create_task(pump(i, st)) for i, st in enumerate(streams)]
        watcher = asyncio.create_task(watch_disconnect())
        try:
            done = 0
            while done < len(streams):
                i, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                done += item.finished
                yield i, item
        finally:
            watcher.cancel()
            for t in tasks:
                t.cancel()
            for st in streams:
                st.close()
            await asyncio.gather(*tasks, watcher, return_exceptions=True)

    async def event_stream(http: Request, streams: list[RequestStream], chunk: Any, usage_chunk: Any,
                           include_usage: bool, preamble: tuple[Any, ...] = ()) -> AsyncIterator[str]:
        """Server-sent events: ``preamble``, then ``chunk(index, output)`` (None: nothing to send) for
        every output, then the usage chunk when asked for, then ``[DONE]``."""
        usage = P.UsageInfo()
        for obj in preamble:
            yield sse(obj)
        try:
            async for idx, out in merged(http, streams):
                piece = chunk(idx, out)
                if piece is not None:
                    yield sse(piece)
                if out.finished:
                    finish_metrics(out)
                    usage.prompt_tokens += len(out.prompt_token_ids)
                    usage.completion_tokens += len(out.outputs[0].token_ids)
        except EngineDeadError as e:
            yield sse(P.ErrorResponse(error=P.ErrorInfo(message=str(e), type="internal_error", code=500)))
            return
        if include_usage:
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
            yield sse(usage_chunk(usage))
        yield "data: [DONE]\n\n"

    async def collect(http: Request, streams: list[RequestStream]) -> tuple[list[RequestOutput], P.UsageInfo]:
        """Final outputs of every stream, in order, and their token usage."""
        finals: dict[int, RequestOutput] = {}
        async for idx, out in merged(http, streams):
            if out.finished:
                finals[idx] = out
                finish_metrics(out)
        outs = [finals[i] for i in range(len(streams))]
        prompt = sum(len(o.prompt_token_ids) for o in outs)
        completion = sum(len(o.outputs[0].token_ids) for o in outs)
        return outs, P.UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def finish_metrics(out: RequestOutput) -> None:
        c = out.outputs[0]
        m = out.metrics
        now = time.monotonic()
        ttft = m["first_token_time"] - m["arrival_time"] if m.get("first_token_time") else None
        metrics.observe_finish(c.finish_reason, len(out.prompt_token_ids), len(c.token_ids), ttft,
                               now - m["arrival_time"])

    tok = eng.tokenizer

    def token_str(tid: int) -> str:
        return tok.decode([tid])

    def completion_logprobs(token_ids: list[int], lps: list[Optional[dict[int, float]]], k: int,
                            offset: int) -> P.CompletionLogprobs:
        out = P.CompletionLogprobs()
        for tid, lp in zip(token_ids, lps):
            s = token_str(tid)
            out.tokens.append(s)
            out.token_logprobs.append(None if lp is None else lp[tid])
            out.top_logprobs.append(None if lp is None else
                                    {token_str(t): v for t, v in sorted(lp.items(), key=lambda x: -x[1])[:max(k, 1)]})
            out.text_offset.append(offset)
            offset += len(s)
        return out

    def chat_logprobs(token_ids: list[int], lps: list[dict[int, float]], k: int) -> P.ChatLogprobs:
        content = []
        for tid, lp in zip(token_ids, lps):
            s = token_str(tid)
            top = [P.TopLogprob(token=token_str(t), logprob=v, bytes=list(token_str(t).encode()))
                   for t, v in sorted(lp.items(), key=lambda x: -x[1])[:k]]
            content.append(P.ChatTokenLogprob(token=s, logprob=lp[tid], bytes=list(s.encode()), top_logprobs=top))
        return P.ChatLogprobs(content=content)

    def sse(obj: Any) -> str:
        data = obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj)
        return f"data: {data}\n\n"

    # ---- routes ---------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            return _error(503, "engine is not running", "internal_error")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prom() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        cards = [P.ModelCard(id=served, root=model_path, max_model_len=max_model_len)]
        cards += [P.ModelCard(id=r.name, root=r.path, parent=served, max_model_len=max_model_len)
                  for r in engine.list_loras()]
        return P.ModelList(data=cards).model_dump()

    def runtime_updates_allowed() -> None:
        if not cfg.allow_runtime_lora_updates:
            raise APIError(403, "runtime adapter loading is disabled; start the server with "
                                "--allow-runtime-lora-updates --lora-root DIR", "permission_error")

    def checked_lora_path(path: str) -> str:
        root = os.path.realpath(cfg.lora_root)
        if ".." in path.replace("\\", "/").split("/"):
            raise APIError(400, f"lora_path {path!r} must not contain '..'", param="lora_path")
        full = os.path.realpath(path if os.path.isabs(path) else os.path.join(root, path))
        if os.path.commonpath([root, full]) != root:
            raise APIError(400, f"lora_path {path!r} resolves outside the allowed --lora-root", param="lora_path")
        return full

    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: P.LoadLoRARequest) -> Response:
        runtime_updates_allowed()
        if body.lora_name == served or ":" in body.lora_name:
            raise APIError(400, f"invalid adapter name {body.lora_name!r}", param="lora_name")
        path = checked_lora_path(body.lora_path)
        await engine.load_lora(LoRARequest(body.lora_name, path), reload=body.load_inplace)
        verb = "reloaded" if body.load_inplace else "loaded"
        return Response(f"adapter {body.lora_name!r} {verb}", media_type="text/plain")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: P.UnloadLoRARequest) -> Response:
        runtime_updates_allowed()
        if body.lora_name not in [r.name for r in engine.list_loras()]:
            raise APIError(404, f"adapter {body.lora_name!r} is not loaded", param="lora_name", code="lora_not_found")
        await engine.unload_lora(body.lora_name)
        return Response(f"adapter {body.lora_name!r} unloaded", media_type="text/plain")

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, http: Request) -> Any:
        lora = resolve_adapter(body.model)
        model_name = body.model or served
        raw = body.prompt
        if isinstance(raw, str):
            prompts: list[Any] = [raw]
        elif raw and all(isinstance(x, int) for x in raw):
            prompts = [list(raw)]
        else:
            prompts = list(raw)
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if body.logprobs is not None and not 0 <= body.logprobs <= SamplingParams.MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be in [0, {SamplingParams.MAX_LOGPROBS}]", param="logprobs")
        rid = P.random_id("cmpl")
        jobs, texts = [], []
        for i, p in enumerate(prompts):
            text, ids = engine.tokenize(p if isinstance(p, str) else {"prompt_token_ids": p})
            texts.append(text if text is not None else tok.decode(ids))
            max_tokens = 16 if body.max_tokens is None else body.max_tokens
            params = sampling(body, len(ids), max_tokens, body.logprobs,
                              body.logprobs if body.echo and body.logprobs is not None else None)
            for j in range(body.n):
                jobs.append(({"prompt_token_ids": ids, "prompt": text}, with_seed(params, j), lora, f"{rid}-{i}-{j}"))
        k = body.logprobs or 0

        def choice_logprobs(out: RequestOutput, ntok_sent: int, echo_now: bool) -> Optional[P.CompletionLogprobs]:
            if body.logprobs is None:
                return None
            c = out.outputs[0]
            toks, lps = c.token_ids[ntok_sent:], c.logprobs[ntok_sent:]
            if echo_now:
                toks = out.prompt_token_ids + toks
                lps = (out.prompt_logprobs or [None] * len(out.prompt_token_ids)) + lps
            return completion_logprobs(toks, lps, k, 0)

        streams = add_all(jobs)
        if body.stream:
            sent_tokens = [0] * len(jobs)
            echoed = [False] * len(jobs)

            def chunk(idx: int, out: RequestOutput) -> Optional[P.CompletionResponse]:
                c = out.outputs[0]
                text = c.text_delta
                echo_now = body.echo and not echoed[idx]
                if echo_now:
                    text = texts[idx // body.n] + text
                    echoed[idx] = True
                lp = choice_logprobs(out, sent_tokens[idx], echo_now)
                sent_tokens[idx] = len(c.token_ids)
                if not (text or lp or out.finished):
                    return None
                return P.CompletionResponse(id=rid, model=model_name, choices=[P.CompletionChoice(
                    index=idx, text=text, logprobs=lp, finish_reason=c.finish_reason, stop_reason=c.stop_reason)])

            return StreamingResponse(event_stream(
                http, streams, chunk, lambda u: P.CompletionResponse(id=rid, model=model_name, choices=[], usage=u),
                bool(body.stream_options and body.stream_options.include_usage)), media_type="text/event-stream")

        outs, usage = await collect(http, streams)
        choices = []
        for idx, out in enumerate(outs):
            c = out.outputs[0]
            text = (texts[idx // body.n] + c.text) if body.echo else c.text
            choices.append(P.CompletionChoice(index=idx, text=text, logprobs=choice_logprobs(out, 0, body.echo),
                                              finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        return P.CompletionResponse(id=rid, model=model_name, choices=choices, usage=usage).model_dump()

    @app.post("/v1/chat/completions")
    async def chat(body: P.ChatCompletionRequest, http: Request) -> Any:
        lora = resolve_adapter(body.model)
        model_name = body.model or served
        if not body.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        raw = [m.model_dump(exclude_none=True) for m in body.messages]
        if eng.mm_processor is not None:  # vision-language model: image parts become placeholders + images
            messages, sources = split_chat_images(raw, eng.mm_processor.image_placeholder(tok))
        else:
            messages, sources = split_chat_images(raw, "")
            if sources:
                raise APIError(400, f"model {served!r} ({type(eng.model).__name__}) does not accept images",
                               param="messages")
        images = []
        if sources:  # decoding (and, if allowed, fetching) images is slow: off the event loop
            limit = eng.config.model_config.max_image_pixels
            images = await asyncio.get_running_loop().run_in_executor(None, lambda: [
                load_image(src, allow_remote=cfg.allow_remote_images, max_pixels=limit) for src in sources])
        ids = engine.chat_template(messages, body.add_generation_prompt)
        top = body.top_logprobs if body.top_logprobs is not None else 0
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if not 0 <= top <= SamplingParams.MAX_LOGPROBS:
            raise APIError(400, f"top_logprobs must be in [0, {SamplingParams.MAX_LOGPROBS}]", param="top_logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = sampling(body, len(ids), max_tokens, top if body.logprobs else None, None)
        rid = P.random_id("chatcmpl")
        prompt: dict[str, Any] = {"prompt_token_ids": ids}
        if images:
            prompt["multi_modal_data"] = {"image": images}
        jobs = [(prompt, with_seed(params, j), lora, f"{rid}-{j}") for j in range(body.n)]
        echo_text = messages[-1]["content"] if body.echo and messages else ""

        streams = add_all(jobs)
        if body.stream:
            sent_tokens = [0] * len(jobs)

            def chunk(j: int, out: RequestOutput) -> Optional[P.ChatCompletionChunk]:
                c = out.outputs[0]
                lp = None
                if body.logprobs:
                    lp = chat_logprobs(c.token_ids[sent_tokens[j]:], c.logprobs[sent_tokens[j]:], top)
                sent_tokens[j] = len(c.token_ids)
                if not (c.text_delta or out.finished or (lp and lp.content)):
                    return None
                return P.ChatCompletionChunk(id=rid, model=model_name, choices=[P.ChatStreamChoice(
                    index=j, delta=P.DeltaMessage(content=c.text_delta), logprobs=lp, finish_reason=c.finish_reason)])

            first = tuple(P.ChatCompletionChunk(id=rid, model=model_name, choices=[P.ChatStreamChoice(
                index=j, delta=P.DeltaMessage(role="assistant", content=echo_text))]) for j in range(len(jobs)))
            return StreamingResponse(event_stream(
                http, streams, chunk, lambda u: P.ChatCompletionChunk(id=rid, model=model_name, choices=[], usage=u),
                bool(body.stream_options and body.stream_options.include_usage), first),
                media_type="text/event-stream")

        outs, usage = await collect(http, streams)
        choices = []
        for j, out in enumerate(outs):
            c = out.outputs[0]
            lp = chat_logprobs(c.token_ids, c.logprobs, top) if body.logprobs else None
            choices.append(P.ChatChoice(index=j, message=P.ChatResponseMessage(content=echo_text + c.text),
                                        logprobs=lp, finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        return P.ChatCompletionResponse(id=rid, model=model_name, choices=choices, usage=usage).model_dump()

    return app


def wrap(app: FastAPI, cfg: ServerConfig) -> GuardMiddleware:
    """The ASGI app to serve: ``app`` behind the API-key and body-size guard."""
    return GuardMiddleware(app, cfg.api_key, cfg.max_request_body_bytes)
