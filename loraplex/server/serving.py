"""Shared machinery of the OpenAI routes, in the HTTP process: body parsing, adapter resolution,
request limits, tokenisation off the event loop, sub-request fan-out with disconnect and
shutdown handling, server-sent events, logprob formatting and metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Optional, TypeVar, Union

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from loraplex.config import ServerConfig
from loraplex.errors import AdapterError
from loraplex.lora.pool import validate_adapter_name
from loraplex.server import protocol as P
from loraplex.server.engine_client import EngineClient, EngineDeadError, RequestState, RequestStream
from loraplex.server.metrics import ServerMetrics
from loraplex.types import RequestDelta, SamplingParams

logger = logging.getLogger("loraplex.server")
M = TypeVar("M", bound=BaseModel)
_SURROGATE = re.compile("[\ud800-\udfff]")


class APIError(Exception):
    """An error with its HTTP status, rendered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[Union[int, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


class ClientGone(Exception):
    """The client hung up; its sub-requests were aborted. Nothing is sent back."""


class ShuttingDown(Exception):
    """The server is stopping and the graceful-shutdown time ran out for this request."""


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                   code: Optional[Union[int, str]] = None) -> JSONResponse:
    body = P.ErrorResponse(error=P.ErrorInfo(message=message, type=type_, param=param, code=code or status))
    return JSONResponse(body.model_dump(), status_code=status)


def sse(obj: Any) -> str:
    data = obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n"


def sse_error(message: str, type_: str, code: int) -> str:
    return sse(P.ErrorResponse(error=P.ErrorInfo(message=message, type=type_, code=code)))


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "constrained-int", "constrained-float"}


def _where(loc: tuple) -> Optional[str]:
    """A validation error's location as a dotted field path, without pydantic's union member tags
    (``prompt.list[int].0`` -> ``prompt.0``)."""
    parts = [str(x) for x in loc if x != "body" and not (isinstance(x, str) and (x in _TYPE_TAGS or "[" in x))]
    return ".".join(parts) or None


def validation_message(e: ValidationError) -> tuple[str, Optional[str]]:
    """The first error of a pydantic validation, as (message, param)."""
    errs = e.errors(include_url=False)
    first = errs[0] if errs else {}
    where = _where(tuple(first.get("loc", ())))
    return f"invalid request: {where or 'body'}: {first.get('msg', 'invalid value')}", where


def _find_surrogate(data: Any) -> Optional[str]:
    """The path of the first string holding a lone UTF-16 surrogate (JSON allows "\\ud800"; no
    tokenizer or UTF-8 encoder does). Iterative: JSON may nest up to the parser's depth limit."""
    todo: list[tuple[str, Any]] = [("", data)]
    while todo:
        path, v = todo.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return path or "body"
        elif isinstance(v, dict):
            for k, x in v.items():
                if _SURROGATE.search(k):
                    return (path + "." if path else "") + "<key>"
                todo.append(((path + "." if path else "") + k, x))
        elif isinstance(v, list):
            todo.extend((f"{path}.{i}" if path else str(i), x) for i, x in enumerate(v))
    return None


async def parse_body(http: Request, model: type[M]) -> M:
    """The request body as ``model``, or an :class:`APIError` 400 that says what is wrong with it:
    not UTF-8, not JSON (with line and column), nested too deeply, not an object, a lone surrogate,
    or a field of the wrong type or range (``param`` names the field)."""
    raw = await http.body()  # GuardMiddleware refuses bodies over the size limit (413) while reading
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") \
            from None
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    bad = _find_surrogate(data)
    if bad is not None:
        raise APIError(400, f"invalid request: {bad}: a string holds a lone UTF-16 surrogate (not valid Unicode)",
                       param=bad)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = validation_message(e)
        raise APIError(400, message, param=param) from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None


