"""LoRA shrink+expand cost of one module, per backend: torch (one matmul pair per segment) vs Triton.

One 4096x4096 module (hidden x hidden, one slice), rank-16 bfloat16 adapters, 32 decode tokens whose
requests use 1, 4 (interleaved: 32 segments) or 32 distinct adapters; with ``--prefill`` also a
prefill-shaped batch (4 prompts of 512 tokens) and a fused qkv-shaped module. Each cell is the median
time of one shrink+expand in microseconds:

- ``eager``: back-to-back calls from Python, as the engine runs today (host launch overhead included);
- ``graph``: the same calls replayed from a CUDA graph (device time, what CUDA graphs would give).

The base GEMM of the module (x @ W.T) is timed the same way for scale. Run on a CUDA machine:

    python benchmarks/kernel_bench.py --json bench_out/kernel_bench.json

``--layer``: instead, the Triton shrink and expand of one decoder layer of the Llama-3-8B shape (qkv, o,
gate_up, down) as a CUDA graph step runs them: paged B (pages of 8 rank rows), the work list padded to the
batch with the real tile count on the device, batches 32 and 128, one adapter (all rows) or a distinct adapter
per row (at most ``--slots``), each kernel alone, graph-replayed; microseconds per module and per layer, with
the shrink summing its split-K partials (the default) and with the expand summing them.

``--gemm``: instead, the base projections of one Llama-3-8B decoder layer (qkv, o, gate_up, down) at the
``--layer-batches`` rows through cuBLAS (``F.linear``) and, side by side, with PyTorch asking cuBLASLt
instead (``torch.backends.cuda.preferred_blas_library``), graph-replayed, microseconds, with the bandwidth each
reaches reading its weight: the bound of the no-adapter decode step; and cuBLAS with the operands swapped
(``W @ x^T``, the output transposed). As in a step, each call reads its weight from HBM: the calls rotate
over copies of it three times the L2's size (the same weight every call, also timed, is served from L2 where
it fits: o_proj's 32 MiB at 32 rows took 7.6 us so, 11.6 us from HBM, on an H200). (A split-K Triton GEMM of our own was
slower than cuBLAS at every shape here on the H200, 2026-12-01, and was removed: docs/benchmarks.md.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loraplex.kernels.lora_shrink import GRAPH_LAUNCH  # noqa: E402
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


LAYER_MODULES = [("qkv", 4096, (4096, 1024, 1024)), ("o", 4096, (4096,)), ("gate_up", 4096, (14336, 14336)),
                 ("down", 14336, (4096,))]


def padded_tiles(T: int, distinct: bool, slots: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A graph step's work list for T rows: one adapter's runs in tiles of 16 rows, or one row per tile with
    slot ``row % slots``; padded to T tiles with empty ones, and the real count as a device tensor."""
    if distinct:
        tiles = [(r, r + 1, r % slots) for r in range(T)]
    else:
        tiles = [(r, T, 0) for r in range(0, T, 16)]
    n = len(tiles)
    tiles += [(0, 0, -1)] * (T - n)
    return (torch.tensor(tiles, dtype=torch.int64, device=dev),
            torch.tensor([n], dtype=torch.int64, device=dev))


