"""Decode and prefill speed against the hardware floor, with and without adapters (issue 9).

One run measures, on the card it runs on:

* the card: device-to-device copy bandwidth (bytes read plus bytes written per second) and the bf16
  matmul rate (8192^3);
* decode: for each batch size (``--batches``) and each adapter mix (no adapter, 1 adapter, 4, ``distinct``:
  a distinct adapter a request, at most ``--max-loras`` of them, so 32 at batch 128 with 4 requests each, a
  Zipf-skewed mix over ``--zipf-adapters`` adapters with ``max_loras`` slots, one DoRA adapter, one adapter
  with its own trained head), ms per decode step over ``--new-tokens`` steps after the prompt's prefill,
  tokens/s, and the share of the floor. The floor of a step is the bytes it must read over the measured
  copy bandwidth: every weight but the input embedding (a tied head counts once), the adapters the batch
  uses, and the KV cache at the mean context of the decode;
* prefill: tokens/s for ``--prefill-batch`` x ``--prefill-len`` tokens and its share of the matmul rate
  (2 x parameters x tokens FLOPs, attention left out, so the share is a lower bound);
* inter-token latency (p50, p99) of the decoding batch while one ``--long-prompt``-token prompt arrives
  (with chunked prefill the long prompt shares steps with the decodes), when the model's length allows.

The model is Llama-shaped with random weights (``load_format="dummy"``); adapters are random PEFT folders
of rank ``--rank`` on the seven projections. Prints a table and writes JSON (and a PNG when matplotlib is
installed). On an H200 (issue 9's targets):

    python benchmarks/gpu_decode.py --preset llama3-8b

On a CPU, as a check that the script runs (seconds; the numbers mean nothing):

    python benchmarks/gpu_decode.py --preset tiny
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256,
                      dtype="bfloat16", device="cuda", batches=[32, 128], prompt_len=128, new_tokens=128,
                      zipf_adapters=128, prefill_batch=4, prefill_len=2048, long_prompt=8000, max_loras=32),
    # needs two H200s (--tensor-parallel-size 2): 140 GB of bf16 weights
    "llama3-70b": dict(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=128256,
                       dtype="bfloat16", device="cuda", batches=[32], prompt_len=128, new_tokens=64,
                       zipf_adapters=32, prefill_batch=2, prefill_len=1024, long_prompt=4000, max_loras=8),
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512, dtype="float32",
                 device="cpu", batches=[4], prompt_len=16, new_tokens=8, zipf_adapters=8, prefill_batch=2,
                 prefill_len=64, long_prompt=200, max_loras=4),
}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    p.add_argument("--layers", type=int, help="override the preset's number of layers")
    p.add_argument("--batches", type=int, nargs="+", help="decode batch sizes")
    p.add_argument("--new-tokens", type=int, help="decode steps measured per case")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-loras", type=int, help="device adapter slots (llama3-8b: 32)")
    p.add_argument("--zipf-adapters", type=int, help="adapters of the Zipf-skewed mix")
    p.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent")
    p.add_argument("--cases", nargs="+", default=["base", "1", "4", "distinct", "zipf", "dora", "saved"],
                   help="adapter mixes: base, 1, 4, distinct, zipf")
    p.add_argument("--peft", action="store_true", help="also time HF transformers + PEFT (generate with "
                   "adapter_names) on the 'distinct' mix of the smallest batch")
    p.add_argument("--peft-tokens", type=int, default=8, help="decode steps timed for PEFT")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (the eager step, for comparison)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="profile this many decode steps of the first batch and case (torch.profiler): print the "
                        "kernels by GPU time and write a Chrome trace beside the JSON")
    p.add_argument("--skip-prefill", action="store_true")
    p.add_argument("--lora-overlap", choices=["auto", "on", "off"], default="auto",
                   help="each LoRA shrink on a side stream beside its base GEMM (LORAPLEX_LORA_OVERLAP; auto: the "
                        "engine's default, on with one rank, off under tensor parallelism)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="ranks the model is sharded over (one GPU each); the floor is then per GPU")
    p.add_argument("--blas", choices=["default", "cublas", "cublaslt"], default="default",
                   help="torch.backends.cuda.preferred_blas_library for the base projections (set before the "
                        "graphs are captured; one rank only): does cuBLASLt pick better kernels for decode's "
                        "skinny GEMMs?")
    p.add_argument("--skip-itl", action="store_true")
    p.add_argument("--lora-merging", action="store_true",
                   help="enable_lora_merging: steps whose every request uses one adapter run on weights with it "
                        "merged in, after a few such steps in a row")
    p.add_argument("--itl-budgets", type=int, nargs="+", default=[0, 512],
                   help="per-step token budgets of the inter-token latency case (0: the engine's "
                        "max_num_batched_tokens); a smaller budget prefills the long prompt in smaller chunks, "
                        "as --max-num-batched-tokens would")
    p.add_argument("--itl-caps", type=int, nargs="*", default=[256],
                   help="also run the inter-token latency case with the engine's budget and each of these "
                        "long_prefill_token_threshold values (the most prompt tokens a request prefills a step)")
    p.add_argument("--out-dir", default="bench_out/gpu_decode")
    p.add_argument("--json", default="bench_out/gpu_decode.json")
    p.add_argument("--plot", default="bench_out/gpu_decode.png")
    a = p.parse_args(argv)
    if a.blas != "default" and a.tensor_parallel_size > 1:
        p.error("--blas applies to this process only: use it with --tensor-parallel-size 1")
    if a.lora_overlap != "auto":
        os.environ["LORAPLEX_LORA_OVERLAP"] = "1" if a.lora_overlap == "on" else "0"  # every rank's backend reads it
    preset = PRESETS[a.preset]
    for k, v in preset.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    return a


# ---- the card -------------------------------------------------------------------------------------
def time_it(fn: Callable[[], Any], device: torch.device, repeat: int = 5) -> float:
    """Best wall time of ``fn`` in seconds (CUDA events on the GPU)."""
    fn()
    best = math.inf
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def card_rates(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    n = (1 << 30) if device.type == "cuda" else (1 << 26)  # bytes
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = time_it(lambda: dst.copy_(src), device)
    m = 8192 if device.type == "cuda" else 512
    x = torch.randn(m, m, device=device, dtype=dtype)
    y = torch.randn(m, m, device=device, dtype=dtype)
    mm_s = time_it(lambda: x @ y, device)
    return {"copy_bytes_per_s": 2 * n / copy_s, "matmul_flops_per_s": 2 * m ** 3 / mm_s}


# ---- the model ------------------------------------------------------------------------------------
def build(a: argparse.Namespace) -> tuple[Path, list[Path]]:
    from gpu_lora_throughput import build_adapter, build_model_folder

    out = Path(a.out_dir)
    ns = SimpleNamespace(hidden=a.hidden, intermediate=a.intermediate, layers=a.layers, heads=a.heads,
                         kv_heads=a.kv_heads, vocab=a.vocab, dtype=a.dtype, rank=a.rank)
    model = build_model_folder(out, ns)
    # only as many as the cases use: registering 128 adapters of the 8B shape takes minutes
    distinct = min(max(a.batches), a.max_loras) if "distinct" in a.cases else 1
    n_adapters = max(distinct, a.zipf_adapters if "zipf" in a.cases else 1, 4)
    return model, [build_adapter(out, ns, i) for i in range(n_adapters)]


def build_variant(out: Path, a: argparse.Namespace, adapter: Path, kind: str) -> Path:
    """``adapter`` made a DoRA adapter (a magnitude per output channel of each module: ``kind="dora"``) or
    given its own trained output head (modules_to_save, ``kind="saved"``)."""
    from safetensors.torch import load_file, save_file

    folder = out / f"{kind}-{adapter.name}"
    folder.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    g = torch.Generator().manual_seed(99)
    if kind == "dora":
        for key in [k for k in tensors if k.endswith("lora_B.weight")]:
            rows = tensors[key].shape[0]
            tensors[key.replace("lora_B.weight", "lora_magnitude_vector")] = 1.0 + torch.rand(rows, generator=g)
        cfg["use_dora"] = True
    else:
        tensors["base_model.model.lm_head.weight"] = (
            torch.randn(a.vocab, a.hidden, generator=g) * 0.02).to(getattr(torch, a.dtype))
        cfg["modules_to_save"] = ["lm_head"]
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every weight a decode step reads: all parameters but the input embedding's rows (a head
    tied to the embedding is read as the head, so it counts once)."""
    seen: set[int] = set()
    total = 0
    embed = None
    for name, mod in model.named_modules():
        if name.endswith("embed_tokens"):
            embed = getattr(mod, "weight", None)
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    head_tied = any(p is embed for n, p in model.named_parameters(remove_duplicate=False) if "lm_head" in n)
    if embed is not None and not head_tied:
        total -= embed.numel() * embed.element_size()
    return total