def max_chars_per_token(tokenizer: Any) -> int:
    """An upper bound on the characters of text one token stands for, from the vocabulary's raw
    token strings (byte-level tokens show one character per byte, so raw length >= decoded length),
    doubled for normalisers that fold several characters into one."""
    longest = max((len(t) for t in tokenizer.get_vocab()), default=16)
    return 2 * max(longest, 1)


@dataclasses.dataclass
class Job:
    """One sub-request of an HTTP request: a prompt (tokenised) and its sampling parameters."""

    prompt: dict
    params: SamplingParams
    lora: Optional[str]
    request_id: str


class Serving:
    """What every route needs: the engine client, the tokenizer, the limits and the metrics."""

    def __init__(self, client: EngineClient, cfg: ServerConfig, model_path: str, tokenizer: Any,
                 chat_template: Optional[str] = None) -> None:
        self.client = client
        self.cfg = cfg
        self.model_path = model_path
        self.served = cfg.served_model_name or os.path.basename(os.path.normpath(model_path))
        self.tok = tokenizer
        self.chat_template = chat_template
        self.max_model_len = client.max_model_len
        self.vocab_size = client.vocab_size
        self.max_n = client.max_num_seqs
        self.max_seqs = cfg.max_seqs_per_request or client.max_num_seqs
        # Tokenisation and chat rendering run here, one at a time (the fast tokenizer is not meant for
        # concurrent use), off the event loop.
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-tokenize")
        self.max_prompt_chars = self.max_model_len * max_chars_per_token(tokenizer)
        self.metrics = ServerMetrics(lambda: client.stats, base=self.served, max_adapters=cfg.max_adapter_metrics)
        self.metrics.registered = lambda: list(client.loras)
        self._adapter_toks: dict[tuple[str, str], Any] = {}  # (adapter, folder) -> its tokenizer (added tokens)
        client.on_step = self.on_step
        self.shutting_down = False
        self._active: set[asyncio.Queue] = set()

    # ---- adapters -------------------------------------------------------------------------------
    def _parse_model(self, model: Optional[str]) -> Optional[tuple[str, str]]:
        """``model`` as (adapter name, version or ""): None for the base model; ``base:name@version`` with
        another base is a 404."""
        if model is None or model == self.served:
            return None
        name = model
        if ":" in model:
            base, _, name = model.partition(":")
            if base != self.served:
                raise APIError(404, f"model {model[:300]!r} not found: base model is {self.served!r}", param="model",
                               code="model_not_found")
        name, _, version = name.partition("@")  # "name@version": one version of it
        return name, version

    async def resolve_adapter(self, model: Optional[str]) -> Optional[str]:
        """The adapter a request's ``model`` names (None: the base model), as ``name`` or ``name@version``; an
        adapter that is not registered is looked for by the engine's resolvers first (lora_resolvers), off
        its step loop."""
        parsed = self._parse_model(model)
        if parsed is None:
            return None
        name, version = parsed
        if name and name not in self.client.loras and self.client.info.get("lora_resolvers"):
            try:
                validate_adapter_name(name)
                await self.client.resolve_lora(name)
            except AdapterError as e:
                raise APIError(404, str(e), param="model", code="model_not_found") from None
        if name not in self.client.loras:
            available = [self.served] + sorted(self.client.loras)
            raise APIError(404, f"model {model[:300]!r} not found; available: {available}", param="model",
                           code="model_not_found")
        if version:
            versions = self.client.lora_versions.get(name, [])
            if version not in versions:
                raise APIError(404, f"adapter {name!r} has no version {version[:100]!r}; versions: {versions}",
                               param="model", code="model_not_found")
            return f"{name}@{version}"
        return name

    def tokenizer_for(self, lora: Optional[str]) -> Any:
        """The tokenizer of ``lora``'s requests: the adapter's own when it adds tokens, else the model's."""
        lora = lora.partition("@")[0] if lora is not None else None
        if lora is None or lora not in self.client.lora_vocab:
            return self.tok
        key = (lora, self.client.loras[lora])
        tok = self._adapter_toks.get(key)
        if tok is None:
            from loraplex.tokenizer import load_tokenizer

            tok = self._adapter_toks[key] = load_tokenizer(key[1])
        return tok

    def vocab_for(self, lora: Optional[str]) -> int:
        if lora is None:
            return self.vocab_size
        return self.client.lora_vocab.get(lora.partition("@")[0], self.vocab_size)

    # ---- prompts --------------------------------------------------------------------------------
    def check_seqs(self, num_prompts: int, n: int) -> None:
        if num_prompts * n > self.max_seqs:
            raise APIError(400, f"this request asks for {num_prompts} prompt(s) x n={n} = {num_prompts * n} sequences; "
                                f"the limit is {self.max_seqs} per request (--max-seqs-per-request)",
                           param="n" if n > 1 else "prompt")

    def check_chars(self, nchars: int, param: str) -> None:
        """Refuse a prompt that cannot fit max_model_len without tokenising it."""
        if nchars > self.max_prompt_chars:
            raise APIError(400, f"the prompt has {nchars} characters, more than max_model_len ({self.max_model_len} "
                                "tokens) can hold with this vocabulary", param=param)

    def check_ids(self, ids: list[int], param: str, lora: Optional[str] = None) -> list[int]:
        if not ids:
            raise APIError(400, "the prompt is empty (no tokens)", param=param)
        if len(ids) >= self.max_model_len:
            raise APIError(400, f"the prompt has {len(ids)} tokens; max_model_len is {self.max_model_len} and at "
                                "least one token must be generated", param=param)
        vocab = self.vocab_for(lora)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            shown = [str(t)[:30] for t in bad[:5]]
            raise APIError(400, f"prompt token id(s) {', '.join(shown)} outside the vocabulary [0, {vocab})",
                           param=param)
        return ids

    async def in_tokenizer_thread(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)

    async def tokenize(self, text: str, param: str, lora: Optional[str] = None) -> list[int]:
        self.check_chars(len(text), param)
        ids = await self.in_tokenizer_thread(lambda: list(self.tokenizer_for(lora)(text)["input_ids"]))
        return self.check_ids(ids, param, lora)

    async def detokenize(self, ids: list[int], lora: Optional[str] = None) -> str:
        return await self.in_tokenizer_thread(lambda: self.tokenizer_for(lora).decode(ids))

    # ---- sampling -------------------------------------------------------------------------------
    def sampling(self, req: P._SamplingFields, prompt_len: int, max_tokens: Optional[int], logprobs: Optional[int],
                 prompt_logprobs: Optional[int], lora: Optional[str] = None) -> SamplingParams:
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
        vocab = self.vocab_for(lora)
        if req.stop_token_ids and any(t >= vocab for t in req.stop_token_ids):
            raise APIError(400, f"stop_token_ids must lie in the vocabulary [0, {vocab})", param="stop_token_ids")
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else room,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=-1 if req.top_k is None else req.top_k,
            min_p=0.0 if req.min_p is None else req.min_p,
            seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        )

    @staticmethod
    def with_seed(params: SamplingParams, j: int) -> SamplingParams:
        if j == 0 or params.seed is None:
            return params
        # n samples that differ, reproducibly; seeds stay in [0, 2**63)
        return dataclasses.replace(params, seed=(params.seed + j) % (1 << 63))

    # ---- running sub-requests -------------------------------------------------------------------
    async def add_all(self, jobs: list[Job]) -> list[RequestStream]:
        """Hand every sub-request to the engine; if it refuses one, the call fails with its error
        (a 400 before anything streams) and the accepted ones are aborted."""
        results = await asyncio.gather(
            *(self.client.add_request(j.prompt, j.params, j.lora, j.request_id) for j in jobs),
            return_exceptions=True)
        streams = [r for r in results if isinstance(r, RequestStream)]
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            for st in streams:
                st.close()
            raise failed[0]
        return streams

    async def merged(self, http: Request, streams: list[RequestStream]
                     ) -> AsyncIterator[tuple[int, RequestDelta, RequestState]]:
        """Deltas of all streams as (index, delta, state) in arrival order. A client that goes away,
        the engine's death or the end of the shutdown grace period end it with ClientGone,
        EngineDeadError or ShuttingDown; unfinished sub-requests are then aborted and counted."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, st: RequestStream) -> None:
            try:
                async for d in st:
                    await queue.put((i, d))
            except BaseException as e:
                await queue.put((i, e))

        async def watch_disconnect() -> None:
            # The body has been read, so the next ASGI message is the disconnect. (Polling
            # Request.is_disconnected() instead can swallow this task's cancellation inside
            # its anyio cancel scope, and the request then never finishes.)
            while (await http.receive())["type"] != "http.disconnect":
                pass
            await queue.put((-1, ClientGone()))

        tasks = [asyncio.create_task(pump(i, st)) for i, st in enumerate(streams)]
        watcher = asyncio.create_task(watch_disconnect())
        self._active.add(queue)
        ended_by: Optional[BaseException] = None
        try:
            done = 0
            while done < len(streams):
                i, item = await queue.get()
                if isinstance(item, BaseException):
                    ended_by = item
                    raise item
                done += item.finished
                yield i, item, streams[i].state
        finally:
            self._active.discard(queue)
            watcher.cancel()
            for t in tasks:
                t.cancel()
            unfinished = [st for st in streams if not st.state.finished]
            if unfinished and (ended_by is None or isinstance(ended_by, ClientGone)):
                # ClientGone, or the response was cancelled (the ASGI server saw the disconnect first)
                logger.info("client disconnected: aborted %d unfinished sequence(s) (first: %s)", len(unfinished),
                            unfinished[0].request_id)
            for st in unfinished:
                st.close()
                self.observe_finish(st.state, "abort")
            await asyncio.gather(*tasks, watcher, return_exceptions=True)

    async def event_stream(self, http: Request, streams: list[RequestStream], chunk: Callable, usage_chunk: Callable,
                           include_usage: bool, preamble: tuple[Any, ...] = ()) -> AsyncIterator[str]:
        """Server-sent events: ``preamble``, then ``chunk(index, delta, state)`` (None: nothing to send)
        for every delta, then the usage chunk when asked for, then ``[DONE]``. An engine failure or the
        end of the shutdown grace period sends an error event and ends the stream without ``[DONE]``."""
        usage = P.UsageInfo()
        for obj in preamble:
            yield sse(obj)
        try:
            async for idx, d, state in self.merged(http, streams):
                piece = chunk(idx, d, state)
                if piece is not None:
                    yield sse(piece)
                if d.finished:
                    self.observe_finish(state)
                    usage.prompt_tokens += len(state.prompt_token_ids)
                    usage.completion_tokens += len(state.token_ids)
        except ClientGone:
            return
        except EngineDeadError as e:
            yield sse_error(str(e), "internal_error", 503)
            return
        except ShuttingDown as e:
            yield sse_error(str(e), "server_error", 503)
            return
        if include_usage:
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
            yield sse(usage_chunk(usage))
        yield "data: [DONE]\n\n"

    async def collect(self, http: Request, streams: list[RequestStream]) -> tuple[list[RequestState], P.UsageInfo]:
        """Final states of every stream, in order, and their token usage."""
        async for _, d, state in self.merged(http, streams):
            if d.finished:
                self.observe_finish(state)
        states = [st.state for st in streams]
        prompt = sum(len(s.prompt_token_ids) for s in states)
        completion = sum(len(s.token_ids) for s in states)
        return states, P.UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    # ---- shutdown -------------------------------------------------------------------------------
    def begin_shutdown(self, grace: float) -> None:
        """Called when the server starts to stop: requests still running after ``grace`` seconds are
        cut (streams get an error event, others a 503) so the server can exit in time."""
        if self.shutting_down:
            return
        self.shutting_down = True
        asyncio.get_running_loop().call_later(grace, self._cut_all)

    def _cut_all(self) -> None:
        for q in list(self._active):
            q.put_nowait((-1, ShuttingDown("the server is shutting down; this request was cut at the end of the "
                                           "graceful-shutdown period")))

    # ---- metrics and logprobs -------------------------------------------------------------------
    def observe_finish(self, state: RequestState, reason: Optional[str] = None) -> None:
        now = time.monotonic()
        ttft = state.first_token_time - state.arrival_time if state.first_token_time is not None else None
        self.metrics.observe_finish(reason or state.finish_reason, len(state.prompt_token_ids), len(state.token_ids),
                                    ttft, now - state.arrival_time, state.lora)

    def on_step(self, dt: Optional[float], seen: list[tuple[RequestDelta, RequestState, Optional[float]]]) -> None:
        if dt is not None:
            self.metrics.step.observe(dt)
            self.metrics.step_host.observe(self.client.stats.get("last_step_host_seconds", 0.0))
        self.metrics.observe_events(self.client.stats.get("lora_events", ()))
        for _, state, gap in seen:
            if gap is not None:
                self.metrics.observe_itl(gap, state.lora)

    def token_str(self, tid: int, lora: Optional[str] = None) -> str:
        return self.tokenizer_for(lora).decode([tid])

    def completion_logprobs(self, token_ids: list[int], lps: list[Optional[dict[int, float]]], k: int,
                            offset: int, lora: Optional[str] = None) -> P.CompletionLogprobs:
        out = P.CompletionLogprobs()
        for tid, lp in zip(token_ids, lps):
            s = self.token_str(tid, lora)
            out.tokens.append(s)
            out.token_logprobs.append(None if lp is None else lp[tid])
            top = None if lp is None else sorted(lp.items(), key=lambda x: -x[1])[:max(k, 1)]
            out.top_logprobs.append(None if top is None else {self.token_str(t, lora): v for t, v in top})
            out.text_offset.append(offset)
            offset += len(s)
        return out

    def chat_logprobs(self, token_ids: list[int], lps: list[dict[int, float]], k: int,
                      lora: Optional[str] = None) -> P.ChatLogprobs:
        content = []
        for tid, lp in zip(token_ids, lps):
            s = self.token_str(tid, lora)
            top = [P.TopLogprob(token=self.token_str(t, lora), logprob=v, bytes=list(self.token_str(t, lora).encode()))
                   for t, v in sorted(lp.items(), key=lambda x: -x[1])[:k]]
            content.append(P.ChatTokenLogprob(token=s, logprob=lp[tid], bytes=list(s.encode()), top_logprobs=top))
        return P.ChatLogprobs(content=content)

    # ---- runtime adapter loading ----------------------------------------------------------------
    def runtime_updates_allowed(self) -> None:
        if not self.cfg.allow_runtime_lora_updates:
            raise APIError(403, "runtime adapter loading is disabled; start the server with "
                                "--allow-runtime-lora-updates --lora-root DIR", "permission_error")

    def checked_lora_path(self, path: str) -> str:
        """``path`` (relative to --lora-root, or absolute) as a real path inside the root. The engine
        checks again that every file it reads for the adapter resolves inside the root."""
        root = os.path.realpath(self.cfg.lora_root)
        if "\x00" in path:
            raise APIError(400, "lora_path must not contain NUL characters", param="lora_path")
        if ".." in path.replace("\\", "/").split("/"):
            raise APIError(400, f"lora_path {path[:300]!r} must not contain '..'", param="lora_path")
        full = os.path.realpath(path if os.path.isabs(path) else os.path.join(root, path))
        if os.path.commonpath([root, full]) != root:
            raise APIError(400, f"lora_path {path[:300]!r} resolves outside the allowed --lora-root", param="lora_path")
        return full
