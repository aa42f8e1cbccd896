"""The HTTP process's handle on the engine process (:mod:`loraplex.server.engine_core`).

:meth:`EngineClient.start` spawns the engine process and waits until its model is built.
Handlers then add requests (``await add_request``: the engine's verdict on the request comes
back before the response starts, so a request it refuses still gets its 400) and read each
request's :class:`RequestDelta` stream. Two threads keep the event loop free of pipe I/O: a
writer that sends queued messages and a reader that hands every engine message to the loop
in one callback. If the engine process dies, every open stream and pending call fails with
:class:`EngineDeadError` and ``on_dead`` runs (the server answers 503 and exits non-zero).
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import multiprocessing as mp
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from loraplex import errors
from loraplex.types import PositionLogprobs, RequestDelta, SamplingParams

logger = logging.getLogger("loraplex.server")


class EngineDeadError(RuntimeError):
    """The engine process is gone (it crashed or was killed); the server cannot serve."""


def raise_remote(err: tuple[str, str]) -> None:
    """Re-raise an error the engine process reported, as loraplex's own type when it is one."""
    name, message = err
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.LoraplexError):
        raise cls(message)
    if name == "ValueError":
        raise ValueError(message)
    raise RuntimeError(f"{name}: {message}")


@dataclass
class RequestState:
    """Everything the HTTP side knows of one request, accumulated from its deltas."""

    request_id: str
    prompt_token_ids: list[int]
    lora: Optional[str] = None  # the adapter it runs with (None: the base model)
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list[PositionLogprobs]] = None
    prompt_logprobs: Optional[list[Optional[PositionLogprobs]]] = None
    text: str = ""
    finish_reason: Optional[str] = None
    stop_reason: Any = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def apply(self, d: RequestDelta, now: float) -> Optional[float]:
        """Fold a delta in; returns the gap since the previous token (inter-token latency) or None."""
        gap = None
        if d.prompt_token_ids is not None:
            self.prompt_token_ids = d.prompt_token_ids
            self.prompt_logprobs = d.prompt_logprobs
        if d.new_token_ids:
            if self.first_token_time is None:
                self.first_token_time = now
            elif self.last_token_time is not None:
                gap = now - self.last_token_time
            self.last_token_time = now
            self.token_ids.extend(d.new_token_ids)
        if d.new_logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(d.new_logprobs)
        self.text += d.text_delta
        self.finish_reason, self.stop_reason = d.finish_reason, d.stop_reason
        return gap


class RequestStream:
    """The deltas of one request, in order; the last one is ``finished``. ``close()`` before
    the end aborts the request in the engine (client gone), freeing its KV blocks and slot."""

    def __init__(self, client: "EngineClient", state: RequestState) -> None:
        self.client, self.state = client, state
        self.request_id = state.request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestDelta:
        if self.closed:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.closed = True
            raise item
        if item.finished:
            self.closed = True
        return item

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.client.abort([self.request_id])


