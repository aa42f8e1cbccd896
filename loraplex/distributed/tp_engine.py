"""Tensor-parallel ranks of one engine: worker processes, and the step plan rank 0 sends them.

``LLMEngine(tensor_parallel_size=N)`` is rank 0: it schedules, samples and answers requests. At start it
spawns ranks 1..N-1 (:func:`start_workers`); every rank joins torch.distributed's default group (gloo on
CPU, NCCL on CUDA, plus a gloo group for control messages), builds its shard of the model and of every
adapter slot, and agrees on the KV-cache size (the smallest any rank can hold). Each step rank 0 broadcasts
a :class:`StepPlan` (adapter slots to (re)load, each sequence's new tokens, positions, block table and
adapter slot) on the control group; every rank then runs the same forward, whose collectives (all-reduce
after row-parallel layers, the vocabulary all-reduce and the logits all-gather) meet in the same order.
Only rank 0 samples.

A rank that exits or stops answering fails the next collective within ``distributed_timeout`` seconds;
rank 0 then raises :class:`TensorParallelError` naming the ranks that exited, and stops the others.

Launched by torchrun instead (``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` in the environment,
one process per GPU, on one host or several), every process runs the same program: rank 0's ``LLM`` is the
engine, and on every other rank the ``LLM`` constructor serves steps until rank 0 stops, then exits the
process with status 0.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing as mp
import os
import socket
import traceback
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch

from loraplex.errors import TensorParallelError
from loraplex.lora.packing import pack_adapter, unpack_adapter

logger = logging.getLogger("loraplex")


@dataclass
class SeqPlan:
    request_id: str
    start: int
    num_new_tokens: int
    token_ids: list[int]
    block_table: np.ndarray  # int32 (Request.block_table_array)
    slot: int
    prompt_len: int
    prompt_logprobs: bool
    mm: Any = None  # MultiModalInputs, sent with the request's first step only


@dataclass
class StepPlan:
    # (slot, the adapter packed (pack_adapter: tensors replaced by places) or None to clear, its bytes): each
    # adapter's bytes follow the plan in one broadcast each, in this order
    slot_ops: list[tuple[int, Any, int]] = field(default_factory=list)
    seqs: list[SeqPlan] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # requests whose multimodal inputs can be dropped
    stop: bool = False
    # Async scheduling: (input rows, rows of the previous step's sampled tokens) whose token is still on the
    # device: every rank takes it from the tokens rank 0 broadcast after sampling (``num_sampled`` of them)
    fix: Optional[tuple[list[int], list[int]]] = None
    num_sampled: int = 0  # tokens this step samples that rank 0 broadcasts after sampling (async scheduling; else 0)
    # enable_lora_merging: the slot whose adapter the linear weights hold for this step (-1: the base weights);
    # every rank merges or restores its shard to match before the step
    merged_slot: int = -1


class _ShadowRequest:
    """What the model runner reads of a request, rebuilt on ranks > 0 from a :class:`SeqPlan`."""

    def __init__(self, plan: SeqPlan, mm: Any, adapter: Any) -> None:
        self.request_id = plan.request_id
        self.slot = plan.slot
        self.adapter = adapter  # _SlotAdapter of its slot (graph steps read whether it has tokens or tables)
        self.block_table = plan.block_table
        self.mm = mm
        self.prompt_token_ids = range(plan.prompt_len)  # only its length is read
        self.wants_prompt_logprobs = plan.prompt_logprobs
        self.num_pending = 0
        self._start = plan.start
        self._ids = plan.token_ids

    def token_ids_at(self, start: int, n: int) -> list[int]:
        assert start == self._start and n == len(self._ids), "a shadow request holds its step's tokens only"
        return self._ids

    def block_table_array(self) -> np.ndarray:
        return self.block_table


class _SlotAdapter(NamedTuple):
    """What a worker rank remembers of the adapter in a slot: whether it has trainable tokens or trained tables
    (the eager embedding and head around an adapter graph then take the step's segments)."""

    name: str
    tokens: bool
    saved: bool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "gloo"


class TensorParallelGroup:
    """Rank 0's side: the worker processes and the control channel."""

    def __init__(self, world: int, timeout: float) -> None:
        self.world = world
        self.timeout = timeout
        self.procs: list[Any] = []
        self.control: Any = None
        self._seen_mm: set[str] = set()
        self._slot_ops: list[tuple[int, Any]] = []
        self._payloads: list[torch.Tensor] = []  # packed adapters of the plan being sent, in slot-op order
        self.closed = False

    # -- start ----------------------------------------------------------------------------------
    def join_env(self, config: Any) -> int:
        """Join a group whose processes were started by a launcher (torchrun's environment: RANK, WORLD_SIZE,
        MASTER_ADDR, MASTER_PORT); returns this process's rank. Rank 0 goes on as the engine."""
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world != self.world:
            raise ValueError(f"tensor_parallel_size={self.world} but the launcher started WORLD_SIZE={world} "
                             "processes")
        self.control = _init_group(rank, world, None, config.device_config.device, self.timeout)
        return rank

    def start(self, config: Any) -> None:
        port = _free_port()
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_worker_main, args=(config, r, self.world, port, self.timeout),
                                  name=f"loraplex-tp-rank{r}", daemon=True) for r in range(1, self.world)]
        for p in self.procs:
            p.start()
        self.control = _init_group(0, self.world, port, config.device_config.device, self.timeout)

    def record_slot(self, slot: int, adapter: Any) -> None:
        """An adapter slot changed on rank 0 (LoRAModel.set_slot): the other ranks follow before the next step."""
        self._slot_ops.append((slot, adapter))

    # -- steps ----------------------------------------------------------------------------------
    def plan(self, seqs: Sequence[Any], finished: Sequence[str],
             fix: Optional[tuple[list[int], list[int]]] = None, num_sampled: int = 0,
             merged_slot: int = -1) -> StepPlan:
        out = StepPlan(finished=list(finished), fix=fix, num_sampled=num_sampled, merged_slot=merged_slot)
        self._payloads = []
        for slot, adapter in self._slot_ops:
            if adapter is None:
                out.slot_ops.append((slot, None, 0))
                continue
            meta, flat = pack_adapter(adapter)
            out.slot_ops.append((slot, meta, flat.numel()))
            self._payloads.append(flat)
        self._slot_ops = []
        for s in seqs:
            r = s.req
            mm = None
            if r.mm is not None and r.request_id not in self._seen_mm:
                mm = r.mm
                self._seen_mm.add(r.request_id)
            out.seqs.append(SeqPlan(r.request_id, s.start, s.num_new_tokens, r.token_ids_at(s.start, s.num_new_tokens),
                                    r.block_table_array(), r.slot, len(r.prompt_token_ids), s.prompt_logprobs,
                                    mm))
        for rid in finished:
            self._seen_mm.discard(rid)
        return out

    def broadcast(self, plan: StepPlan) -> None:
        if self.closed:
            raise TensorParallelError("the tensor-parallel group is closed")
        try:
            broadcast_plan(plan, self.control)
            payloads, self._payloads = self._payloads, []
            for flat in payloads:
                broadcast_payload(flat)
        except Exception as e:  # noqa: BLE001 - a collective failed: say which rank is gone
            raise self.failure(e) from e

    def failure(self, err: BaseException) -> TensorParallelError:
        gone = [f"rank {i + 1} (exit code {p.exitcode})" for i, p in enumerate(self.procs) if p.exitcode is not None]
        self.close(force=True)
        what = ", ".join(gone) if gone else f"no rank exited; a collective failed or timed out after {self.timeout} s"
        return TensorParallelError(f"tensor parallelism over {self.world} ranks failed: {what} ({err})")

    def check_alive(self) -> None:
        if any(p.exitcode is not None for p in self.procs):
            raise self.failure(RuntimeError("a worker process exited"))

    def close(self, force: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if not force:
            try:
                broadcast_plan(StepPlan(stop=True), self.control)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                force = True
        for p in self.procs:
            p.join(timeout=0 if force else 10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        import torch.distributed as dist

        from loraplex.distributed.parallel_state import init_tensor_parallel

        if dist.is_initialized():
            if force and dist.get_backend() == "nccl":
                # a rank failed: a collective may be stuck on this GPU, and captured graphs still hold the NCCL
                # communicator, so tearing the group down could block for good; it goes with the process
                logger.warning("loraplex: the tensor-parallel NCCL group is left as it is after a rank failed; "
                               "restart the process to start another tensor-parallel engine")
            else:
                destroy_group()
        init_tensor_parallel(0, 1)  # this process is one rank again: a new engine may start its own group


def destroy_group(timeout: float = 30.0) -> None:
    """Tear down torch.distributed's default group, giving up after ``timeout`` seconds (a warning; the group then
    goes with the process): shutting down must not hang on a communicator that will not let go."""
    import threading

    import torch.distributed as dist

    def destroy() -> None:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a group with a dead rank may not tear down cleanly
            logger.warning("loraplex: the tensor-parallel process group did not shut down cleanly")

    t = threading.Thread(target=destroy, name="loraplex-tp-teardown", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        logger.warning("loraplex: the tensor-parallel process group did not shut down within %.0f s; it goes with "
                       "the process", timeout)


def broadcast_payload(flat: torch.Tensor) -> torch.Tensor:
    """Rank 0's packed adapter bytes to every rank, over the default group (NCCL: through the GPUs, so from and
    into device memory); returns this rank's copy (rank 0: its own, on the group's device)."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        flat = flat.to(torch.device("cuda", torch.cuda.current_device()), non_blocking=True)
    dist.broadcast(flat, src=0)
    return flat


def broadcast_plan(plan: Optional[StepPlan], group: Any) -> StepPlan:
    import torch.distributed as dist

    box = [plan]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _device_id(backend: str, rank: int, device: str) -> dict:
    """NCCL: this rank's GPU (``LOCAL_RANK`` under a launcher, else the rank, modulo the GPUs; rank 0 of a group
    the engine starts keeps the engine's device), made current and passed as ``device_id``, so that the
    communicator is created at once, not lazily at a first collective (which a CUDA graph capture must never
    be: a capture of all-reduces right after an init without ``device_id`` was seen to hang). Gloo: nothing."""
    if backend != "nccl":
        return {}
    if "LOCAL_RANK" in os.environ or rank > 0:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    elif device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(device))
    return {"device_id": torch.device("cuda", torch.cuda.current_device())}


def _init_group(rank: int, world: int, port: Optional[int], device: str, timeout: float) -> Any:
    """Join torch.distributed's default group as ``rank`` of ``world`` (``port``: of rank 0's rendezvous on this
    host; None: the launcher's environment), then create the groups every rank creates in the same order: under
    NCCL the one whose collectives CUDA graphs capture (parallel_state), then the gloo control group, which is
    returned; this process is then that tensor-parallel rank."""
    import torch.distributed as dist

    from loraplex.distributed.parallel_state import init_tensor_parallel

    if port is not None:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
    backend = _backend(device)
    span = datetime.timedelta(seconds=timeout)
    graph_group = None
    if backend == "nccl":
        # graphs and eager launches never share a communicator here (parallel_state), so NCCL need not
        # support mixing them, which would make every replay of a graph holding collectives block the host
        if os.environ.setdefault("NCCL_GRAPH_MIXING_SUPPORT", "0") != "0":
            logger.warning("loraplex: NCCL_GRAPH_MIXING_SUPPORT=%s: each CUDA graph replay under tensor "
                           "parallelism will wait on the host for the previous one",
                           os.environ["NCCL_GRAPH_MIXING_SUPPORT"])
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=span, **_device_id(backend, rank, device))
    if backend == "nccl":
        graph_group = dist.new_group(backend="nccl", timeout=span)
        dist.all_reduce(torch.zeros(1, device="cuda"), group=graph_group)  # its communicator exists before capture
    control = dist.new_group(backend="gloo", timeout=span)
    init_tensor_parallel(rank, world, graph_group)
    return control


def serve_steps(config: Any, rank: int, control: Any) -> None:
    """Rank ``rank`` > 0 of a joined group: build the engine's shard, then run every step rank 0 plans
    until it says stop."""
    from loraplex.distributed.parallel_state import broadcast_from_first
    from loraplex.engine.engine import LLMEngine
    from loraplex.engine.scheduler import ScheduledSeq

    if config.device_config.device.startswith("cuda") or config.device_config.device == "auto":
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    engine = LLMEngine(config)
    runner = engine.runner
    lora_model = engine.pool.lora_model if engine.pool is not None else None
    mms: dict[str, Any] = {}
    in_slot: dict[int, Any] = {}  # slot -> _SlotAdapter of what this rank holds there (rank 0's slot changes)
    sampled: Optional[torch.Tensor] = None  # the tokens rank 0 sampled in the last step
    while True:
        plan = broadcast_plan(None, control)
        if plan.stop:
            break
        for slot, meta, nbytes in plan.slot_ops:
            adapter = None
            if meta is not None:  # its bytes follow the plan, on the group's device (a GPU under NCCL)
                import torch.distributed as dist

                gpu = dist.get_backend() == "nccl"
                flat = torch.empty(nbytes, dtype=torch.uint8, device=runner.device if gpu else "cpu")
                adapter = unpack_adapter(meta, broadcast_payload(flat))
            # what graph steps ask of a slot's adapter (not the adapter: its weights are in the slot now)
            in_slot[slot] = None if adapter is None else _SlotAdapter(adapter.name, bool(adapter.tokens),
                                                                      bool(adapter.saved))
            done = lora_model.set_slot(slot, adapter)
            if done is not None:  # the step that follows may use the slot: it runs after the copy
                torch.cuda.current_stream().wait_event(done)
        for rid in plan.finished:
            mms.pop(rid, None)
        if not plan.seqs:
            continue
        merger = engine.merger
        if merger is not None and merger.merged_slot != plan.merged_slot:  # as rank 0 did before this step
            if plan.merged_slot >= 0:
                merger.merge(plan.merged_slot)
            else:
                merger.restore()
        seqs = []
        for sp in plan.seqs:
            if sp.mm is not None:
                mms[sp.request_id] = sp.mm
            shadow = _ShadowRequest(sp, mms.get(sp.request_id), in_slot.get(sp.slot) if sp.slot >= 0 else None)
            seqs.append(ScheduledSeq(shadow, sp.num_new_tokens, sp.start, merged=plan.merged_slot >= 0))
        fix = None
        if plan.fix is not None:  # inputs sampled by the previous step: rank 0's tokens, received after it
            assert sampled is not None, "a step reads sampled tokens that were never broadcast"
            fix = (plan.fix[0], plan.fix[1], sampled)
        runner.execute(runner.prepare(seqs), fix)
        sampled = None
        if plan.num_sampled:
            sampled = broadcast_from_first(torch.empty(plan.num_sampled, dtype=torch.int64, device=runner.device))
    runner.release_graphs()  # before the group is torn down: NCCL keeps a communicator its graphs captured


def _worker_main(config: Any, rank: int, world: int, port: int, timeout: float) -> None:
    """A worker process the engine spawned: join the group and serve steps."""
    import torch.distributed as dist

    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    try:
        control = _init_group(rank, world, port, config.device_config.device, timeout)
        serve_steps(config, rank, control)
    except BaseException:  # noqa: BLE001 - the rank dies; rank 0 sees its exit code and the failed collective
        logger.error("loraplex tensor-parallel rank %d failed:\n%s", rank, traceback.format_exc())
        os._exit(1)
    if dist.is_initialized():
        destroy_group()
    os._exit(0)  # skip the interpreter's teardown, whose destruction of gloo's threads can abort the process
