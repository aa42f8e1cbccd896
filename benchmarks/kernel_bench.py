"""LoRA shrink+expand cost of one module, per backend: torch (one matmul pair per segment) vs Triton.

One 4096x4096 module (hidden x hidden, one slice), rank-16 bfloat16 adapters, 32 decode tokens whose
requests use 1, 4 (interleaved: 32 segments) or 32 distinct adapters; with ``--prefill`` also a
prefill-shaped batch (4 prompts of 512 tokens) and a fused qkv-shaped module. Each cell is the median
time of one shrink+expand in microseconds:

- ``eager``: back-to-back calls from Python, as the engine runs today (host launch overhead included);
- ``graph``: the same calls replayed from a CUDA graph (device time, what CUDA graphs would give).

The base GEMM of the module (x @ W.T) is timed the same way for scale. Run on a CUDA machine:

    python benchmarks/kernel_bench.py --json bench_out/kernel_bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loraplex.lora.backends.base import LoRAStack, get_backend  # noqa: E402
from loraplex.lora.batch import LoRABatch  # noqa: E402


def make_stack(slices: tuple[int, ...], hidden: int, num_adapters: int, rank: int, dtype: torch.dtype,
               dev: torch.device) -> LoRAStack:
    w = LoRAStack.zeros(len(slices), num_adapters, rank, rank, hidden, slices, dtype, dev)
    g = torch.Generator(device=dev).manual_seed(0)
    for slot in range(num_adapters):
        for i, n in enumerate(slices):
            w.a[i, slot] = (torch.randn(rank, hidden, generator=g, device=dev) / hidden ** 0.5).to(dtype)
            w.b_slices[i][slot] = (torch.randn(n, rank, generator=g, device=dev) / rank ** 0.5).to(dtype)
            w.set(slot, i, rank, 2.0)
    return w


def time_eager(fn: Callable[[], None], iters: int) -> float:
    """Median microseconds per call over ``iters`` calls, in 5 timed groups."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        per.append(start.elapsed_time(end) * 1e3 / iters)
    return sorted(per)[len(per) // 2]


def time_graph(fn: Callable[[], None], iters: int) -> float:
    """Median microseconds per call with ``iters`` calls captured in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    return time_eager(graph.replay, 3) / iters


def run_case(name: str, backend_names: list[str], slices: tuple[int, ...], hidden: int, row_slots: list[int],
             num_adapters: int, a: argparse.Namespace, dev: torch.device) -> dict:
    dtype = getattr(torch, a.dtype)
    w = make_stack(slices, hidden, num_adapters, a.rank, dtype, dev)
    batch = LoRABatch.from_row_slots(row_slots, dev)
    T = len(row_slots)
    x = torch.randn(T, hidden, device=dev, dtype=dtype)
    weight = torch.randn(sum(slices), hidden, device=dev, dtype=dtype) / hidden ** 0.5
    y = torch.zeros(T, sum(slices), device=dev, dtype=dtype)
    row = {"case": name, "tokens": T, "segments": len(batch.seg_slots), "adapters": num_adapters,
           "out_features": sum(slices), "in_features": hidden}

    def base() -> None:
        torch.matmul(x, weight.T, out=y)

    row["base_gemm_eager_us"] = time_eager(base, a.iters)
    row["base_gemm_graph_us"] = time_graph(base, a.iters)
    outs = {}
    for bname in backend_names:
        be = get_backend(bname, dev)

        def lora(be=be) -> None:
            be.expand(y, be.shrink(x, w, batch), w, batch)

        row[f"{bname}_eager_us"] = time_eager(lora, a.iters)
        row[f"{bname}_graph_us"] = time_graph(lora, a.iters)
        y.zero_()
        lora()
        outs[bname] = y.float().clone()
    if len(outs) == 2:
        ref, got = outs.values()
        row["max_abs_diff"] = (ref - got).abs().max().item()
        row["max_abs_ref"] = ref.abs().max().item()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--backends", default="torch,triton")
    ap.add_argument("--prefill", action="store_true", help="also a prefill-shaped batch and a qkv-shaped module")
    ap.add_argument("--json", default="bench_out/kernel_bench.json")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_bench.py needs a CUDA device")
    dev = torch.device("cuda")
    backends = a.backends.split(",")
    H, T = a.hidden, a.tokens
    cases = [
        ("decode, 1 adapter", (H,), H, [0] * T, 1),
        ("decode, 4 adapters", (H,), H, [i % 4 for i in range(T)], 4),
        (f"decode, {T} distinct", (H,), H, list(range(T)), T),
    ]
    if a.prefill:
        kv = H // 4
        cases += [
            (f"decode qkv, {T} distinct", (H, kv, kv), H, list(range(T)), T),
            ("prefill 4x512, 4 adapters", (H,), H, [s for s in range(4) for _ in range(512)], 4),
            ("prefill 4x512 qkv, 4 adapters", (H, kv, kv), H, [s for s in range(4) for _ in range(512)], 4),
        ]
    rows = [run_case(n, backends, sl, h, rs, na, a, dev) for n, sl, h, rs, na in cases]
    cols = ["base_gemm"] + backends
    head = f"{'case':<32}{'segs':>5}" + "".join(f"{c + ' eager':>16}{c + ' graph':>16}" for c in cols)
    print(f"LoRA shrink+expand, rank {a.rank}, {a.dtype}, microseconds (median)")
    print(head)
    for r in rows:
        print(f"{r['case']:<32}{r['segments']:>5}"
              + "".join(f"{r[c + '_eager_us']:>16.1f}{r[c + '_graph_us']:>16.1f}" for c in cols))
    device = torch.cuda.get_device_name()
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({
        "config": vars(a), "results": rows, "device": device, "torch": torch.__version__,
        "triton": _triton_version(), "platform": platform.platform(), "date": time.strftime("%Y-%m-%d"),
    }, indent=2))
    print(f"wrote {a.json} ({device})")


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    main()
