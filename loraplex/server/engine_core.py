"""The engine process of the server: it owns the model, schedules and steps, and nothing else.

The HTTP process (:mod:`loraplex.server.engine_client`) parses, validates, tokenises and streams;
this process runs :class:`LLMEngine` in a loop. They talk over one duplex
:func:`multiprocessing.Pipe` of pickled tuples (both ends are loraplex, started together):

    HTTP -> engine   ("add", request_id, prompt, params, lora_name)
                     ("abort", [request_id, ...])
                     ("load_lora", op_id, name, path, reload, root)
                     ("unload_lora", op_id, name)
                     ("shutdown",)
    engine -> HTTP   ("ready", info)                       once, after the model is built
                     ("step", acks, deltas, step_seconds, stats)
                     ("reply", op_id, error, loras)        adapter load/unload results
                     ("fatal", error)                      before the process exits on a bug

``acks`` answer "add" messages as (request_id, error); ``error`` is None or
(exception class name, message). ``deltas`` are :class:`RequestDelta` objects of the step.

A reader thread drains the pipe into a queue the whole time, so the HTTP side never blocks on a
busy engine, and every message that arrived during a step is applied before the next one: new
requests join the running batch at the next step. Adapter folders are read (disk I/O and
validation) on a worker thread; only the registration happens between steps. A writer thread pickles and
sends the outgoing messages, in order, so that the loop goes on to the next step at once
(``LORAPLEX_ENGINE_SEND_THREAD=0``: the loop sends them itself).
"""

from __future__ import annotations

import faulthandler
import logging
import queue
import signal
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from loraplex import envs

logger = logging.getLogger("loraplex.engine")

Error = Optional[tuple[str, str]]


def error_of(e: BaseException) -> tuple[str, str]:
    return type(e).__name__, str(e)


def send_queued(conn: Any, outbox: "queue.Queue[Optional[tuple]]") -> Optional[BaseException]:
    """A writer thread's loop, on either end of the pipe: send ``outbox``'s messages in order until a None.
    Returns None then, or the exception that stopped it: OSError / EOFError when the other process is gone,
    anything else for a message that could not be sent."""
    while True:
        msg = outbox.get()
        if msg is None:
            return None
        try:
            conn.send(msg)
        except BaseException as e:
            return e


