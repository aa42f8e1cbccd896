"""Run a function in N processes joined in a gloo tensor-parallel group (CPU tests of tensor parallelism)."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from typing import Any, Callable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn: Callable, rank: int, world: int, port: int, queue: Any, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    from loraplex.distributed.parallel_state import init_tensor_parallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        init_tensor_parallel(rank, world)
        queue.put((rank, fn(rank, *args), None))
    except BaseException:  # noqa: BLE001 - reported to the test
        queue.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 600.0) -> list:
    """``[fn(rank, *args) for rank in range(world)]``, each in its own process of a gloo group of ``world``
    ranks (``fn`` must be importable: a module-level function). Raises with the rank's traceback if one fails."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world, port, queue, args), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, value, err = queue.get(timeout=timeout)
            if err is not None:
                raise RuntimeError(f"tensor-parallel rank {rank} of {world} failed:\n{err}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
