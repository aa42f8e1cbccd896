"""Many adapters behind one model (issue 13): throughput and latency with requests drawn Zipf over
``--num-adapters`` registered adapters of ranks 8 to 64, against the same load on one adapter.

Requests arrive at ``--rate`` per second (deterministic gaps) into one engine, stepped here; each takes a
random prompt of the preset's length and its number of new tokens (all alike, or spread around the
preset's with ``--max-tokens-jitter``). As in the server, a request whose
adapter was evicted from host memory joins once an I/O thread has re-read the adapter's folder. Reports
output tokens/s, TTFT p50 / p99, slot loads and their latency (from the pool's events: host to slot, and disk
to host after eviction), the steps each request waited for its adapter's slot, the most adapters resident in
device slots at once, and the slots' device memory. A cold start registers the adapters just before the
load; a warm start has run the load once already.

Two slot layouts, side by side in one run (``--layouts``), each in its own engine with the same memory (that of
``max_loras`` adapters of the largest rank): ``paged``, the Triton backend's rank-aware slots (each adapter takes
pages of 8 rank rows for its own rank, so more adapters stay resident); ``padded``, every slot padded to
``max_lora_rank`` (the Triton kernels with one page of ``max_lora_rank`` per slot, as the torch backend stores
them; on a CPU the torch backend itself).

    python benchmarks/adapter_scale.py --preset llama3-8b   # an H200 (dummy weights)
    python benchmarks/adapter_scale.py --preset tiny        # CPU
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import shutil
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": {"hidden": 4096, "intermediate": 14336, "layers": 32, "heads": 32, "kv_heads": 8, "vocab": 128256,
                  "dtype": "bfloat16", "device": "cuda", "num_adapters": 1000, "num_requests": 2000, "rate": 100.0,
                  "max_loras": 32, "max_cpu_loras": 256, "prompt_len": 128, "max_tokens": 64,
                  "targets": ["q_proj", "v_proj"]},  # PEFT's default targets for Llama: 25 MB per adapter on average
    "tiny": {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 512,
             "dtype": "float32", "device": "cpu", "num_adapters": 64, "num_requests": 200, "rate": 400.0,
             "max_loras": 8, "max_cpu_loras": 16, "prompt_len": 16, "max_tokens": 8,
             "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
}
RANKS = (8, 16, 32, 64)


def build_adapters(out: Path, cfg: SimpleNamespace) -> list[Path]:
    """``cfg.num_adapters`` PEFT folders, adapter ``i`` of rank ``RANKS[i % 4]``. The weights are written once per
    rank (in the model's dtype) and every folder of that rank holds a hard link to that file, so 1,000 adapters
    of the 8B shape take a few GB of disk, not a hundred; each folder is still read, hashed and staged on its
    own by the engine (only the OS page cache is shared, as a warm local disk cache would be)."""
    from safetensors.torch import save_file

    from gpu_lora_throughput import adapter_tensors, write_adapter_config

    weights = {}
    for r in RANKS:
        path = out / f"weights_r{r}.safetensors"
        if not path.exists():
            save_file(adapter_tensors(cfg, r, cfg.targets, seed=r, dtype=getattr(torch, cfg.dtype)), str(path))
        weights[r] = path
    folders = []
    for i in range(cfg.num_adapters):
        r = RANKS[i % len(RANKS)]
        folder = out / f"adapter{i}"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "adapter_model.safetensors"
        if target.exists():
            target.unlink()
        try:
            os.link(weights[r], target)
        except OSError:
            shutil.copyfile(weights[r], target)
        write_adapter_config(folder, r, cfg.targets)
        folders.append(folder)
    return folders


PROFILE: Optional[cProfile.Profile] = None  # --profile-acquire: cProfile around every acquire of the runs
TRACE = False  # --trace: every step's row in the JSON


def run_load(llm: Any, names: list[Optional[str]], prompts: list[list[int]], rate: float,
             max_tokens: list[int]) -> dict[str, float]:
    from loraplex import SamplingParams

    eng = llm.engine
    params = {n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in set(max_tokens)}
    eng.pool.drain_events() if eng.pool is not None else None
    t0 = time.perf_counter()
    arrival: dict[str, float] = {}
    first: dict[str, float] = {}
    peak_resident: list[int] = []
    step_s: list[float] = []  # wall time of each engine step
    running: list[int] = []  # requests running after each step (the batch the slots allow)
    load_steps: list[float] = []  # wall time of the steps that started slot uploads
    distinct: list[int] = []  # adapters among the running requests after each step
    # scheduling rounds (steps) each request was passed over for want of its adapter's slot: a copy in flight
    # or no slot free (issue 13: a miss served from host memory may add at most one step to its request)
    slot_waits: dict[str, int] = {}
    # As the server does (server/engine_core.py): a request whose adapter was evicted from host memory waits
    # while an I/O thread re-reads the adapter's folder, then joins; the step loop never waits for a disk.
    # (LLMEngine.add_request alone would read it on the calling thread, stalling every running request.)
    threads = 1  # as the server's (server/engine_core.py: more threads were measured and lost)
    io = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="adapter-io")
    rereads: dict[str, tuple[Future, list[tuple[str, int]]]] = {}  # name -> (its read, requests waiting for it)
    reread_submitted: dict[str, float] = {}  # name -> when its re-read was submitted
    reread_waits: list[float] = []  # submitted to adopted, each re-read

    def add(rid: str, i: int) -> None:
        eng.add_request({"prompt_token_ids": prompts[i]}, params[max_tokens[i]], names[i], rid)

    # host time the engine thread spends in the pool's acquire (slot choice, eviction, recording the copies)
    acquire_s = [0.0]
    load_acquire: list[float] = []  # that time in each step that started slot uploads
    if eng.pool is not None:
        acquire = type(eng.pool).acquire

        def timed_acquire(adapter: Any) -> Optional[int]:
            t = time.perf_counter()
            if PROFILE is not None:
                PROFILE.enable()
            try:
                return acquire(eng.pool, adapter)
            finally:
                if PROFILE is not None:
                    PROFILE.disable()
                acquire_s[0] += time.perf_counter() - t

        eng.pool.acquire = timed_acquire  # an instance attribute: removed when the load ends

    # what each step scheduled: (sequences, tokens, prompt chunks), to tell long steps' contents
    scheduled: list[tuple[int, int, int]] = [(0, 0, 0)]
    schedule = type(eng.scheduler).schedule

    def counted_schedule() -> Any:
        out = schedule(eng.scheduler)
        scheduled[-1] = (len(out.seqs), sum(s.num_new_tokens for s in out.seqs),
                         sum(s.num_new_tokens > 1 for s in out.seqs))
        return out

    eng.scheduler.schedule = counted_schedule
    trace: list[dict[str, float]] = []  # one row per step

    nxt = 0
    while nxt < len(names) or eng.has_unfinished_requests() or rereads:
        now = time.perf_counter() - t0
        while nxt < len(names) and nxt / rate <= now:
            rid = f"r{nxt}-{time.monotonic_ns()}"
            arrival[rid] = nxt / rate
            name = names[nxt]
            if name is not None and (name in rereads or eng.pool.needs_read(name)):
                if name not in rereads:
                    rereads[name] = (io.submit(eng.pool.read_current, name), [])
                    reread_submitted[name] = time.perf_counter()
                rereads[name][1].append((rid, nxt))
            else:
                add(rid, nxt)
            nxt += 1
        for name in [n for n, (f, _) in rereads.items() if f.done()]:
            f, waiting = rereads.pop(name)
            eng.pool.adopt(*f.result())  # a failed read raises here: the benchmark's adapters never fail
            # what the requests waiting for it saw: the queue behind the I/O threads, the read, the adoption
            reread_waits.append(time.perf_counter() - reread_submitted.pop(name))
            for rid, i in waiting:
                add(rid, i)
        if not eng.has_unfinished_requests():
            time.sleep(0.0005 if rereads else max(0.0, nxt / rate - now))
            continue
        loads0 = eng.pool.num_slot_loads if eng.pool is not None else 0
        reading = sum(not f.done() for f, _ in rereads.values())  # disk re-reads in flight on the I/O thread
        a0 = acquire_s[0]
        scheduled[-1] = (0, 0, 0)
        s0 = time.perf_counter()
        outs = eng.step()
        step_s.append(time.perf_counter() - s0)
        started = (eng.pool.num_slot_loads - loads0) if eng.pool is not None else 0
        if started:
            load_steps.append(step_s[-1])  # a step that started slot uploads (their host work is in it)
            load_acquire.append(acquire_s[0] - a0)
        trace.append({"t_s": s0 - t0, "wall_ms": 1e3 * step_s[-1], "host_ms": 1e3 * eng.last_step_host_seconds,
                      "finished": sum(o.finished for o in outs),
                      "seqs": scheduled[-1][0], "tokens": scheduled[-1][1], "prompt_chunks": scheduled[-1][2],
                      "loads": started, "acquire_ms": 1e3 * (acquire_s[0] - a0), "reads_in_flight": reading})
        distinct.append(len({r.slot for r in eng.scheduler.running if r.slot >= 0}))
        for r in eng.scheduler.running:
            if r.slot_waits and r.request_id not in slot_waits:
                slot_waits[r.request_id] = r.slot_waits
        for o in outs:
            if o.request_id not in first and o.outputs and o.outputs[0].token_ids:
                first[o.request_id] = time.perf_counter() - t0 - arrival[o.request_id]
        running.append(len(eng.scheduler.running))
        if eng.pool is not None:
            peak_resident.append(sum(n is not None for n in eng.pool.device_resident))
    wall = time.perf_counter() - t0
    io.shutdown()
    if eng.pool is not None:
        del eng.pool.acquire
    del eng.scheduler.schedule
    ttft = sorted(first.values())
    peak = max(peak_resident) if peak_resident else 0
    events = eng.pool.drain_events() if eng.pool is not None else []
    loads = sorted(s for _, kind, s in events if kind == "load")
    reads = [s for _, kind, s in events if kind == "read"]
    steps = sorted(step_s)
    step_p50 = steps[len(steps) // 2] if steps else 0.0
    # the steps above p90 against the rest: whether long steps are the ones that gather prompt tokens and loads
    cut = steps[int(0.9 * (len(steps) - 1))] if steps else 0.0
    long = [r for r in trace if r["wall_ms"] > 1e3 * cut]
    rest = [r for r in trace if r["wall_ms"] <= 1e3 * cut]

    def mean(rows: list[dict[str, float]], key: str) -> float:
        return sum(r[key] for r in rows) / max(1, len(rows))

    tails = {f"{k}_{part}": mean(rows, k) for part, rows in (("long", long), ("rest", rest))
             for k in ("wall_ms", "host_ms", "seqs", "tokens", "prompt_chunks", "loads", "finished")}
    # steps by the prompt chunks they carry (host and wall time at the median): a class of step that is slow for
    # its work shows here (the eleventh session's eager steps above 512 tokens did)
    by_chunks = {}
    for lo, hi in ((0, 1), (1, 2), (2, 4), (4, 8), (8, 1 << 30)):
        rows = [r for r in trace if lo <= r["prompt_chunks"] < hi]
        if rows:
            med = lambda key: sorted(r[key] for r in rows)[len(rows) // 2]  # noqa: E731
            by_chunks[f"{lo}-{hi - 1}" if hi - lo > 1 and hi < 1 << 30 else f"{lo}" if hi - lo == 1 else f"{lo}+"] = {
                "steps": len(rows), "tokens_mean": mean(rows, "tokens"), "host_ms_p50": med("host_ms"),
                "wall_ms_p50": med("wall_ms")}
    waits = sorted(slot_waits.get(rid, 0) for rid in arrival)  # every request of the load, 0 if it never waited

    def pct(values: list[float], q: float) -> float:
        v = sorted(values)
        return v[int(q * (len(v) - 1))] if v else 0.0
    load_p99 = loads[int(0.99 * (len(loads) - 1))] if loads else 0.0
    return {"output_tokens_per_s": sum(max_tokens) / wall, "seconds": wall,
            "ttft_ms_p50": 1e3 * ttft[len(ttft) // 2], "ttft_ms_p99": 1e3 * ttft[int(0.99 * (len(ttft) - 1))],
            "step_ms_p50": 1e3 * step_p50,
            # a slot load (host memory -> device, on a side stream) against the engine's step: issue 13 asks that a
            # miss served from host memory add at most one decode step to its request
            "slot_load_ms_p99": 1e3 * load_p99, "slot_load_p99_in_steps": load_p99 / step_p50 if step_p50 else 0.0,
            "slot_loads": len(loads), "slot_load_ms_mean": 1e3 * sum(loads) / max(1, len(loads)),
            "disk_reads": len(reads), "disk_read_ms_mean": 1e3 * sum(reads) / max(1, len(reads)),
            "reread_wait_ms_p50": 1e3 * pct(reread_waits, 0.5), "reread_wait_ms_p99": 1e3 * pct(reread_waits, 0.99),
            "read_threads": threads,
            "peak_adapters_in_slots": peak, "mean_running": sum(running) / max(1, len(running)),
            "steps": len(step_s), "step_seconds_total": sum(step_s),
            # where long steps come from: the tail of all steps, the steps that started uploads, the adapter mix
            "step_ms_p90": 1e3 * steps[int(0.9 * (len(steps) - 1))] if steps else 0.0,
            "step_ms_p99": 1e3 * steps[int(0.99 * (len(steps) - 1))] if steps else 0.0,
            "steps_with_loads": len(load_steps),
            "load_step_ms_p50": 1e3 * sorted(load_steps)[len(load_steps) // 2] if load_steps else 0.0,
            "load_step_acquire_ms_mean": 1e3 * sum(load_acquire) / max(1, len(load_acquire)),
            "slot_loads_per_load_step": (sum(1 for _, kind, _ in events if kind == "load")
                                         / max(1, len(load_steps))),
            "mean_distinct_adapters": sum(distinct) / max(1, len(distinct)),
            "slot_wait_steps_p50": waits[len(waits) // 2] if waits else 0,
            "slot_wait_steps_p99": waits[int(0.99 * (len(waits) - 1))] if waits else 0,
            "slot_wait_steps_max": waits[-1] if waits else 0,
            "requests_waiting_over_one_step": sum(w > 1 for w in waits) / max(1, len(waits)),
            "steps_above_p90": tails, "steps_by_prompt_chunks": by_chunks, **({"trace": trace} if TRACE else {})}


@contextlib.contextmanager
def phase_timers(pool: Any) -> Iterator[dict[str, float]]:
    """Seconds the reading threads spend in each phase of ``pool.read``, summed over threads, while inside."""
    import loraplex.lora.model_lora as model_lora

    phases = {"read and validate": 0.0, "pack": 0.0, "plan": 0.0}
    lock = threading.Lock()

    def timed(fn: Callable, phase: str) -> Callable:
        def run(*args: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                with lock:
                    phases[phase] += time.perf_counter() - t
        return run

    lm = pool.lora_model
    saved = (pool._load, model_lora.pack_adapter, lm.plan)
    pool._load, model_lora.pack_adapter = timed(pool._load, "read and validate"), timed(saved[1], "pack")
    lm.plan = timed(lm.plan, "plan")
    try:
        yield phases
    finally:
        pool._load, model_lora.pack_adapter = saved[0], saved[1]
        del lm.plan  # the instance attribute: the method again


def run_layout(a: argparse.Namespace, cfg: SimpleNamespace, layout: str, model: str, folders: list[Path],
               picks: list[int], prompts: list[list[int]], lengths: list[int], device: str) -> dict[str, Any]:
    """One engine with the slot layout ``layout``: register the adapters, run the cold, warm and one-adapter
    loads, print and return the rows."""
    import gc

    from loraplex import LLM, LoRARequest
    from loraplex.lora.backends.triton_backend import TritonLoRABackend

    backend = "triton" if device == "cuda" or layout == "paged" else "torch"
    page_rank = TritonLoRABackend.page_rank
    if layout == "padded":
        TritonLoRABackend.page_rank = None  # one page of max_lora_rank per slot: the padded layout
    try:
        llm = LLM(model, load_format="dummy", dtype=cfg.dtype, device=device, max_loras=cfg.max_loras,
                  max_lora_rank=max(RANKS), max_cpu_loras=cfg.max_cpu_loras, enable_prefix_caching=False, seed=0,
                  max_model_len=cfg.prompt_len + max(lengths) + 8, lora_backend=backend,
                  max_num_batched_tokens=a.max_num_batched_tokens)
    finally:
        TritonLoRABackend.page_rank = page_rank
    pool = llm.engine.pool
    t0 = time.perf_counter()
    # Folders are read, validated, hashed and staged on a thread pool (LoRAPool.read is safe off the engine
    # thread, as the server's loads are), then registered in order; only the last max_cpu_loras stay in memory.
    # The threads' time goes to three phases: the folder read (safetensors, validation, the content hash), the
    # packing into one (pinned, on CUDA) buffer, and the slot plan; if their sum is near threads x wall time the
    # reads run side by side, if near the wall time something serialises them.
    reqs = [LoRARequest(f"a{i}", str(f)) for i, f in enumerate(folders)]
    threads = min(8, os.cpu_count() or 1)
    with phase_timers(pool) as phases, ThreadPoolExecutor(max_workers=threads) as ex:
        for req, adapter in zip(reqs, ex.map(pool.read, reqs)):
            pool.register(req, adapter=adapter)
    register_s = time.perf_counter() - t0
    n = max(1, len(reqs))
    print(f"[{layout}] registration on {threads} threads: {register_s:.1f} s; thread time an adapter: "
          + ", ".join(f"{k} {1e3 * v / n:.1f} ms" for k, v in phases.items()), flush=True)
    many = [f"a{i}" for i in picks]
    rows = {"cold": run_load(llm, many, prompts, cfg.rate, lengths),
            "warm": run_load(llm, many, prompts, cfg.rate, lengths),
            "one_adapter": run_load(llm, ["a0"] * cfg.num_requests, prompts, cfg.rate, lengths)}
    rows["warm"]["vs_one_adapter"] = rows["warm"]["output_tokens_per_s"] / rows["one_adapter"]["output_tokens_per_s"]
    slot_bytes = sum(t.numel() * t.element_size() for m in pool.lora_model.modules
                     for t in (m.wrapper.stack.a, m.wrapper.stack.b))
    print(f"[{layout}] {backend} backend: {pool.num_slots} slots in {slot_bytes / 2**20:.1f} MiB of adapter memory "
          f"(max_loras={cfg.max_loras}, max_lora_rank={max(RANKS)}); {cfg.num_adapters} adapters registered in "
          f"{register_s:.1f} s", flush=True)
    for name, r in rows.items():
        print(f"[{layout}] {name:>11}: {r['output_tokens_per_s']:8.0f} out tok/s  TTFT p50 {r['ttft_ms_p50']:7.1f} ms  "
              f"p99 {r['ttft_ms_p99']:7.1f} ms  slot loads {r['slot_loads']:4d} ({r['slot_load_ms_mean']:.2f} ms)  "
              f"disk reads {r['disk_reads']:4d} ({r['disk_read_ms_mean']:.1f} ms; waited p50 {r['reread_wait_ms_p50']:.0f} / "
              f"p99 {r['reread_wait_ms_p99']:.0f} ms on {r['read_threads']} thread(s))  at most "
              f"{r['peak_adapters_in_slots']} adapters in slots  slot load p99 {r['slot_load_ms_p99']:.2f} ms = "
              f"{r['slot_load_p99_in_steps']:.2f} steps of {r['step_ms_p50']:.2f} ms; {r['mean_running']:.1f} running on "
              f"average over {r['steps']} steps ({r['step_seconds_total']:.1f} of {r['seconds']:.1f} s)", flush=True)
        print(f"[{layout}] {name:>11}  steps p50/p90/p99 {r['step_ms_p50']:.2f} / {r['step_ms_p90']:.2f} / "
              f"{r['step_ms_p99']:.2f} ms; {r['steps_with_loads']} steps started uploads (p50 "
              f"{r['load_step_ms_p50']:.2f} ms, {r['load_step_acquire_ms_mean']:.2f} ms of it on average in the pool's "
              f"acquire for {r['slot_loads_per_load_step']:.1f} loads); {r['mean_distinct_adapters']:.1f} adapters "
              "running on average",
              flush=True)
        t = r["steps_above_p90"]
        print(f"[{layout}] {name:>11}  steps above p90 against the rest: {t['wall_ms_long']:.1f} / {t['wall_ms_rest']:.1f} "
              f"ms (host {t['host_ms_long']:.1f} / {t['host_ms_rest']:.1f}), {t['tokens_long']:.0f} / {t['tokens_rest']:.0f} "
              f"tokens, {t['prompt_chunks_long']:.1f} / {t['prompt_chunks_rest']:.1f} prompt chunks, {t['loads_long']:.2f} / "
              f"{t['loads_rest']:.2f} loads started, {t['finished_long']:.2f} / {t['finished_rest']:.2f} requests finished", flush=True)
        print(f"[{layout}] {name:>11}  steps by prompt chunks (steps, tokens, host / wall ms at the median): " + "; ".join(
            f"{k}: {v['steps']}, {v['tokens_mean']:.0f}, {v['host_ms_p50']:.1f} / {v['wall_ms_p50']:.1f}"
            for k, v in r["steps_by_prompt_chunks"].items()), flush=True)
        print(f"[{layout}] {name:>11}  steps a request waited for its slot: p50 {r['slot_wait_steps_p50']}, p99 "
              f"{r['slot_wait_steps_p99']}, max {r['slot_wait_steps_max']}; "
              f"{100 * r['requests_waiting_over_one_step']:.1f}% of requests waited more than one step", flush=True)
    print(f"[{layout}] warm load at {rows['warm']['vs_one_adapter']:.2f} of one adapter's throughput (issue 13's "
          "target: >= 0.90)", flush=True)
    out = {"backend": backend, "num_slots": pool.num_slots, "slot_bytes": slot_bytes, "register_seconds": register_s,
           "rows": rows}
    llm.engine.shutdown()
    del llm, pool
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--num-adapters", type=int, help="registered adapters (default: the preset's)")
    p.add_argument("--num-requests", type=int, help="requests of each load (default: the preset's)")
    p.add_argument("--rate", type=float, help="arrivals per second (default: the preset's)")
    p.add_argument("--layouts", nargs="+", choices=["paged", "padded"],
                   help="slot layouts to run (default: both on a GPU; padded, with the torch backend, on a CPU, where "
                        "the Triton kernels would run in the interpreter)")
    p.add_argument("--admit-loading", nargs="?", const="1", choices=["0", "1", "next"], default=None,
                   help="LORAPLEX_ADMIT_LOADING: 1 (the flag alone), a request whose adapter is being copied into its "
                        "slot joins at once and its step waits for the copy on the device; next, it joins from the "
                        "next scheduling round (experimental; default: the environment's, else 0)")
    p.add_argument("--profile-acquire", action="store_true",
                   help="cProfile the engine thread's time in the pool's acquire (slot choice, eviction, the slot "
                        "writes' host work) over every run, and print where it goes (the profile slows it)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="the engine's token budget a step (default: the engine's); a smaller one spreads gathered "
                        "prompts over more steps")
    p.add_argument("--max-tokens-jitter", type=float, default=0.0,
                   help="each request's new tokens drawn evenly from max_tokens x (1 +- this), 0 to 1 (default 0: "
                        "all alike, so requests admitted together also finish together)")
    p.add_argument("--trace", action="store_true",
                   help="write every step of every load into the JSON: wall and host time, sequences, tokens and "
                        "prompt chunks scheduled, slot loads started, time in acquire")
    p.add_argument("--out-dir", default="bench_out/adapter_scale")
    p.add_argument("--json", default="bench_out/adapter_scale.json")
    a = p.parse_args()
    if not 0 <= a.max_tokens_jitter < 1:
        p.error(f"--max-tokens-jitter must be in [0, 1), got {a.max_tokens_jitter}")
    global PROFILE, TRACE
    TRACE = a.trace
    if a.profile_acquire:
        PROFILE = cProfile.Profile()
    if a.admit_loading is not None:
        os.environ["LORAPLEX_ADMIT_LOADING"] = a.admit_loading  # read by the adapter pool when the engine starts
    cfg = SimpleNamespace(**PRESETS[a.preset])
    for key in ("num_adapters", "num_requests", "rate"):
        if getattr(a, key) is not None:
            setattr(cfg, key, getattr(a, key))
    from gpu_lora_throughput import build_model_folder

    device = cfg.device if cfg.device != "cuda" or torch.cuda.is_available() else "cpu"
    a.layouts = a.layouts or (["paged", "padded"] if device == "cuda" else ["padded"])
    out = Path(a.out_dir)
    model = build_model_folder(out, SimpleNamespace(**vars(cfg), rank=max(RANKS)))
    folders = build_adapters(out, cfg)
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([1.0 / (k + 1) ** a.zipf_s for k in range(cfg.num_adapters)])
    picks = torch.multinomial(w, cfg.num_requests, replacement=True, generator=g).tolist()
    prompts = [torch.randint(3, cfg.vocab - 1, (cfg.prompt_len,), generator=g).tolist()
               for _ in range(cfg.num_requests)]
    # new tokens per request: all max_tokens, or spread evenly around it (--max-tokens-jitter), the mean kept
    u = torch.rand(cfg.num_requests, generator=g).tolist()
    lengths = [max(1, round(cfg.max_tokens * (1 + a.max_tokens_jitter * (2 * x - 1)))) for x in u]
    results: dict[str, Any] = {}
    for layout in a.layouts:
        results[layout] = run_layout(a, cfg, layout, str(model), folders, picks, prompts, lengths, device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k.startswith("LORAPLEX_")}  # the engine options of the run
    Path(a.json).write_text(json.dumps({"config": vars(a), "preset": vars(cfg), "device": name, "env": env,
                                        "date": time.strftime("%Y-%m-%d"), "results": results}, indent=1))
    print(f"wrote {a.json} ({name})")
    if PROFILE is not None:  # where the engine thread's acquire time went, over every run and layout
        stats = pstats.Stats(PROFILE).sort_stats("cumulative")
        stats.print_stats(30)
        stats.sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