class EngineClient:
    """Spawns and talks to the engine process. Create with :meth:`start`."""

    def _set_loras(self, loras: list) -> None:
        """name -> folder of each registered adapter; name -> vocabulary size of those that add tokens;
        name -> its versions (current first); the pinned names."""
        self.loras: dict[str, str] = {n: p for n, p, *_ in loras}
        self.lora_vocab: dict[str, int] = {n: v for n, _, v, *_ in loras if v}
        self.lora_versions: dict[str, list[str]] = {n: vs for n, _, _, vs, _ in loras}
        self.lora_pinned: set[str] = {n for n, *_, pin in loras if pin}

    def __init__(self, proc: Any, conn: Any, info: dict) -> None:
        self.proc, self.conn, self.info = proc, conn, info
        self.max_model_len: int = info["max_model_len"]
        self.vocab_size: int = info["vocab_size"]
        self.max_num_seqs: int = info["max_num_seqs"]
        self._set_loras(info["loras"])
        self.stats: dict[str, float] = info["stats"]  # EngineCore.stats(), refreshed with every step message
        self.dead: Optional[str] = None
        self._closing = False
        self.num_aborted = 0
        self.on_step: Optional[Callable[[Optional[float], list[tuple[RequestDelta, RequestState, Optional[float]]]],
                                        None]] = None
        self.on_dead: Optional[Callable[[str], None]] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._streams: dict[str, RequestStream] = {}
        self._acks: dict[str, asyncio.Future] = {}
        self._ops: dict[int, asyncio.Future] = {}
        self._op_ids = itertools.count()
        self._outbox: "queue.SimpleQueue[Optional[tuple]]" = queue.SimpleQueue()
        threading.Thread(target=self._write, name="loraplex-engine-writer", daemon=True).start()
        threading.Thread(target=self._read, name="loraplex-engine-reader", daemon=True).start()

    # ---- lifecycle ----------------------------------------------------------------------------
    @classmethod
    def start(cls, config: Any, loras: list[tuple[str, str]] = (), log_level: str = "info",
              timeout: float = 3600.0) -> "EngineClient":
        """Spawn the engine process and wait until its model is built and ``loras`` are registered.
        Raises the engine's own error (ModelLoadError, AdapterError, ValueError, ...) if it cannot start."""
        from loraplex.server.engine_core import run_engine_process

        ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        parent, child = ctx.Pipe(duplex=True)
        # With tensor parallelism the engine starts its worker ranks itself, which a daemonic process may
        # not; shutdown() (and the atexit hook below) stops it then.
        daemon = config.parallel_config.tensor_parallel_size == 1
        proc = ctx.Process(target=run_engine_process, args=(child, config, list(loras), log_level),
                           name="loraplex-engine", daemon=daemon)
        proc.start()
        child.close()
        deadline = time.monotonic() + timeout
        while not parent.poll(0.2):
            if not proc.is_alive():
                raise RuntimeError(f"the engine process exited with code {proc.exitcode} while starting")
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the engine process did not start within {timeout:.0f} s")
        try:
            msg = parent.recv()
        except EOFError:
            proc.join(5)
            raise RuntimeError(f"the engine process exited with code {proc.exitcode} while starting") from None
        if msg[0] == "fatal":
            proc.join(10)
            raise_remote(msg[1])
        assert msg[0] == "ready", msg[0]
        client = cls(proc, parent, msg[1])
        if not daemon:
            atexit.register(client.shutdown)
        return client

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver engine messages to ``loop`` (the server's event loop) from now on."""
        self._loop = loop
        if self.dead is not None:
            loop.call_soon(self._fail_all, self.dead)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine process (requests still in it are dropped)."""
        self._closing = True
        self._outbox.put(("shutdown",))
        self._outbox.put(None)
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)

    @property
    def is_running(self) -> bool:
        return self.dead is None and self.proc.is_alive()

    # ---- pipe I/O threads -----------------------------------------------------------------------
    def _write(self) -> None:
        from loraplex.server.engine_core import send_queued

        err = send_queued(self.conn, self._outbox)
        if err is not None and not isinstance(err, (OSError, EOFError)):  # BrokenPipeError is an OSError
            raise err  # a message that cannot be sent: a bug, with its traceback
        # else: done, or the engine is gone (the reader notices the dead engine)

    def _read(self) -> None:
        reason = "the engine process exited"
        try:
            while True:
                msg = self.conn.recv()
                if msg[0] == "fatal":
                    reason = f"the engine process failed: {msg[1][0]}: {msg[1][1]}"
                    break
                self._post(self._dispatch, msg)
        except (EOFError, OSError):
            pass
        self.proc.join(2)
        if self.proc.exitcode not in (None, 0):
            reason += f" (exit code {self.proc.exitcode})"
        self.dead = reason
        if self._closing:
            return
        logger.error("%s; failing requests in flight", reason)
        self._post(self._fail_all, reason)

    def _post(self, fn: Callable, *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed (server shut down)
            pass

    # ---- on the event loop ------------------------------------------------------------------------
    def _dispatch(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "step":
            _, acks, deltas, dt, stats = msg
            self.stats.update(stats)  # residency comes only when it changed
            for rid, err in acks:
                fut = self._acks.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(err)
            now = time.monotonic()
            seen = []
            for d in deltas:
                st = self._streams.get(d.request_id)
                if st is None:
                    continue  # aborted here already
                gap = st.state.apply(d, now)
                st.queue.put_nowait(d)
                if d.finished:
                    del self._streams[d.request_id]
                seen.append((d, st.state, gap))
            if self.on_step is not None:
                self.on_step(dt, seen)
        elif kind == "reply":
            _, op, err, loras = msg
            self._set_loras(loras)
            fut = self._ops.pop(op, None)
            if fut is not None and not fut.done():
                fut.set_result(err)

    def _fail_all(self, reason: str) -> None:
        err = EngineDeadError(reason)
        for st in self._streams.values():
            st.queue.put_nowait(err)
        self._streams.clear()
        for fut in list(self._acks.values()) + list(self._ops.values()):
            if not fut.done():
                fut.set_exception(err)
        self._acks.clear()
        self._ops.clear()
        if self.on_dead is not None:
            self.on_dead(reason)

    def _check_alive(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self.dead is not None:
            raise EngineDeadError(self.dead)

    # ---- requests ---------------------------------------------------------------------------------
    async def add_request(self, prompt: dict, params: SamplingParams, lora_name: Optional[str],
                          request_id: str) -> RequestStream:
        """Hand a tokenised request to the engine; returns its stream once the engine accepted it,
        or raises the engine's InvalidRequestError / AdapterError."""
        self._check_alive()
        stream = RequestStream(self, RequestState(request_id, prompt["prompt_token_ids"], lora_name))
        fut = self._loop.create_future()
        self._acks[request_id] = fut
        self._streams[request_id] = stream
        self._outbox.put(("add", request_id, prompt, params, lora_name))
        try:
            err = await fut
        except EngineDeadError:
            self._streams.pop(request_id, None)
            raise
        except BaseException:  # cancelled while waiting (client gone): the engine may have it already
            self._streams.pop(request_id, None)
            self._acks.pop(request_id, None)
            self._outbox.put(("abort", [request_id]))
            raise
        if err is not None:
            self._streams.pop(request_id, None)
            raise_remote(err)
        return stream

    def abort(self, request_ids: list[str]) -> None:
        live = [rid for rid in request_ids if self._streams.pop(rid, None) is not None]
        self.num_aborted += len(live)
        if live and self.dead is None:
            self._outbox.put(("abort", live))

    # ---- adapters ---------------------------------------------------------------------------------
    async def _op(self, *msg: Any) -> None:
        self._check_alive()
        op = next(self._op_ids)
        fut = self._loop.create_future()
        self._ops[op] = fut
        self._outbox.put((msg[0], op) + msg[1:])
        err = await fut
        if err is not None:
            raise_remote(err)

    async def load_lora(self, name: str, path: str, reload: bool = False, root: Optional[str] = None) -> None:
        """Read, validate and register an adapter in the engine (its folder is read off the step loop)."""
        await self._op("load_lora", name, path, reload, root)

    async def unload_lora(self, name: str) -> None:
        await self._op("unload_lora", name)

    async def resolve_lora(self, name: str) -> None:
        """Have the engine find unregistered adapter ``name`` with its resolvers (off its step loop) and
        register it; raises AdapterError when none has it."""
        await self._op("resolve_lora", name)

    async def pin_lora(self, name: str, pinned: bool) -> None:
        await self._op("pin_lora", name, pinned)