def embedding_and_head_lora_bytes(engine: Any) -> int:
    """Bytes of this rank's LoRA slot stacks of the input embedding and the output head (sharded along the
    vocabulary under tensor parallelism: 1/N each)."""
    from loraplex.lora.layers import LMHeadWithLoRA, VocabEmbeddingWithLoRA

    pool = engine.pool
    if pool is None:
        return 0
    total = 0
    for m in pool.lora_model.modules:
        if isinstance(m.wrapper, (VocabEmbeddingWithLoRA, LMHeadWithLoRA)):
            stack = m.wrapper.stack
            total += stack.a.numel() * stack.a.element_size() + stack.b.numel() * stack.b.element_size()
    return total


def adapter_bytes(a: argparse.Namespace, elem: int) -> int:
    """Bytes of one rank-r adapter on the seven projections."""
    kv = a.kv_heads * (a.hidden // a.heads)
    per_layer = sum(a.rank * (fin + fout) for fin, fout in [
        (a.hidden, a.hidden), (a.hidden, kv), (a.hidden, kv), (a.hidden, a.hidden),
        (a.hidden, a.intermediate), (a.hidden, a.intermediate), (a.intermediate, a.hidden)])
    return per_layer * a.layers * elem


def kv_bytes(a: argparse.Namespace, batch: int, mean_ctx: float, elem: int) -> float:
    return batch * mean_ctx * a.layers * 2 * a.kv_heads * (a.hidden // a.heads) * elem


def mix(case: str, batch: int, a: argparse.Namespace, rng: torch.Generator) -> list[Optional[str]]:
    if case == "base":
        return [None] * batch
    if case == "1":
        return ["a0"] * batch
    if case == "4":
        return [f"a{i % 4}" for i in range(batch)]
    if case == "distinct":  # one adapter a request, as many as there are slots (batch 128: 32, 4 requests each)
        return [f"a{i % min(batch, a.max_loras)}" for i in range(batch)]
    if case in ("dora", "saved"):  # one adapter with DoRA / with its own trained head, for every request
        return [f"{case}0"] * batch
    if case == "zipf":
        w = torch.tensor([1.0 / (k + 1) ** a.zipf_s for k in range(a.zipf_adapters)])
        return [f"a{int(i)}" for i in torch.multinomial(w, batch, replacement=True, generator=rng)]
    raise ValueError(f"unknown case {case!r}")


# ---- measurements ---------------------------------------------------------------------------------
def decode_case(llm: Any, prompts: list[list[int]], loras: list[Optional[str]], steps: int,
                device: torch.device, around: Any = None) -> dict[str, float]:
    """Prefill the batch in its own steps, then time ``steps`` decode steps (inside the context manager
    ``around`` when given: the profiler)."""
    from loraplex import SamplingParams

    eng = llm.engine
    eng.output_kind = "delta"  # as the server's engine process: per-step output grows with the batch only
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    for i, (p, lora) in enumerate(zip(prompts, loras)):
        eng.add_request({"prompt_token_ids": p}, params, lora, f"r{i}-{time.monotonic_ns()}")
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in eng.requests.values()):
        eng.step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    # each cycle collection inside the timed steps, (generation, seconds): a full one can stall a step for
    # tens of milliseconds, which the mean shows and the median hides
    pauses: list[tuple[int, float]] = []
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append((info["generation"], time.perf_counter() - started[0]))

    gc.callbacks.append(on_gc)
    merges = eng.cache_stats().get("lora_merges", 0)
    try:
        with around if around is not None else contextlib.nullcontext():
            t0 = time.perf_counter()
            n = 0
            times = []
            host = 0.0
            while eng.has_unfinished_requests():
                s0 = time.perf_counter()
                eng.step()
                times.append(time.perf_counter() - s0)
                host += eng.last_step_host_seconds
                n += 1
            sync()
        total = time.perf_counter() - t0
    finally:
        gc.callbacks.remove(on_gc)
    merged = eng.cache_stats().get("lora_merged", 0.0)
    return {"lora_merges": eng.cache_stats().get("lora_merges", 0) - merges, "lora_merged_at_end": merged,
            "gc_collections": len(pauses), "gc_gen2_collections": sum(g == 2 for g, _ in pauses),
            "gc_ms": 1e3 * sum(t for _, t in pauses), "step_ms_max": 1e3 * max(times),
            "steps": n, "ms_per_step": 1e3 * total / max(n, 1), "tokens_per_s": len(prompts) * n / total,
            "host_ms_per_step": 1e3 * host / max(n, 1),
            "step_ms_p50": 1e3 * statistics.median(times), "step_ms_p99": 1e3 * sorted(times)[int(0.99 * (n - 1))]}


def merge_cost(llm: Any, device: torch.device, reps: int = 5) -> Optional[dict[str, float]]:
    """``--lora-merging``: what one merge of a resident adapter into the linear weights, and one restore of
    them, cost (ms, median of ``reps``, each synchronised): what a change of mix pays on top of its steps. The
    merger's policy state is put back afterwards. None when no resident adapter can be merged."""
    m = llm.engine.merger
    if m is None or not m.linears:
        return None
    slot = next((s for s in sorted(m.linears[0].wrapper.active) if m.mergeable(s)), None)
    if slot is None:
        return None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    policy = m.after_steps
    merges, restores = [], []
    m.restore()
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        m.merge(slot)
        sync()
        t1 = time.perf_counter()
        m.restore()
        sync()
        merges.append(t1 - t0)
        restores.append(time.perf_counter() - t1)
    m.after_steps = policy
    return {"merge_ms": 1e3 * statistics.median(merges), "restore_ms": 1e3 * statistics.median(restores),
            "copy_gib": m.memory_bytes / 2**30, "linear_layers": len(m.linears)}


def prefill_case(llm: Any, a: argparse.Namespace, device: torch.device, n_params: int) -> dict[str, float]:
    from loraplex import SamplingParams

    g = torch.Generator().manual_seed(1)
    prompts = [{"prompt_token_ids": torch.randint(3, a.vocab - 1, (a.prefill_len,), generator=g).tolist()}
               for _ in range(a.prefill_batch)]
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], one, use_tqdm=False)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    llm.generate(prompts, one, use_tqdm=False)
    sync()
    dt = time.perf_counter() - t0
    tokens = a.prefill_batch * a.prefill_len
    return {"tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt, "flops_per_s": 2 * n_params * tokens / dt}


def itl_case(llm: Any, a: argparse.Namespace, batch: int, device: torch.device,
             budget: int, cap: int = 0) -> Optional[dict[str, float]]:
    """Step gaps of ``batch`` decoding requests while one long prompt is prefilled among them, in chunks of at
    most ``budget`` tokens a step (0: the engine's own budget) and at most ``cap`` of the prompt's
    (long_prefill_token_threshold; 0: none)."""
    eng = llm.engine
    if a.long_prompt + 8 >= eng.max_model_len:
        return None
    sched = eng.scheduler
    own = sched.max_num_batched_tokens, sched.long_prefill_token_threshold
    sched.max_num_batched_tokens = budget or own[0]  # what max_num_batched_tokens=budget would give
    sched.long_prefill_token_threshold = cap
    try:
        return _itl_steps(eng, a, batch, device) | {"budget": budget or own[0], "long_prefill_token_threshold": cap}
    finally:
        sched.max_num_batched_tokens, sched.long_prefill_token_threshold = own


def _itl_steps(eng: Any, a: argparse.Namespace, batch: int, device: torch.device) -> dict[str, float]:
    from loraplex import SamplingParams

    g = torch.Generator().manual_seed(2)
    params = SamplingParams(max_tokens=a.new_tokens, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        eng.add_request({"prompt_token_ids": torch.randint(3, a.vocab - 1, (a.prompt_len,), generator=g).tolist()},
                        params, None, f"itl{i}")
    for _ in range(3):
        eng.step()
    long = torch.randint(3, a.vocab - 1, (a.long_prompt,), generator=g).tolist()
    eng.add_request({"prompt_token_ids": long}, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                    None, "long")
    gaps = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    while any(r.request_id.startswith("itl") for r in eng.requests.values()):
        sync()
        t = time.perf_counter()
        eng.step()
        sync()
        gaps.append(time.perf_counter() - t)
    while eng.has_unfinished_requests():
        eng.step()
    gaps.sort()
    return {"itl_ms_p50": 1e3 * gaps[len(gaps) // 2], "itl_ms_p99": 1e3 * gaps[int(0.99 * (len(gaps) - 1))],
            "itl_ms_max": 1e3 * gaps[-1], "steps": len(gaps)}


def profile_decode(llm: Any, prompts: list[list[int]], loras: list[Optional[str]], steps: int,
                   device: torch.device, trace: Path) -> None:
    """torch.profiler over ``steps`` decode steps (the prefill before them is not profiled): kernels by GPU time, launches per step, and the share of
    the wall time the GPU was busy."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=acts)
    decode_case(llm, prompts, loras, steps, device, around=prof)
    events = prof.key_averages()
    print(events.table(sort_by="self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total",
                       row_limit=20), flush=True)
    if device.type == "cuda":  # the host's side: where a step's CPU time goes
        print(events.table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    if kernels:
        busy = sum(e.device_time for e in kernels) / 1e3  # ms
        wall = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) / 1e3
        print(f"profile: {len(kernels) / steps:.0f} kernels per step, GPU busy {busy:.1f} of {wall:.1f} ms "
              f"({busy / wall:.2f})", flush=True)
    trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    if device.type == "cuda":
        summarize_trace(trace, steps)


def summarize_trace(trace: Path, steps: int, top: int = 25) -> None:
    """From the chrome trace: GPU time per step by kernel (launches per step, mean time), and the GPU's idle
    time per step with the kernel pairs whose gaps add up to most of it."""
    events = json.loads(trace.read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    ks = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    if not ks:
        return
    by_name: dict[str, list[float]] = {}
    for e in ks:
        t = by_name.setdefault(e["name"][:70], [0.0, 0])
        t[0] += e["dur"]
        t[1] += 1
    print(f"trace: {len(ks) / steps:.0f} GPU operations a step; per step, by kernel:")
    for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {us / steps:9.1f} us {n / steps:7.1f} launches {us / n:8.2f} us each  {name}")
    gaps: dict[str, list[float]] = {}
    end, prev = ks[0]["ts"] + ks[0]["dur"], ks[0]["name"][:40]
    for e in ks[1:]:
        gap = e["ts"] - end
        if gap > 0:
            gaps.setdefault(f"{prev} -> {e['name'][:40]}", []).append(gap)
        if e["ts"] + e["dur"] > end:
            end, prev = e["ts"] + e["dur"], e["name"][:40]
    idle = sum(sum(g) for g in gaps.values())
    long = sorted(g for gs in gaps.values() for g in gs if g > 100)  # the profiler's start, new prompts: not a step's
    print(f"trace: GPU idle {idle / steps:.1f} us a step, {(idle - sum(long)) / steps:.1f} without the {len(long)} "
          f"gaps over 100 us ({', '.join(f'{g:.0f}' for g in long[-5:])} us); the largest by the kernels around them "
          f"(the median gap beside the mean: a few long gaps make a large mean):")
    for pair, gs in sorted(gaps.items(), key=lambda kv: -sum(kv[1]))[:10]:
        print(f"  {sum(gs) / steps:9.1f} us {len(gs) / steps:7.1f} gaps {sum(gs) / len(gs):8.2f} us each, median "
              f"{sorted(gs)[len(gs) // 2]:.2f}  {pair}")
    print_layer(ks)


def print_layer(ks: list[dict], norm: str = "_rms_norm_kernel") -> None:
    """One decoder layer as the GPU ran it, from the middle of the trace: each operation's start (us from the
    layer's first norm), duration and stream, from one norm to the norm two after it (a layer has two). Beside
    the GEMMs' times alone (``kernel_bench.py --gemm``) it shows what runs beside what and what waits."""
    norms = [j for j, e in enumerate(ks) if e["name"].startswith(norm)]
    if len(norms) < 3:
        return
    mid = len(norms) // 2
    first, last = norms[mid], norms[mid + 2]
    t0 = ks[first]["ts"]
    print("trace: one layer from the middle of the trace (us from its first norm: start, duration, stream):")
    for e in ks[first:last + 1]:
        print(f"  {e['ts'] - t0:8.1f} {e['dur']:7.1f}  s{e.get('args', {}).get('stream', '?'):<6} {e['name'][:60]}")


def peft_case(model_dir: Path, adapters: list[Path], prompts: list[list[int]], steps: int, device: torch.device,
              dtype: torch.dtype) -> dict[str, float]:
    """HF transformers + PEFT with one adapter per request (``adapter_names``), random weights: ms per decode
    step from the difference of a ``steps + 1``-token and a 1-token generate."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)), dtype=dtype)
    names = [f"a{i}" for i in range(len(prompts))]
    model = PeftModel.from_pretrained(hf, str(adapters[0]), adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:len(prompts)]):
        model.load_adapter(str(path), adapter_name=name)
    model.eval()
    ids = torch.tensor(prompts, device=device)

    def gen(n: int) -> float:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, adapter_names=names)
        sync()
        return time.perf_counter() - t0

    gen(2)
    per_step = (gen(steps + 1) - gen(1)) / steps
    return {"ms_per_step": 1e3 * per_step, "tokens_per_s": len(prompts) / per_step}


# ---- main -----------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    from loraplex import LLM, LoRARequest

    device = torch.device(a.device if a.device != "cuda" or torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, a.dtype)
    if a.blas != "default":
        torch.backends.cuda.preferred_blas_library(a.blas)
    card = card_rates(device, dtype)
    print(f"card: copy {card['copy_bytes_per_s'] / 1e12:.2f} TB/s, matmul {card['matmul_flops_per_s'] / 1e12:.0f} "
          f"TFLOP/s ({dtype})", flush=True)
    t_build = time.perf_counter()
    model, adapters = build(a)
    print(f"model folder and {len(adapters)} adapter folders ready in {time.perf_counter() - t_build:.1f} s "
          f"(under {a.out_dir}; adapters of the same shape are reused)", flush=True)
    max_len = max(a.prompt_len + a.new_tokens + 16, a.long_prompt + 64, a.prefill_len + 16)
    t0 = time.perf_counter()
    llm = LLM(str(model), load_format="dummy", dtype=a.dtype, device=str(device), max_model_len=max_len,
              max_num_seqs=max(a.batches) + 1, max_loras=a.max_loras, max_lora_rank=a.rank,
              max_cpu_loras=max(len(adapters), a.max_loras), seed=0, enforce_eager=a.enforce_eager,
              tensor_parallel_size=a.tensor_parallel_size, enable_lora_merging=a.lora_merging,
              enable_prefix_caching=False)  # every case computes its prompts: a cache hit would flatter prefill and ITL
    graphs = llm.engine.runner.graphs
    startup = {"seconds": time.perf_counter() - t0,
               "graph_capture_seconds": graphs.capture_seconds if graphs else None,
               "graph_memory_bytes": graphs.memory_bytes if graphs else None}
    print(f"start-up {startup['seconds']:.1f} s (dummy weights" + (
        f"; {len(graphs.sizes)} graph sizes captured in {graphs.capture_seconds:.1f} s, "
        f"{graphs.memory_bytes / 2**20:.0f} MiB)" if graphs else "; eager)"), flush=True)
    graphs = None  # no reference to the engine's model outlives the engine (the PEFT case needs its memory)
    t_reg = time.perf_counter()
    for i, path in enumerate(adapters):
        llm.add_lora(LoRARequest(f"a{i}", str(path)))
    print(f"{len(adapters)} adapters registered in {time.perf_counter() - t_reg:.1f} s", flush=True)
    for kind in ("dora", "saved"):
        if kind in a.cases:
            llm.add_lora(LoRARequest(f"{kind}0", str(build_variant(Path(a.out_dir), a, adapters[0], kind))))
    elem = torch.empty(0, dtype=dtype).element_size()
    wbytes = weight_bytes(llm.engine.model)
    table_lora = embedding_and_head_lora_bytes(llm.engine)
    print(f"per GPU: weights {wbytes / 2**30:.2f} GiB; embed_tokens + lm_head LoRA slots "
          f"{table_lora / 2**20:.1f} MiB (tensor_parallel_size={a.tensor_parallel_size})", flush=True)
    n_params = wbytes // elem
    rng = torch.Generator().manual_seed(0)
    rows = []
    for batch in a.batches:
        prompts = [torch.randint(3, a.vocab - 1, (a.prompt_len,), generator=rng).tolist() for _ in range(batch)]
        for case in a.cases:
            loras = mix(case, batch, a, rng)
            if case != "base" and len({x for x in loras if x}) > a.max_loras:
                print(f"skip batch {batch} {case}: more distinct adapters than --max-loras", flush=True)
                continue
            # warm-up: slots loaded, kernels compiled; with merging, long enough that a uniform mix is merged
            # before the timed steps (lora/merge.py: MERGE_AFTER_STEPS), as it is in a long run
            decode_case(llm, prompts, loras, 12 if a.lora_merging else 4, device)
            if a.profile and not rows:
                profile_decode(llm, prompts, loras, a.profile, device, Path(a.json).with_suffix(".trace.json"))
            r = decode_case(llm, prompts, loras, a.new_tokens, device)
            used = len({x for x in loras if x})
            mean_ctx = a.prompt_len + a.new_tokens / 2
            # per GPU: this rank's weights (the model is this rank's shard), and its share of KV and adapters
            tp = a.tensor_parallel_size
            floor_bytes = wbytes + (used * adapter_bytes(a, elem) + kv_bytes(a, batch, mean_ctx, elem)) / tp
            if case == "saved":  # the adapter's own head is read beside the base one
                floor_bytes += a.vocab * a.hidden * elem
            floor_ms = 1e3 * floor_bytes / card["copy_bytes_per_s"]
            row = dict(batch=batch, case=case, adapters_used=used, **r, floor_ms=floor_ms,
                       share_of_floor=floor_ms / r["ms_per_step"])
            rows.append(row)
            print(f"batch {batch:>4} {case:>9} ({used:>3} adapters): {r['ms_per_step']:8.2f} ms/step "
                  f"{r['tokens_per_s']:9.0f} tok/s  floor {floor_ms:6.2f} ms  share {row['share_of_floor']:.2f}  "
                  f"host {r['host_ms_per_step']:.2f} ms/step  slowest step {r['step_ms_max']:.1f} ms  "
                  f"gc {r['gc_collections']} ({r['gc_gen2_collections']} full) {r['gc_ms']:.1f} ms"
                  + (f"  merged: {'yes' if r['lora_merged_at_end'] else 'no'} ({r['lora_merges']} merges while timed)"
                     if a.lora_merging else ""), flush=True)
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["case"] == "base"}
    for r in rows:
        if r["batch"] in base:
            r["vs_base"] = r["tokens_per_s"] / base[r["batch"]]
    merging = merge_cost(llm, device) if a.lora_merging and a.tensor_parallel_size == 1 else None
    if merging:
        print(f"merging one adapter into {merging['linear_layers']} linear modules: {merging['merge_ms']:.2f} ms; "
              f"restoring them: {merging['restore_ms']:.2f} ms (the kept copy: {merging['copy_gib']:.1f} GiB)",
              flush=True)
    prefill = None if a.skip_prefill else prefill_case(llm, a, device, n_params)
    if prefill:
        prefill["share_of_matmul"] = prefill["flops_per_s"] / card["matmul_flops_per_s"]
        print(f"prefill {a.prefill_batch} x {a.prefill_len}: {prefill['tokens_per_s']:.0f} tok/s, "
              f"{prefill['share_of_matmul']:.2f} of the matmul rate", flush=True)
    itl = []
    runs = [] if a.skip_itl else [(b, 0) for b in a.itl_budgets] + [(0, c) for c in a.itl_caps]
    for budget, cap in runs:
        r = itl_case(llm, a, min(a.batches), device, budget, cap)
        if r:
            itl.append(r)
            how = f"budget {r['budget']}" + (f", long_prefill_token_threshold {cap}" if cap else "")
            print(f"decode ITL while a {a.long_prompt}-token prompt is prefilled ({how}): "
                  f"p50 {r['itl_ms_p50']:.1f} ms, p99 {r['itl_ms_p99']:.1f} ms ({r['steps']} steps)", flush=True)
    peft = None
    if a.peft:
        del llm  # PEFT needs the memory the engine's KV cache holds
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        batch = min(a.batches)
        prompts = [torch.randint(3, a.vocab - 1, (a.prompt_len,), generator=rng).tolist() for _ in range(batch)]
        peft = peft_case(model, adapters, prompts, a.peft_tokens, device, dtype)
        mine = next((r for r in rows if r["batch"] == batch and r["case"] == "distinct"), None)
        if mine:
            peft["loraplex_speedup"] = peft["ms_per_step"] / mine["ms_per_step"]
        print(f"HF transformers + PEFT, batch {batch}, distinct adapters: {peft['ms_per_step']:.1f} ms/step, "
              f"{peft['tokens_per_s']:.0f} tok/s", flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or "cpu")
    result = {"config": vars(a), "card": card, "device": name, "startup": startup, "weight_bytes": wbytes,
              "table_lora_bytes_per_gpu": table_lora,
              "decode": rows, "lora_merge_cost": merging,
              "peft": peft, "prefill": prefill, "itl": itl, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d")}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=2))
    print(f"\n{'batch':>5} {'case':>9} {'ms/step':>9} {'tok/s':>9} {'floor ms':>9} {'share':>6} {'vs base':>8}")
    for r in rows:
        print(f"{r['batch']:>5} {r['case']:>9} {r['ms_per_step']:>9.2f} {r['tokens_per_s']:>9.0f} "
              f"{r['floor_ms']:>9.2f} {r['share_of_floor']:>6.2f} {r.get('vs_base', float('nan')):>8.2f}")
    plot(rows, a.plot)
    print(f"wrote {a.json} ({name})")
    return 0


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['batch']}/{r['case']}" for r in rows]
    ax.bar(labels, [r["share_of_floor"] for r in rows])
    ax.axhline(0.8, color="k", linestyle="--", linewidth=1)
    ax.set_ylabel("share of the bandwidth floor")
    ax.set_title("decode step: floor / measured")
    plt.xticks(rotation=45, ha="right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
