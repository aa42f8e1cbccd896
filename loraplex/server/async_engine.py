"""The engine behind the server: one background thread steps it for every connection.

HTTP handlers run on the asyncio loop; the engine runs on its own thread so a
forward pass never blocks the loop. Handlers add requests and read their outputs
through per-request asyncio queues; every touch of engine state holds one lock,
taken by the engine thread only around ``step()``, so adds, aborts and adapter
registrations land between steps. Reading an adapter folder (disk I/O and
validation) happens off both the loop and the lock, so loading an adapter never
stalls running requests.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional

from loraplex.engine.engine import LLMEngine
from loraplex.types import LoRARequest, RequestOutput, SamplingParams

logger = logging.getLogger("loraplex.server")


class EngineDeadError(RuntimeError):
    """The engine thread hit an unexpected error; requests in flight were failed."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    added: float = field(default_factory=time.monotonic)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, on_step: Optional[Callable[[list[RequestOutput], float], None]] = None) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._on_step = on_step
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
        self.last_error: Optional[BaseException] = None
        self.num_aborted = 0  # requests aborted before finishing (client gone, shutdown)

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, prompt: Any, params: SamplingParams, lora_name: Optional[str],
                    request_id: str) -> "RequestStream":
        """Add a request now (raises InvalidRequestError / AdapterError at once) and return
        the stream of its outputs."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if self.last_error is not None:
                raise EngineDeadError(f"the engine failed earlier: {self.last_error!r}")
            self.engine.add_request(prompt, params, lora_name, request_id)
            self._streams[request_id] = stream
        self._wake.set()
        return RequestStream(self, request_id, stream.queue)

    async def generate(self, prompt: Any, params: SamplingParams, lora_name: Optional[str],
                       request_id: str) -> AsyncIterator[RequestOutput]:
        stream = self.add_request(prompt, params, lora_name, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def tokenize(self, prompt: Any) -> tuple[Optional[str], list[int]]:
        with self._lock:  # the tokenizer is shared with the engine thread's detokenizer
            return self.engine.tokenize(prompt)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> tuple[list[int], list[Any]]:
        with self._lock:  # the tokenizer is shared with the engine thread's detokenizer
            return self.engine.chat_prompt(messages, add_generation_prompt)

    def abort(self, request_id: str) -> None:
        with self._lock:
            if self._streams.pop(request_id, None) is not None:
                self.num_aborted += 1
            self.engine.abort_request(request_id)

    # ---- adapters ---------------------------------------------------------------------------
    async def load_lora(self, req: LoRARequest, reload: bool = False) -> None:
        pool = self.engine._require_pool()
        with self._lock:
            known = pool.registered.get(req.name)
        if known is not None and not reload:
            from loraplex.errors import AdapterError

            raise AdapterError(f"adapter {req.name!r} is already loaded (from {known.path!r}); "
                               "pass load_inplace=true to reload it")
        adapter = await asyncio.get_running_loop().run_in_executor(None, pool.read, req)
        with self._lock:
            pool.register(req, reload=True, adapter=adapter)

    async def unload_lora(self, name: str) -> None:
        with self._lock:
            self.engine.remove_lora(name)

    def list_loras(self) -> list[LoRARequest]:
        with self._lock:
            pool = self.engine.pool
            return [pool.registered[n] for n in sorted(pool.registered)] if pool else []

    def stats(self) -> dict[str, float]:
        with self._lock:
            sched = self.engine.scheduler
            pool = self.engine.pool
            return {
                "running": len(sched.running),
                "waiting": len(sched.waiting),
                "kv_usage": self.engine.allocator.usage,
                "loras_registered": len(pool.registered) if pool else 0,
                "lora_slots_used": sum(1 for a in pool.device_resident if a is not None) if pool else 0,
            }

    # ---- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                busy = self.engine.has_unfinished_requests()
                if busy:
                    t0 = time.perf_counter()
                    try:
                        outs = self.engine.step()
                    except BaseException as e:  # a bug: fail everyone loudly, never hang clients
                        logger.exception("engine step failed")
                        self.last_error = e
                        self._fail_all(EngineDeadError(f"engine step failed: {e!r}"))
                        return
                    dt = time.perf_counter() - t0
                    for out in outs:
                        stream = self._streams.get(out.request_id)
                        if stream is not None:
                            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
                            if out.finished:
                                del self._streams[out.request_id]
                else:
                    self._wake.clear()
            if busy:
                if self._on_step is not None:
                    self._on_step(outs, dt)
            else:
                self._wake.wait(0.5)

    def _fail_all(self, err: BaseException) -> None:
        for rid, stream in list(self._streams.items()):
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, err)
            self.engine.abort_request(rid)
        self._streams.clear()


class RequestStream:
    """Outputs of one request, in order; the last one has ``finished`` set. ``close()``
    before the end aborts the request (client gone) and frees its KV blocks and slot."""

    def __init__(self, engine: AsyncLLMEngine, request_id: str, queue: asyncio.Queue) -> None:
        self.engine, self.request_id, self._queue = engine, request_id, queue
        self.finished = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self._queue.get()
        if isinstance(out, BaseException):
            self.finished = True
            raise out
        self.finished = out.finished
        return out

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)
