"""Host time of adapter slot loads (issue 13): what the engine thread spends in the pool's ``acquire`` for
an adapter that is in host memory but not in a device slot (choosing the slot, evicting, recording and
launching the copies), with and without slot plans (``lora/slot_plan.py``).

The model has the layer count of the chosen shape and small matrices unless ``--full`` (the host's work per
load depends on the number of wrapped layers and pages, not on their sizes). ``--adapters`` adapters of ranks
8 to 64 on ``--targets`` are staged (as the pool's reads do), then loaded round-robin into the rank-aware
slots of ``max_loras`` adapters of rank 64, so that nearly every acquire evicts. Each acquire is released at
once; on CUDA the copies run (the host does not wait for them), on a CPU they are skipped (``--stub-copies``,
the default there: the kernels would run in Triton's interpreter).

    python benchmarks/slot_load_host.py                 # CPU, the Llama-3-8B layer count, q/v adapters
    python benchmarks/slot_load_host.py --device cuda --full
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT.parent / "tests"))

RANKS = (8, 16, 32, 64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--full", action="store_true", help="the Llama-3-8B matrices (else hidden 256)")
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    p.add_argument("--adapters", type=int, default=160)
    p.add_argument("--loads", type=int, default=400, help="acquires after the first round, per mode")
    p.add_argument("--max-loras", type=int, default=32)
    p.add_argument("--stub-copies", action=argparse.BooleanOptionalAction, default=None,
                   help="skip the copy launches (default: on a CPU)")
    p.add_argument("--read-threads", type=int, nargs="*", default=[1, 2],
                   help="also time re-reads of the adapters (as after host eviction: no hash) on these many threads "
                        "each, wall time over reads (do reads run side by side? On an H200 host four threads in the server lost)")
    p.add_argument("--out-dir", default="bench_out/slot_load_host")
    p.add_argument("--json", default="bench_out/slot_load_host.json")
    a = p.parse_args()
    if a.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    from safetensors.torch import save_file

    from gpu_lora_throughput import adapter_tensors, build_model_folder, write_adapter_config
    from loraplex import LLM, LoRARequest
    from loraplex.kernels import slot_write

    shape = SimpleNamespace(hidden=4096 if a.full else 256, intermediate=14336 if a.full else 512, layers=a.layers,
                            heads=32 if a.full else 8, kv_heads=8 if a.full else 2, vocab=128256 if a.full else 512,
                            dtype="bfloat16" if a.device == "cuda" else "float32")
    out = Path(a.out_dir)
    model = build_model_folder(out, shape)
    folders = []
    for i in range(a.adapters):
        r = RANKS[i % len(RANKS)]
        folder = out / f"adapter{i}"
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "adapter_model.safetensors").exists():
            save_file(adapter_tensors(shape, r, a.targets, seed=i, dtype=getattr(torch, shape.dtype)),
                      str(folder / "adapter_model.safetensors"))
            write_adapter_config(folder, r, a.targets)
        folders.append(folder)
    stub = a.stub_copies if a.stub_copies is not None else a.device == "cpu"
    if stub:
        slot_write.copy_pieces = lambda *args, **kw: []
        slot_write.write_words = lambda *args, **kw: []
    rows = {}
    for mode in ("plans", "set_lora"):
        os.environ["LORAPLEX_SLOT_PLANS"] = "1" if mode == "plans" else "0"
        llm = LLM(str(model), load_format="dummy", dtype=shape.dtype, device=a.device, max_loras=a.max_loras,
                  max_lora_rank=max(RANKS), max_cpu_loras=a.adapters, enable_prefix_caching=False, seed=0,
                  max_model_len=64, lora_backend="triton", num_kv_blocks=16)
        pool = llm.engine.pool
        adapters = []
        t0 = time.perf_counter()
        for i, f in enumerate(folders):
            req = LoRARequest(f"a{i}", str(f))
            adapters.append(pool.register(req, adapter=pool.read(req)))
        read_s = (time.perf_counter() - t0) / len(folders)
        times = []
        for k in range(a.loads + len(adapters)):
            adapter = adapters[k % len(adapters)]
            loads = pool.num_slot_loads
            t = time.perf_counter()
            slot = pool.acquire(adapter)
            dt = time.perf_counter() - t
            if pool.num_slot_loads > loads and k >= len(adapters):  # a load (and its evictions), past the first round
                times.append(dt)
            if slot is None:  # its copy is in flight (CUDA): the next round finds it
                pool.poll()
                continue
            pool.release(slot)
            if a.device == "cuda" and k % 64 == 0:
                torch.cuda.synchronize()
                pool.poll()
        times.sort()
        if not times:
            sys.exit(f"no acquire loaded an adapter after the first round: {a.adapters} adapters fit in the slots of "
                     f"max_loras={a.max_loras} (rank-aware pages hold more adapters of lower rank); pass more "
                     "--adapters or a smaller --max-loras")
        rows[mode] = {"acquires": len(times), "mean_ms": 1e3 * sum(times) / len(times),
                      "p50_ms": 1e3 * times[len(times) // 2], "p99_ms": 1e3 * times[min(len(times) - 1, int(len(times) * 0.99))],
                      "read_and_stage_ms": 1e3 * read_s, "slot_loads": pool.num_slot_loads}
        print(f"{mode:>9}: acquire that loads: mean {rows[mode]['mean_ms']:.3f} ms  p50 {rows[mode]['p50_ms']:.3f}  "
              f"p99 {rows[mode]['p99_ms']:.3f}  ({len(times)} timed, {pool.num_slot_loads} slot loads in all; "
              f"read and stage {rows[mode]['read_and_stage_ms']:.1f} ms an adapter)", flush=True)
        if mode == "plans" and a.read_threads:  # re-reads side by side, as the server's read threads run them
            from concurrent.futures import ThreadPoolExecutor

            rows["rereads"] = []  # (threads, ms an adapter), in the order run
            for threads in a.read_threads:
                t = time.perf_counter()
                with ThreadPoolExecutor(threads) as ex:
                    list(ex.map(pool.read_current, [ad.name for ad in adapters]))
                ms = 1e3 * (time.perf_counter() - t) / len(adapters)
                rows["rereads"].append((threads, ms))
                print(f"re-reads on {threads} thread(s): {ms:.2f} ms an adapter (wall time over reads)", flush=True)
        del llm, pool, adapters
    print(f"plans / set_lora: {rows['plans']['mean_ms'] / rows['set_lora']['mean_ms']:.2f} of the host time")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    info = {"device": a.device, "layers": a.layers, "full": a.full, "targets": a.targets, "adapters": a.adapters,
            "stub_copies": stub, "rows": rows}
    if a.device == "cuda":
        info["card"] = torch.cuda.get_device_name()
    Path(a.json).write_text(json.dumps(info, indent=1))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
