"""Shared machinery of the OpenAI routes: adapter resolution, request limits, sub-request
fan-out with disconnect handling, server-sent events, logprob formatting and metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from typing import Any, AsyncIterator, Optional, Union

from fastapi import Request
from fastapi.responses import JSONResponse

from loraplex.config import ServerConfig
from loraplex.server import protocol as P
from loraplex.server.async_engine import AsyncLLMEngine, EngineDeadError, RequestStream
from loraplex.server.metrics import ServerMetrics
from loraplex.types import RequestOutput, SamplingParams


class APIError(Exception):
    """An error with its HTTP status, rendered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[Union[int, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                   code: Optional[Union[int, str]] = None) -> JSONResponse:
    body = P.ErrorResponse(error=P.ErrorInfo(message=message, type=type_, param=param, code=code or status))
    return JSONResponse(body.model_dump(), status_code=status)


def sse(obj: Any) -> str:
    data = obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n"


class Serving:
    """What every route needs: the engine, the served name, the limits and the metrics."""

    def __init__(self, engine: AsyncLLMEngine, cfg: ServerConfig, model_path: str) -> None:
        self.engine = engine
        self.cfg = cfg
        self.model_path = model_path
        self.served = cfg.served_model_name or os.path.basename(os.path.normpath(model_path))
        self.eng = engine.engine
        self.tok = self.eng.tokenizer
        self.max_model_len = self.eng.max_model_len
        self.max_n = self.eng.scheduler.max_num_seqs
        self.metrics = ServerMetrics(engine.stats)
        self.last_token_at: dict[str, float] = {}
        engine._on_step = self.on_step

    def resolve_adapter(self, model: Optional[str]) -> Optional[str]:
        if model is None or model == self.served:
            return None
        name = model
        if ":" in model:
            base, _, name = model.partition(":")
            if base != self.served:
                raise APIError(404, f"model {model!r} not found: base model is {self.served!r}", code="model_not_found")
        known = [r.name for r in self.engine.list_loras()]
        if name not in known:
            raise APIError(404, f"model {model!r} not found; available: {[self.served] + known}", param="model",
                           code="model_not_found")
        return name

    def sampling(self, req: P._SamplingFields, prompt_len: int, max_tokens: Optional[int], logprobs: Optional[int],
                 prompt_logprobs: Optional[int]) -> SamplingParams:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise APIError(400, f"{name} is not supported", param=name)
        if not 1 <= req.n <= self.max_n:
            raise APIError(400, f"n must be between 1 and {self.max_n} (max_num_seqs), got {req.n}", param="n")
        room = self.max_model_len - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens; max_model_len is {self.max_model_len}",
                           param="messages" if isinstance(req, P.ChatCompletionRequest) else "prompt")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"max_tokens ({max_tokens}) plus the prompt ({prompt_len} tokens) exceeds "
                                f"max_model_len ({self.max_model_len})", param="max_tokens")
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else room,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=-1 if req.top_k is None else req.top_k,
            seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        )

    @staticmethod
    def with_seed(params: SamplingParams, j: int) -> SamplingParams:
        if j == 0 or params.seed is None:
            return params
        return dataclasses.replace(params, seed=params.seed + j)  # n samples that differ, reproducibly

    def add_all(self, jobs: list[tuple[Any, SamplingParams, Optional[str], str]]) -> list[RequestStream]:
        """Add every sub-request now, so a bad one fails the call (with its HTTP status)
        before anything runs or streams; nothing is left behind on failure."""
        streams: list[RequestStream] = []
        try:
            for prompt, sp, lora, rid in jobs:
                streams.append(self.engine.add_request(prompt, sp, lora, rid))
        except BaseException:
            for st in streams:
                st.close()
            raise
        return streams

    async def merged(self, http: Request, streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
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

    async def event_stream(self, http: Request, streams: list[RequestStream], chunk: Any, usage_chunk: Any,
                           include_usage: bool, preamble: tuple[Any, ...] = ()) -> AsyncIterator[str]:
        """Server-sent events: ``preamble``, then ``chunk(index, output)`` (None: nothing to send) for
        every output, then the usage chunk when asked for, then ``[DONE]``."""
        usage = P.UsageInfo()
        for obj in preamble:
            yield sse(obj)
        try:
            async for idx, out in self.merged(http, streams):
                piece = chunk(idx, out)
                if piece is not None:
                    yield sse(piece)
                if out.finished:
                    self.finish_metrics(out)
                    usage.prompt_tokens += len(out.prompt_token_ids)
                    usage.completion_tokens += len(out.outputs[0].token_ids)
        except EngineDeadError as e:
            yield sse(P.ErrorResponse(error=P.ErrorInfo(message=str(e), type="internal_error", code=500)))
            return
        if include_usage:
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
            yield sse(usage_chunk(usage))
        yield "data: [DONE]\n\n"

    async def collect(self, http: Request, streams: list[RequestStream]) -> tuple[list[RequestOutput], P.UsageInfo]:
        """Final outputs of every stream, in order, and their token usage."""
        finals: dict[int, RequestOutput] = {}
        async for idx, out in self.merged(http, streams):
            if out.finished:
                finals[idx] = out
                self.finish_metrics(out)
        outs = [finals[i] for i in range(len(streams))]
        prompt = sum(len(o.prompt_token_ids) for o in outs)
        completion = sum(len(o.outputs[0].token_ids) for o in outs)
        return outs, P.UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def finish_metrics(self, out: RequestOutput) -> None:
        c = out.outputs[0]
        m = out.metrics
        now = time.monotonic()
        ttft = m["first_token_time"] - m["arrival_time"] if m.get("first_token_time") else None
        self.metrics.observe_finish(c.finish_reason, len(out.prompt_token_ids), len(c.token_ids), ttft,
                                    now - m["arrival_time"])

    def token_str(self, tid: int) -> str:
        return self.tok.decode([tid])

    def completion_logprobs(self, token_ids: list[int], lps: list[Optional[dict[int, float]]], k: int,
                            offset: int) -> P.CompletionLogprobs:
        out = P.CompletionLogprobs()
        for tid, lp in zip(token_ids, lps):
            s = self.token_str(tid)
            out.tokens.append(s)
            out.token_logprobs.append(None if lp is None else lp[tid])
            top = None if lp is None else sorted(lp.items(), key=lambda x: -x[1])[:max(k, 1)]
            out.top_logprobs.append(None if top is None else {self.token_str(t): v for t, v in top})
            out.text_offset.append(offset)
            offset += len(s)
        return out

    def chat_logprobs(self, token_ids: list[int], lps: list[dict[int, float]], k: int) -> P.ChatLogprobs:
        content = []
        for tid, lp in zip(token_ids, lps):
            s = self.token_str(tid)
            top = [P.TopLogprob(token=self.token_str(t), logprob=v, bytes=list(self.token_str(t).encode()))
                   for t, v in sorted(lp.items(), key=lambda x: -x[1])[:k]]
            content.append(P.ChatTokenLogprob(token=s, logprob=lp[tid], bytes=list(s.encode()), top_logprobs=top))
        return P.ChatLogprobs(content=content)

    def on_step(self, outs: list[RequestOutput], dt: float) -> None:
        self.metrics.step.observe(dt)
        now = time.monotonic()
        for out in outs:  # one new token per output and step: the gap since the previous one
            prev = self.last_token_at.get(out.request_id)
            if prev is not None:
                self.metrics.itl.observe(now - prev)
            if out.finished:
                self.last_token_at.pop(out.request_id, None)
            else:
                self.last_token_at[out.request_id] = now
        if len(self.last_token_at) > 4 * self.max_n + 64:  # aborted requests never finish: forget stale entries
            for rid in [r for r, t in self.last_token_at.items() if now - t > 60.0]:
                del self.last_token_at[rid]

    def runtime_updates_allowed(self) -> None:
        if not self.cfg.allow_runtime_lora_updates:
            raise APIError(403, "runtime adapter loading is disabled; start the server with "
                                "--allow-runtime-lora-updates --lora-root DIR", "permission_error")

    def checked_lora_path(self, path: str) -> str:
        root = os.path.realpath(self.cfg.lora_root)
        if ".." in path.replace("\\", "/").split("/"):
            raise APIError(400, f"lora_path {path!r} must not contain '..'", param="lora_path")
        full = os.path.realpath(path if os.path.isabs(path) else os.path.join(root, path))
        if os.path.commonpath([root, full]) != root:
            raise APIError(400, f"lora_path {path!r} resolves outside the allowed --lora-root", param="lora_path")
        return full
