"""Paged attention kernel: time and rate of the Triton kernels on step shapes of the Llama-3-8B attention
(32 query heads, 8 kv heads, head dim 128, bf16, blocks of 16), one layer, over a sweep of the tiling (query
rows per program, key tile, warps, pipeline stages; for decodes, the split count of the context).

Shapes (each a whole step of one layer):

- ``decode32``: 32 decodes at context 192; ``decode128``: 128 at 192; ``decode32x1k``: 32 at 1,024;
  ``decode8x4k``: 8 at 4,096; ``decode1x8k``: one at 8,000 (bytes: the KV read). Their split count is chosen
  as a CUDA graph captures it, for the model's longest context (``--max-model-len``);
- ``mixed480x8k``: a 480-token prompt chunk at context 7,520..8,000 plus 32 decodes at 192 (the chunk
  of a long prompt that shares a step with a decode batch, as chunked prefill makes it);
- ``prefill4x2k``: 4 prompts of 2,048 tokens (causal).

Each time is a call's share of 20 calls replayed from a CUDA graph, as the engine's decode steps run (the
median over replays, ``kernel_bench.time_graph``), each call reading one of several copies of K and V three
times the L2's size, as each layer of a step reads its own (``--from-l2``: the same copy every call, which a
small step's 25 MB leave in L2); timed from Python instead (``--eager``), a small step
measures the host's launch (about 33 us whatever the tiling). Rates: FLOP/s for the prompt shapes (4 x heads x head dim x visible keys per
query: QK and PV), bytes/s (K and V read once per kv head) for the decodes. Run on a CUDA machine:

    python benchmarks/attention_bench.py [--sweep] [--json bench_out/attention_bench.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loraplex.attention.metadata import AttentionMetadata  # noqa: E402
from loraplex.attention.triton_attention import paged_attention  # noqa: E402
from kernel_bench import hbm_copies, time_eager, time_graph  # noqa: E402  (benchmarks/, this script's folder)

H, KVH, D, BS = 32, 8, 128, 16


def make_step(query_lens: list[int], seq_lens: list[int], dev: torch.device, dtype: torch.dtype):
    blocks = [-(-n // BS) for n in seq_lens]
    perm = torch.randperm(sum(blocks) + 1, generator=torch.Generator().manual_seed(0)).tolist()
    tables, at = [], 0
    for nb in blocks:  # scattered physical blocks, as a running server leaves them
        tables.append(perm[at:at + nb])
        at += nb
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, BS, dev)
    T = sum(query_lens)
    q = torch.randn(T, H, D, device=dev, dtype=dtype)
    k = torch.randn(len(perm), BS, KVH, D, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    flops = sum(4 * H * D * sum(L - n + i + 1 for i in range(n)) for n, L in zip(query_lens, seq_lens))
    kv_bytes = sum(2 * L * KVH * D * k.element_size() for L in seq_lens)
    return q, k, v, meta, flops, kv_bytes


SHAPES = {
    "decode32": ([1] * 32, [192] * 32),
    "decode128": ([1] * 128, [192] * 128),
    "decode32x1k": ([1] * 32, [1024] * 32),
    "decode8x4k": ([1] * 8, [4096] * 8),
    "decode1x8k": ([1], [8000]),
    "mixed480x8k": ([1] * 32 + [480], [192] * 32 + [8000]),
    "prefill4x2k": ([2048] * 4, [2048] * 4),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="time every tiling (and, for decodes, split count)")
    p.add_argument("--eager", action="store_true", help="time launches from Python rather than graph replays")
    p.add_argument("--max-model-len", type=int, default=8192,
                   help="the context a decode graph is captured for (it sets the split count)")
    p.add_argument("--from-l2", action="store_true",
                   help="every call reads the same K and V (served from L2 where they fit), not one of several "
                        "copies three times the L2's size, as a step's layers read theirs")
    p.add_argument("--json", default="bench_out/attention_bench.json")
    a = p.parse_args()
    dev, dtype = torch.device("cuda"), torch.bfloat16
    scale = D ** -0.5
    timer = time_eager if a.eager else time_graph  # microseconds per call, median
    prompt_configs, decode_configs = [dict()], [dict()]  # the defaults first
    if a.sweep:
        prompt_configs += [dict(rows=r, tile_n=t, num_warps=w, num_stages=s)
                           for r, t, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3))
                           if not (r == 128 and t == 128 and w == 4)]
        decode_configs += [dict(num_splits=n, tile_n=t, num_warps=w, num_stages=s)
                           for n, t, w, s in itertools.product((1, 2, 4, 8, 16), (16, 32, 64), (2, 4), (1, 2, 3))]
    results = []
    for name, (ql, sl) in SHAPES.items():
        q, k, v, meta, flops, kv_bytes = make_step(ql, sl, dev, dtype)
        decode = name.startswith("decode")
        if decode:  # as a decode graph holds it: split for the longest context the model serves
            meta = dataclasses.replace(meta, max_seq_len=max(a.max_model_len, meta.max_seq_len))
        want = paged_attention(q, k, v, meta, scale, num_splits=1)
        out = torch.empty_like(q)
        # each layer of a step reads its own cache: calls rotate over copies of K and V
        copies = 1 if a.from_l2 else hbm_copies(2 * k.numel() * k.element_size(), dev)
        caches = [(k, v)] + [(k.clone(), v.clone()) for _ in range(copies - 1)]
        for cfg in decode_configs if decode else prompt_configs:
            try:
                got = paged_attention(q, k, v, meta, scale, **cfg)
                err = (got.float() - want.float()).abs().max().item()
                rotation = itertools.cycle(caches)
                ms = timer(lambda: paged_attention(q, *next(rotation), meta, scale, out=out, **cfg), 20) / 1e3
            except Exception as e:  # a tiling this card cannot run (shared memory): skip it
                print(f"{name} {cfg}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                continue
            row = dict(shape=name, config=cfg, ms=ms, tflops=flops / ms / 1e9, tbps=kv_bytes / ms / 1e9, max_err=err)
            results.append(row)
            print(f"{name:>12} {json.dumps(cfg):>70}: {ms * 1e3:9.1f} us  {row['tflops']:6.1f} TFLOP/s  "
                  f"{row['tbps']:5.2f} TB/s  err {err:.3g}", flush=True)
        caches = None  # this shape's copies freed before the next shape's
    for name in SHAPES:
        rows = [r for r in results if r["shape"] == name]
        if rows:
            best = min(rows, key=lambda r: r["ms"])
            print(f"best {name}: {best['config']} {best['ms'] * 1e3:.1f} us (default {rows[0]['ms'] * 1e3:.1f} us)")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                                        "torch": torch.__version__, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