class EngineCore:
    """The loop of the engine process around one :class:`LLMEngine`."""

    def __init__(self, engine: Any, conn: Any) -> None:
        self.engine = engine
        self.engine.output_kind = "delta"
        self.conn = conn
        self.inbox: "queue.Queue[tuple]" = queue.Queue()
        # Registrations and reloads in the order they came; re-reads of evicted adapters on a thread of their own
        # (each name read once at a time: _rereads), which a registration never waits behind. One thread:
        # on an H200 with 1,000 adapters four took each read from 35 to 190-250 ms and the step loop's p99 from
        # 61 to 123 ms (the reads' Python holds the GIL the loop needs), 0.70 of one adapter's throughput warm
        # against 0.94 on one thread.
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-adapter-io")
        self.reread_io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-adapter-reread")
        self._rereads: dict[str, list[tuple]] = {}  # adapter being re-read off the loop -> "add" messages waiting
        self._residency: Optional[tuple[list[str], list[str]]] = None  # as last reported in stats()
        self.running = True
        self.acks: list[tuple[str, Error]] = []
        # Outgoing messages go through a queue to a writer thread, which pickles and writes them while the loop
        # steps (and the loop thread, waiting for the device, has let go of the GIL). Measured on an H200 (8B,
        # 64 clients, two runs, docs/benchmarks.md): the time between engine steps 297 and 157 against 396 and
        # 232 ms, 7,039 and 7,135 against 6,988 and 6,908 tok/s. LORAPLEX_ENGINE_SEND_THREAD=0 (self._outbox
        # None): the loop sends them itself
        self._outbox: Optional["queue.Queue[Optional[tuple]]"] = queue.Queue() if envs.LORAPLEX_ENGINE_SEND_THREAD \
            else None
        self._writer: Optional[threading.Thread] = None
        self._writer_error: Optional[BaseException] = None  # what stopped the writer, raised by run()

    # ---- messages in --------------------------------------------------------------------------
    def _read_pipe(self) -> None:
        try:
            while True:
                self.inbox.put(self.conn.recv())
        except (EOFError, OSError):  # the HTTP process is gone: stop
            self.inbox.put(("shutdown",))

    def _drain(self, block: bool) -> list[tuple]:
        msgs = []
        if block:
            msgs.append(self.inbox.get())
        while True:
            try:
                msgs.append(self.inbox.get_nowait())
            except queue.Empty:
                return msgs

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "add":
            _, rid, prompt, params, lora = msg
            name = lora.partition("@")[0] if lora else None
            pool = self.engine.pool
            if name is not None and (name in self._rereads or (pool is not None and pool.needs_read(name))):
                # its adapter was evicted from host memory: re-read it on the I/O thread, then add the request
                waiting = self._rereads.setdefault(name, [])
                waiting.append(msg)
                if len(waiting) == 1:
                    self.reread_io.submit(self._reread, name)
                return
            try:
                self.engine.add_request(prompt, params, lora, rid)
                self.acks.append((rid, None))
            except Exception as e:  # InvalidRequestError, AdapterError: the request's own fault
                self.acks.append((rid, error_of(e)))
        elif kind == "abort":
            for rid in msg[1]:
                self.engine.abort_request(rid)
                for waiting in self._rereads.values():  # not added yet: it never will be
                    waiting[:] = [m for m in waiting if m[1] != rid]
        elif kind == "reread":  # posted by the adapter I/O thread
            _, name, result, err = msg
            if result is not None:
                self.engine.pool.adopt(*result)
            for m in self._rereads.pop(name, []):
                if err is not None:
                    self.acks.append((m[1], err))
                else:
                    self._handle(m)
        elif kind == "load_lora":
            _, op, name, path, reload, root = msg
            self._start_load(op, name, path, reload, root)
        elif kind == "resolve_lora":  # a request names an adapter that is not registered: the resolvers look
            _, op, name = msg
            if self.engine.pool is not None and self.engine.pool.is_registered(name):
                self._send(("reply", op, None, self.loras()))  # another request resolved it meanwhile
            else:
                self._start_load(op, name, None, False, None)
        elif kind == "lora_read":  # posted by the adapter I/O thread
            _, op, req, reload, root, adapter, err = msg
            if err is None:
                try:
                    self.engine._require_pool().register(req, reload=reload, adapter=adapter, root=root)
                except Exception as e:
                    err = error_of(e)
            self._send(("reply", op, err, self.loras()))
        elif kind == "unload_lora":
            _, op, name = msg
            try:
                self.engine.remove_lora(name)
                self._send(("reply", op, None, self.loras()))
            except Exception as e:
                self._send(("reply", op, error_of(e), self.loras()))
        elif kind == "pin_lora":
            _, op, name, pinned = msg
            try:
                (self.engine.pin_lora if pinned else self.engine.unpin_lora)(name)
                self._send(("reply", op, None, self.loras()))
            except Exception as e:
                self._send(("reply", op, error_of(e), self.loras()))
        elif kind == "shutdown":
            self.running = False
        else:
            logger.error("engine process: unknown message %r", kind)

    def _start_load(self, op: int, name: str, path: str, reload: bool, root: Optional[str]) -> None:
        from loraplex.errors import AdapterError
        from loraplex.types import LoRARequest

        try:
            req = LoRARequest(name, path) if path is not None else None  # None: found by the resolvers
            pool = self.engine._require_pool()
            known = pool.registered.get(name)
            if known is not None and not reload:
                raise AdapterError(f"adapter {name!r} is already loaded (from {known.path!r}); pass "
                                   "load_inplace=true to reload it")
        except Exception as e:
            self._send(("reply", op, error_of(e), self.loras()))
            return

        def read() -> None:  # on the adapter I/O thread: downloads and reads never stall the step loop
            r = req
            try:
                if r is None:
                    r = pool.resolve(name)
                adapter = pool.read(r, root=root)
                self.inbox.put(("lora_read", op, r, reload, root, adapter, None))
            except Exception as e:
                self.inbox.put(("lora_read", op, r, reload, root, None, error_of(e)))

        self.io.submit(read)

    def _reread(self, name: str) -> None:
        try:
            self.inbox.put(("reread", name, self.engine.pool.read_current(name), None))
        except Exception as e:
            self.inbox.put(("reread", name, None, error_of(e)))

    # ---- messages out -------------------------------------------------------------------------
    def _send(self, msg: tuple) -> None:
        if self._outbox is not None:
            self._outbox.put(msg)
            return
        try:
            self.conn.send(msg)
        except (OSError, EOFError):  # the HTTP process is gone
            self.running = False

    def _write_pipe(self) -> None:
        """The writer thread: sends the outbox's messages in order until the None that :meth:`run` puts last. If
        the HTTP process is gone, or a message cannot be sent (a bug: run() raises it), the loop stops."""
        err = send_queued(self.conn, self._outbox)
        if err is None:
            return
        if not isinstance(err, (OSError, EOFError)):
            self._writer_error = err
        self.running = False
        self.inbox.put(("shutdown",))  # wakes a loop waiting for messages

    def loras(self) -> list[tuple[str, str, Optional[int], list[str], bool]]:
        """(name, path, vocabulary size when the adapter adds tokens else None, versions, pinned) of each
        registered adapter."""
        pool = self.engine.pool
        if pool is None:
            return []
        pinned = set(pool.pinned)
        return [(n, pool.registered[n].path, pool.vocab_size_of(n), pool.versions_of(n), n in pinned)
                for n in sorted(pool.registered)]

    def stats(self) -> dict[str, Any]:
        eng = self.engine
        pool = eng.pool
        return {
            "running": len(eng.scheduler.running),
            "waiting": len(eng.scheduler.waiting),
            "kv_usage": eng.allocator.usage,
            "loras_registered": len(pool.registered) if pool else 0,
            "lora_slots_used": sum(1 for a in pool.device_resident if a is not None) if pool else 0,
            "lora_slot_refs": sum(pool.slot_refcount(s) for s in range(pool.num_slots)) if pool else 0,
            "last_step_host_seconds": eng.last_step_host_seconds,
            **{k: v for k, v in eng.cache_stats().items()
               if k.startswith(("prefix_cache", "encoder_cache", "lora_merge"))},
            # per-adapter: events since the last step; residency (names in device slots, in host memory) when
            # it changed since the last report (the client keeps the last one it got)
            "lora_events": pool.drain_events() if pool else [],
            **self._residency_if_changed(),
        }

    def _residency_if_changed(self) -> dict[str, list[str]]:
        pool = self.engine.pool
        now = ([a for a in pool.device_resident if a is not None], pool.host_resident) if pool else ([], [])
        if now == self._residency:
            return {}
        self._residency = now
        return {"lora_device": now[0], "lora_host": now[1]}

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> None:
        threading.Thread(target=self._read_pipe, name="loraplex-engine-inbox", daemon=True).start()
        if self._outbox is not None:
            self._writer = threading.Thread(target=self._write_pipe, name="loraplex-engine-outbox", daemon=True)
            self._writer.start()
        try:
            self._loop()
        finally:  # every queued message out before the process exits or reports a failure on the pipe itself
            if self._writer is not None:
                self._outbox.put(None)
                self._writer.join(timeout=30)
        self.io.shutdown(wait=False, cancel_futures=True)
        self.reread_io.shutdown(wait=False, cancel_futures=True)
        if self._writer_error is not None:  # as the loop's own send would have: the engine process fails loudly
            raise self._writer_error

    def _loop(self) -> None:
        eng = self.engine
        while self.running:
            msgs = self._drain(block=not eng.has_unfinished_requests() and not self.acks)
            for msg in msgs:
                self._handle(msg)
            if not self.running:
                break
            deltas: list = []
            dt = None
            if eng.has_unfinished_requests():
                t0 = time.perf_counter()
                deltas = eng.step()
                dt = time.perf_counter() - t0
            if msgs or deltas or dt is not None:  # after aborts too: the HTTP side's stats stay current
                acks, self.acks = self.acks, []
                self._send(("step", acks, deltas, dt, self.stats()))


