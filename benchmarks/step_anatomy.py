"""One step's host and device time when K prompts join running decodes (the steps that admit a group of
requests at once, which the 1,000-adapter load of issue 13 runs in bursts).

An engine of the preset's shape (dummy weights, q_proj and v_proj adapters of ranks 8-64, as
``adapter_scale.py``) runs ``--decodes`` requests over half as many adapters. Then, for each K of ``--prompts``,
K requests of ``--prompt-len`` tokens with other adapters join: the step that prefills them is timed (wall, host
time as the engine measures it, and the device's tail after the step returns), and says whether it replayed a
graph or ran eagerly; then the K requests are aborted. ``--sync-check`` runs one more such step under
``torch.cuda.set_sync_debug_mode("error")``; ``--profile`` prints cProfile's view of one; ``--busy-thread`` times
each K again while another thread re-reads an adapter folder in a loop (GIL contention). With the default
graphs, steps above 512 tokens run eagerly; ``LORAPLEX_MIXED_GRAPH_TOKENS=2048`` captures graphs up to 2,048.

    python benchmarks/step_anatomy.py --preset llama3-8b    # an H200
    python benchmarks/step_anatomy.py --preset tiny         # CPU: that it runs
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))


def main() -> int:
    from adapter_scale import PRESETS, RANKS, build_adapters
    from gpu_lora_throughput import build_model_folder

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--decodes", type=int, default=48, help="running requests (over decodes / 2 adapters)")
    p.add_argument("--prompts", type=int, nargs="+", default=[3, 4, 5, 8, 14], help="prompts joining at once")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--repeat", type=int, default=1, help="steps timed per K (the median and the largest are shown)")
    p.add_argument("--sync-check", action="store_true", help="one step of the largest K under sync debug mode")
    p.add_argument("--profile", action="store_true", help="cProfile of one step of the largest K")
    p.add_argument("--busy-thread", action="store_true", help="also time each K while another thread re-reads "
                   "an adapter folder in a loop, as the server's and adapter_scale.py's I/O threads do (the GIL)")
    p.add_argument("--switch-interval", type=float, nargs="*", default=[],
                   help="with --busy-thread, also at these sys.setswitchinterval values (seconds; Python's is 0.005)")
    p.add_argument("--out-dir", default="bench_out/step_anatomy")
    a = p.parse_args()

    from loraplex import LLM, LoRARequest, SamplingParams
    from loraplex.engine.cuda_graph import MAX_MIXED_TOKENS

    cfg = SimpleNamespace(**PRESETS[a.preset])
    device = cfg.device if cfg.device != "cuda" or torch.cuda.is_available() else "cpu"
    half = max(1, a.decodes // 2)
    cfg.num_adapters = half + max(a.prompts)
    out = Path(a.out_dir)
    model = build_model_folder(out, SimpleNamespace(**vars(cfg), rank=max(RANKS)))
    folders = build_adapters(out, cfg)
    g = torch.Generator().manual_seed(0)

    def prompt(n: int) -> dict:
        return {"prompt_token_ids": torch.randint(3, cfg.vocab - 1, (n,), generator=g).tolist()}

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    new_tokens = 64
    llm = LLM(str(model), load_format="dummy", dtype=cfg.dtype, device=device, max_loras=cfg.max_loras,
              max_lora_rank=max(RANKS), max_num_seqs=a.decodes + max(a.prompts) + 2, enable_prefix_caching=False,
              seed=0, max_model_len=a.prompt_len + 2 * new_tokens, lora_backend="triton" if device == "cuda" else "torch")
    eng = llm.engine
    for i, f in enumerate(folders):
        llm.add_lora(LoRARequest(f"a{i}", str(f)))
    params = SamplingParams(max_tokens=2 * new_tokens, ignore_eos=True, temperature=0.0)
    for i in range(a.decodes):  # running requests, past their prefill
        eng.add_request(prompt(a.prompt_len), params, f"a{i % half}", f"d{i}")
    for _ in range(8):
        eng.step()
    graph = [False]
    if eng.runner.graphs is not None:
        prepare = eng.runner.prepare

        def traced(seqs):
            batch = prepare(seqs)
            graph[0] = batch.graph_seqs is not None
            return batch

        eng.runner.prepare = traced
    print(f"{device}: {len(eng.scheduler.running)} requests decoding; mixed graphs up to "
          f"{MAX_MIXED_TOKENS if eng.runner.graphs is not None else 0} tokens", flush=True)

    def trial(k: int, label: str = "", profile: bool = False, check: bool = False) -> None:
        runs = [one(k, profile, check) for _ in range(1 if profile or check else a.repeat)]
        tokens, eager = runs[0][3], runs[0][4]
        med = [sorted(r[i] for r in runs)[len(runs) // 2] for i in range(3)]
        top = [max(r[i] for r in runs) for i in range(3)]
        print(f"K={k:3d} ({tokens} tokens, {'eager' if eager else 'graph'}){label}: step {1e3 * med[0]:.1f} ms, host "
              f"{1e3 * med[1]:.1f} ms, device tail {1e3 * med[2]:.1f} ms" + (
                  f" (median of {len(runs)}; largest {1e3 * top[0]:.1f} / {1e3 * top[1]:.1f} / {1e3 * top[2]:.1f})"
                  if len(runs) > 1 else ""), flush=True)

    def one(k: int, profile: bool, check: bool) -> tuple:
        ids = [f"p{k}-{time.monotonic_ns()}-{j}" for j in range(k)]
        for j, rid in enumerate(ids):
            eng.add_request(prompt(a.prompt_len), params, f"a{half + j}", rid)
        eng.step()  # the device is busy with the step before, as in serving
        prof = cProfile.Profile() if profile else None
        tokens = sum(1 for r in eng.scheduler.running if r.request_id.startswith("d")) + k * a.prompt_len
        t = time.perf_counter()
        try:
            if check:
                torch.cuda.set_sync_debug_mode("error")
            if prof is not None:
                prof.enable()
            eng.step()
        except RuntimeError:
            print(f"K={k}: a synchronising call:\n{traceback.format_exc(limit=-8)}", flush=True)
        finally:
            if prof is not None:
                prof.disable()
            if check:
                torch.cuda.set_sync_debug_mode("default")
        wall = time.perf_counter() - t
        t2 = time.perf_counter()
        sync()
        tail = time.perf_counter() - t2
        host = eng.last_step_host_seconds
        eager = not graph[0]
        if prof is not None:
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(20)
            print(s.getvalue())
        for rid in ids:
            eng.abort_request(rid)
        for _ in range(2):
            eng.step()
        return wall, host, tail, tokens, eager

    for k in a.prompts:
        trial(k)
    if a.busy_thread:  # the same steps while a reader thread holds the GIL between its I/O
        import threading

        from loraplex import LoRARequest as _Req

        stop = threading.Event()
        req = _Req("busy", str(folders[0]))

        def read_loop() -> None:
            while not stop.is_set():
                eng.pool.read(req)

        reader = threading.Thread(target=read_loop, daemon=True)
        reader.start()
        default = sys.getswitchinterval()
        try:
            for interval in [default] + list(a.switch_interval):
                sys.setswitchinterval(interval)
                for k in a.prompts:
                    trial(k, f" beside a reading thread, switch interval {1e3 * interval:g} ms")
        finally:
            sys.setswitchinterval(default)
            stop.set()
            reader.join()
    if a.profile:
        trial(max(a.prompts), " under cProfile", profile=True)
    if a.sync_check and device == "cuda":
        trial(max(a.prompts), " under sync debug mode", check=True)
    llm.engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
