"""Host cost of replaying a CUDA graph that holds NCCL collectives, on two GPUs.

Each case captures one graph of ``kernels`` tiny kernels with ``all_reduces`` all-reduces spread among them,
replays it 30 times back to back and reports the host time of each ``replay()`` call and the wall time per
replay. A replay that costs the host about its own wall time means the launch waits for the previous replay
to finish: the host can no longer prepare the next step while the GPU runs this one. Run it with and without
``NCCL_GRAPH_MIXING_SUPPORT=0`` to see the effect that made loraplex give captured collectives their own
communicator (loraplex/distributed/parallel_state.py)::

    python benchmarks/nccl_graph_replay.py
    NCCL_GRAPH_MIXING_SUPPORT=0 python benchmarks/nccl_graph_replay.py
"""

from __future__ import annotations

import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CASES = [(900, 0), (900, 1), (900, 64), (900, 160), (450, 64), (2000, 160)]  # (kernels, all-reduces)
REPLAYS = 30


def body(kernels: int, all_reduces: int, x: torch.Tensor, buf: torch.Tensor) -> None:
    every = kernels // all_reduces if all_reduces else 0
    for i in range(kernels):
        x.mul_(1.0001)
        if every and i % every == 0:
            dist.all_reduce(buf)


def capture(kernels: int, all_reduces: int, x: torch.Tensor, buf: torch.Tensor) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture
        for _ in range(2):
            body(kernels, all_reduces, x, buf)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body(kernels, all_reduces, x, buf)
    return g


def rank_main(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    x = torch.ones(4096, device="cuda")
    buf = torch.ones(32 * 4096, device="cuda", dtype=torch.bfloat16)  # a batch-32 hidden state of 4096
    dist.all_reduce(buf)
    torch.cuda.synchronize()
    mixing = os.environ.get("NCCL_GRAPH_MIXING_SUPPORT", "1 (default)")
    for kernels, all_reduces in CASES:
        g = capture(kernels, all_reduces, x, buf)
        dist.barrier()
        torch.cuda.synchronize()
        host = []
        t0 = time.perf_counter()
        for _ in range(REPLAYS):
            t = time.perf_counter()
            g.replay()
            host.append(time.perf_counter() - t)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / REPLAYS
        host.sort()
        if rank == 0:
            print(f"NCCL_GRAPH_MIXING_SUPPORT={mixing} kernels {kernels:5d} all-reduces {all_reduces:4d}: "
                  f"replay host p50 {1e3 * host[REPLAYS // 2]:.3f} ms, wall per replay {1e3 * wall:.3f} ms",
                  flush=True)
        del g
    if rank == 0:
        print(f"NCCL {torch.cuda.nccl.version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"{torch.cuda.get_device_name()}", flush=True)
    dist.destroy_process_group()


def main() -> None:
    if torch.cuda.device_count() < 2:
        raise SystemExit("needs two GPUs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(2, port), nprocs=2)


if __name__ == "__main__":
    main()