def run_engine_process(conn: Any, config: Any, loras: list[tuple[str, str]], log_level: str) -> None:
    """Entry point of the engine process (``multiprocessing`` spawn target)."""
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s[engine]: %(message)s")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID` prints every thread's stack
    try:
        from loraplex.engine.engine import LLMEngine
        from loraplex.types import LoRARequest

        engine = LLMEngine(config)
        for name, path in loras:
            engine.add_lora(LoRARequest(name, path))
        core = EngineCore(engine, conn)
        info = {
            "max_model_len": engine.max_model_len,
            "vocab_size": engine.vocab_size,
            "max_num_seqs": engine.scheduler.max_num_seqs,
            "model_class": type(engine.model).__name__,
            "accepts_images": engine.mm_processor is not None,
            "max_image_pixels": config.model_config.max_image_pixels,
            "image_placeholder": (engine.mm_processor.image_placeholder(engine.tokenizer)
                                  if engine.mm_processor is not None else ""),
            "loras": core.loras(),
            "lora_resolvers": bool(engine.pool is not None and engine.pool.resolvers),
            "stats": core.stats(),
        }
    except BaseException as e:  # start-up failed: tell the HTTP process why, then exit
        conn.send(("fatal", error_of(e)))
        raise SystemExit(2)
    conn.send(("ready", info))
    try:
        core.run()
    except BaseException as e:  # a bug: report it, then die loudly (the server answers 503 and exits)
        logger.error("engine process failed:\n%s", traceback.format_exc())
        try:
            conn.send(("fatal", error_of(e)))
        except Exception:
            pass
        raise SystemExit(1)