def run_layer(a: argparse.Namespace, dev: torch.device, timer: Callable[[Callable[[], None], int], float]) -> list[dict]:
    """The ``--layer`` rows: see the module docstring."""
    from loraplex.kernels.lora_expand import lora_expand
    from loraplex.kernels.lora_shrink import lora_shrink
    from loraplex.kernels.common import num_sms

    dtype = getattr(torch, a.dtype)
    page, rank, slots = 8, a.rank, a.slots
    per_slot = -(-rank // page)
    pages = torch.arange(slots * per_slot, dtype=torch.int32, device=dev).view(slots, per_slot)
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for name, K, slices in LAYER_MODULES:
        N = sum(slices)
        A = (torch.randn(len(slices), slots * per_slot, page, K, generator=g, device=dev) / K ** 0.5).to(dtype)
        B = (torch.randn(slots * per_slot, N, page, generator=g, device=dev) / rank ** 0.5).to(dtype)
        ranks = torch.full((len(slices), slots), rank, dtype=torch.int32, device=dev)
        scales = torch.ones(len(slices), slots, dtype=torch.float32, device=dev)
        meta = torch.tensor([[sum(slices[:i]), n] for i, n in enumerate(slices)], dtype=torch.int32, device=dev)
        for T in a.layer_batches:
            x = torch.randn(T, K, generator=g, device=dev).to(dtype)
            y = torch.zeros(T, N, device=dev, dtype=dtype)
            for distinct in (False, True):
                tiles, count = padded_tiles(T, distinct, slots, dev)
                row = {"module": name, "tokens": T, "case": f"{min(T, slots)} distinct" if distinct else "1 adapter"}
                for reduce in (True, False):  # the shrink sums its split-K partials (the default), or the expand
                    kw = dict(work_tiles=T // 16, pages=pages, max_rank=rank, tile_count=count, reduce=reduce)
                    parts = lora_shrink(x, A, ranks, tiles, 16, **kw)

                    def shrink() -> None:
                        lora_shrink(x, A, ranks, tiles, 16, **kw)

                    def expand() -> None:
                        lora_expand(y, parts, B, ranks, scales, meta, max(slices), tiles, 16, pages=pages,
                                    tile_count=count)

                    tag = "" if reduce else "_unreduced"
                    row.update({f"shrink_us{tag}": timer(shrink, a.iters), f"expand_us{tag}": timer(expand, a.iters),
                                f"splits{tag}": parts.shape[0]})
                    if reduce:  # the expand into a float32 delta (the side stream's), B's loads element-wise or
                        delta = torch.zeros(T, N, device=dev, dtype=torch.float32)  # a page at a time

                        for vec in (False, True):
                            def expand_delta(vec=vec) -> None:
                                lora_expand(delta, parts, B, ranks, scales, meta, max(slices), tiles, 16,
                                            pages=pages, tile_count=count, delta=True, vector_b=vec)
                            row["delta_us_vector_b" if vec else "delta_us"] = timer(expand_delta, a.iters)
                    if a.sweep and reduce:  # the expand's output block and warps, on the shrink's sums
                        def shrink_dev() -> None:  # split-K sized on the device from the real tile count
                            lora_shrink(x, A, ranks, tiles, 16, **kw, device_splits=True)

                        row["shrink_us_device_splits"] = timer(shrink_dev, a.iters)
                        row["expand_sweep"] = {}
                        for bn, nw in itertools.product((64, 128, 256, 512), (2, 4, 8)):
                            def tuned(bn=bn, nw=nw) -> None:
                                lora_expand(y, parts, B, ranks, scales, meta, max(slices), tiles, 16, pages=pages,
                                            tile_count=count, block_n=bn, num_warps=nw)
                            row["expand_sweep"][f"{bn}x{nw}"] = timer(tuned, a.iters)
                    if a.shrink_sweep and reduce:  # the graph step's shrink (device splits) over its launch knobs
                        row["shrink_sweep"] = {}
                        for per_sm, bk, nw, ns in itertools.product((1, 2, 4, 8, 16), (64, 128, 256), (2, 4, 8),
                                                                   (2, 3, 4)):
                            def swept(per_sm=per_sm, bk=bk, nw=nw, ns=ns) -> None:
                                lora_shrink(x, A, ranks, tiles, 16, **kw, device_splits=True, block_k=bk,
                                            split_target=per_sm * num_sms(dev), num_warps=nw, num_stages=ns)
                            row["shrink_sweep"][f"{per_sm}/SM,k{bk},w{nw},s{ns}"] = timer(swept, a.iters)
                rows.append(row)
    return rows


def per_layer(rows: list[dict], sweep: str) -> dict[tuple, float]:
    """{(tokens, case, setting): microseconds summed over the layer's modules} of a ``--layer`` sweep."""
    out: dict[tuple, float] = {}
    for r in rows:
        for k, us in r[sweep].items():
            key = (r["tokens"], r["case"], k)
            out[key] = out.get(key, 0.0) + us
    return out


def hbm_copies(nbytes: int, dev: torch.device) -> int:
    """Copies of an operand of ``nbytes`` that calls rotate over so that each reads it from HBM, as each layer
    of a step reads its own: together three times the L2's size, at least two."""
    return max(2, -(-3 * torch.cuda.get_device_properties(dev).L2_cache_size // nbytes))


def run_gemm(a: argparse.Namespace, dev: torch.device) -> list[dict]:
    """The ``--gemm`` rows: see the module docstring."""
    dtype = getattr(torch, a.dtype)
    rows = []
    for name, K, slices in LAYER_MODULES:
        nbytes = sum(slices) * K * torch.empty(0, dtype=dtype).element_size()
        copies = hbm_copies(nbytes, dev)  # as in a step, each call reads its weight from HBM
        ws = [torch.randn(sum(slices), K, device=dev).to(dtype) for _ in range(copies)]
        hot = ws[0]
        gb = nbytes / 1e9
        for T in a.layer_batches:
            x = torch.randn(T, K, device=dev).to(dtype)
            xt = x.t().contiguous()
            row = {"module": name, "tokens": T, "weight_copies": copies}
            for lib in ("cublas", "cublaslt"):  # side by side: which library PyTorch asks for the GEMM
                torch.backends.cuda.preferred_blas_library(lib)
                tag = "" if lib == "cublas" else "_lt"
                cold = itertools.cycle(ws)
                row[f"cublas_us{tag}"] = time_graph(lambda: torch.nn.functional.linear(x, next(cold)), a.iters)
                row[f"cublas_tbs{tag}"] = gb / row[f"cublas_us{tag}"] * 1e3
                # the same weight every call, served from L2 where it fits: what an isolated kernel timing shows
                row[f"cublas_us{tag}_hot"] = time_graph(lambda: torch.nn.functional.linear(x, hot), a.iters)
            torch.backends.cuda.preferred_blas_library("cublas")
            # the same product with the operands swapped: out^T = W @ x^T (x^T contiguous), which makes cuBLAS
            # pick among other kernels; would a layout with tokens along columns read the weight faster?
            cold = itertools.cycle(ws)
            row["swapped_us"] = time_graph(lambda: torch.mm(next(cold), xt), a.iters)
            rows.append(row)
            print(f"{name:<8}{T:>6} rows: cuBLAS {row['cublas_us']:7.1f} us ({row['cublas_tbs']:.2f} TB/s), cuBLASLt "
                  f"{row['cublas_us_lt']:7.1f} us ({row['cublas_tbs_lt']:.2f} TB/s), W @ x^T {row['swapped_us']:.1f} us; "
                  f"from L2: {row['cublas_us_hot']:.1f} / {row['cublas_us_lt_hot']:.1f} us", flush=True)
        ws = hot = None  # free this module's copies before the next module's
    for T in a.layer_batches:
        mine = [r for r in rows if r["tokens"] == T]
        print(f"layer   {T:>6} rows: cuBLAS {sum(r['cublas_us'] for r in mine):7.1f} us, cuBLASLt "
              f"{sum(r['cublas_us_lt'] for r in mine):7.1f} us"
              + f", W @ x^T {sum(r['swapped_us'] for r in mine):.1f} us")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--backends", default="torch,triton")
    ap.add_argument("--prefill", action="store_true", help="also a prefill-shaped batch and a qkv-shaped module")
    ap.add_argument("--layer", action="store_true", help="one 8B decoder layer's kernels as graph steps run them")
    ap.add_argument("--layer-batches", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--slots", type=int, default=32, help="--layer: adapter slots (distinct adapters at most)")
    ap.add_argument("--sweep", action="store_true", help="--layer: also time the expand's output block (64-512 "
                    "columns) and warps (2, 4, 8), and the shrink with its split count chosen on the device")
    ap.add_argument("--shrink-sweep", action="store_true",
                    help="--layer: also time the graph step's shrink (split-K sized on the device) over its work items "
                         "per SM (1-16), K block (64-256), warps (2-8) and pipeline stages (2-4)")
    ap.add_argument("--gemm", action="store_true", help="the 8B layer's base projections through cuBLAS, with "
                    "the bandwidth each reaches")
    ap.add_argument("--json", default="bench_out/kernel_bench.json")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_bench.py needs a CUDA device")
    dev = torch.device("cuda")
    if a.gemm:
        rows = run_gemm(a, dev)
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"config": vars(a), "gemm": rows, "device": torch.cuda.get_device_name(),
                                            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}, indent=2))
        print(f"wrote {a.json}")
        return
    if a.layer:
        rows = run_layer(a, dev, time_graph)
        print(f"LoRA kernels of one Llama-3-8B decoder layer, rank {a.rank}, {a.dtype}, graph-replayed, microseconds")
        print("(the shrink summing its split-K partials, the default; then the expand summing them)")
        cols = ("shrink_us", "expand_us", "shrink_us_unreduced", "expand_us_unreduced")
        print(f"{'module':<9}{'tokens':>7}{'case':>14}{'splits':>7}{'shrink':>9}{'expand':>9}{'shrink':>9}{'expand':>9}")
        sums: dict = {}
        for r in rows:
            print(f"{r['module']:<9}{r['tokens']:>7}{r['case']:>14}{r['splits_unreduced']:>7}"
                  + "".join(f"{r[c]:>9.1f}" for c in cols))
            key = (r["tokens"], r["case"])
            sums[key] = [v + r[c] for v, c in zip(sums.get(key, [0.0] * 4), cols)]
        for (T, case), v in sums.items():
            print(f"{'layer':<9}{T:>7}{case:>14}{'':>7}" + "".join(f"{x:>9.1f}" for x in v))
        for (T, case) in sums:  # the side stream's expand (into a float32 delta): B element-wise or a page at a time
            mine = [r for r in rows if (r["tokens"], r["case"]) == (T, case)]
            plain, vec = sum(r["delta_us"] for r in mine), sum(r["delta_us_vector_b"] for r in mine)
            print(f"expand into a delta, layer, {T} tokens, {case}: {plain:.1f} us; B a page at a time {vec:.1f} us")
        if a.sweep:  # per layer: the sum over modules of each expand tiling, against the default's
            tilings = per_layer(rows, "expand_sweep")
            for (T, case), v in sums.items():
                dev = sum(r["shrink_us_device_splits"] for r in rows if (r["tokens"], r["case"]) == (T, case))
                print(f"shrink, layer, {T} tokens, {case}: {v[0]:.1f} us, split on the device {dev:.1f} us")
                best = sorted((us, k) for (t, c, k), us in tilings.items() if (t, c) == (T, case))[:3]
                print(f"expand sweep, layer, {T} tokens, {case}: default {v[1]:.1f} us; best "
                      + ", ".join(f"{k} (columns x warps) {us:.1f}" for us, k in best))
        if a.shrink_sweep:  # per layer: each shrink launch setting summed over the modules, against the default's
            settings = per_layer(rows, "shrink_sweep")
            for (T, case) in sums:
                dev_us = sum(r["shrink_us_device_splits"] for r in rows if (r["tokens"], r["case"]) == (T, case)) \
                    if a.sweep else None
                best = sorted((us, k) for (t, c, k), us in settings.items() if (t, c) == (T, case))[:3]
                g = GRAPH_LAUNCH
                mine = f"{g['programs_per_sm']}/SM,k{g['block_k']},w{g['num_warps']},s{g['num_stages']}"
                print(f"shrink sweep, layer, {T} tokens, {case}: the graph step's ({mine}) "
                      f"{settings.get((T, case, mine), float('nan')):.1f} us, the eager launch's (2/SM,k128,w4,s3) "
                      f"{settings.get((T, case, '2/SM,k128,w4,s3'), float('nan')):.1f} us"
                      + (f" (device splits, --sweep: {dev_us:.1f})" if dev_us is not None else "") + "; best "
                      + ", ".join(f"{k} {us:.1f}" for us, k in best))
        device = torch.cuda.get_device_name()
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"config": vars(a), "results": rows, "device": device,
                                            "torch": torch.__version__, "triton": _triton_version(),
                                            "date": time.strftime("%Y-%m-%d")}, indent=2))
        print(f"wrote {a.json} ({device})")
        return
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
