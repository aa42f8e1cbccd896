"""Prefix caching: time to first token and throughput with and without it (issue 12).

Requests share a long system prompt (``--system-len`` tokens) and each add their own suffix
(``--suffix-len``); they are spread over ``--num-adapters`` adapters plus the base model (every
``num_adapters + 1``-th request is a base request), all queued at once. The same requests run twice through
one engine with ``enable_prefix_caching`` off and twice with it on; the second pass of each is what counts
(the first warms kernels, and with the cache also fills it, as a server's earlier traffic would). Reports
TTFT p50 / p99 (from the pass's start), output tokens/s and the cache's hit rate.

    python benchmarks/prefix_cache.py --preset llama3-8b   # an H200 (dummy weights)
    python benchmarks/prefix_cache.py --preset tiny        # CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": {"hidden": 4096, "intermediate": 14336, "layers": 32, "heads": 32, "kv_heads": 8, "vocab": 128256,
                  "dtype": "bfloat16", "device": "cuda", "system_len": 2000, "suffix_len": 64, "num_requests": 256,
                  "max_num_seqs": 64},
    "tiny": {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 512,
             "dtype": "float32", "device": "cpu", "system_len": 400, "suffix_len": 32, "num_requests": 64,
             "max_num_seqs": 16},
}


def one_pass(llm: Any, prompts: list[list[int]], names: list, new_tokens: int) -> dict[str, float]:
    from loraplex import SamplingParams

    eng = llm.engine
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    ids = [eng.add_request({"prompt_token_ids": p}, params, n, f"r{i}-{time.monotonic_ns()}")
           for i, (p, n) in enumerate(zip(prompts, names))]
    first: dict[str, float] = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.request_id not in first and o.outputs and o.outputs[0].token_ids:
                first[o.request_id] = time.perf_counter() - t0
    wall = time.perf_counter() - t0
    ttft = sorted(first[i] for i in ids)
    return {"ttft_ms_p50": 1e3 * ttft[len(ttft) // 2], "ttft_ms_p99": 1e3 * ttft[int(0.99 * (len(ttft) - 1))],
            "output_tokens_per_s": len(prompts) * new_tokens / wall, "seconds": wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--num-adapters", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out-dir", default="bench_out/prefix_cache")
    p.add_argument("--json", default="bench_out/prefix_cache.json")
    a = p.parse_args()
    cfg = SimpleNamespace(**PRESETS[a.preset], rank=a.rank)
    from gpu_lora_throughput import build_adapter, build_model_folder
    from loraplex import LLM, LoRARequest

    device = cfg.device if cfg.device != "cuda" or torch.cuda.is_available() else "cpu"
    out = Path(a.out_dir)
    model = build_model_folder(out, cfg)
    adapters = [build_adapter(out, cfg, i) for i in range(a.num_adapters)]
    g = torch.Generator().manual_seed(0)
    system = torch.randint(3, cfg.vocab - 1, (cfg.system_len,), generator=g).tolist()
    prompts = [system + torch.randint(3, cfg.vocab - 1, (cfg.suffix_len,), generator=g).tolist()
               for _ in range(cfg.num_requests)]
    names = [None if i % (a.num_adapters + 1) == a.num_adapters else f"a{i % (a.num_adapters + 1)}"
             for i in range(cfg.num_requests)]
    rows = {}
    for caching in (False, True):
        llm = LLM(str(model), load_format="dummy", dtype=cfg.dtype, device=device,
                  max_model_len=cfg.system_len + cfg.suffix_len + a.new_tokens + 16, max_num_seqs=cfg.max_num_seqs,
                  max_loras=a.num_adapters, max_lora_rank=a.rank, enable_prefix_caching=caching, seed=0)
        for i, path in enumerate(adapters):
            llm.add_lora(LoRARequest(f"a{i}", str(path)))
        one_pass(llm, prompts, names, a.new_tokens)
        r = one_pass(llm, prompts, names, a.new_tokens)
        r["hit_rate"] = llm.get_metrics()["prefix_cache_hit_rate"]
        rows["on" if caching else "off"] = r
        print(f"prefix caching {'on ' if caching else 'off'}: TTFT p50 {r['ttft_ms_p50']:.1f} ms, p99 "
              f"{r['ttft_ms_p99']:.1f} ms, {r['output_tokens_per_s']:.0f} output tok/s, hit rate {r['hit_rate']:.2f}",
              flush=True)
        del llm
    speedup = rows["off"]["ttft_ms_p50"] / rows["on"]["ttft_ms_p50"]
    print(f"TTFT p50 {speedup:.2f}x lower with the cache (issue 12's target on an H200: >= 5x)")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"config": vars(a), "preset": PRESETS[a.preset], "device": name,
                                        "date": time.strftime("%Y-%m-%d"), "results": rows,
                                        "ttft_p50_speedup": speedup}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
