"""Throughput cost of serving adapters on a GPU: one batch, base model vs adapters.

Builds a Llama-shaped model with random weights (``load_format="dummy"``, no checkpoint) and
random rank-r PEFT adapters on all seven projections, then generates the same batch with
every request on the base model, all on one shared adapter, spread over 4 adapters, and on
``batch`` distinct adapters. Prints tokens/s per case and the ratio to the base case, and
writes JSON. Run on a CUDA machine:

    python benchmarks/gpu_lora_throughput.py --layers 8 --json bench_out/gpu_lora.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model_folder(out: Path, a: argparse.Namespace) -> Path:
    from transformers import LlamaConfig

    from helpers import make_tokenizer

    folder = out / "model"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
                      max_position_embeddings=8192, architectures=["LlamaForCausalLM"], dtype=a.dtype)
    cfg.save_pretrained(folder)
    make_tokenizer(folder)
    return folder


def build_adapter(out: Path, a: argparse.Namespace, seed: int) -> Path:
    """A random PEFT adapter folder of the shape ``a``, reused when ``out`` already holds one of that shape and
    seed (the stamp is written last, so an interrupted write is made again): an 8B-shaped adapter is 168 MB of
    float32, and a GPU run of several benchmarks would otherwise make its 32 each time."""
    folder = out / f"adapter{seed}"
    stamp = folder / "bench_shape.json"
    shape = json.dumps({"hidden": a.hidden, "intermediate": a.intermediate, "layers": a.layers, "heads": a.heads,
                        "kv_heads": a.kv_heads, "rank": a.rank, "targets": TARGETS, "seed": seed}, sort_keys=True)
    if stamp.exists() and stamp.read_text() == shape:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    save_file(adapter_tensors(a, a.rank, TARGETS, seed), str(folder / "adapter_model.safetensors"))
    write_adapter_config(folder, a.rank, TARGETS)
    stamp.write_text(shape)
    return folder


def adapter_tensors(a: argparse.Namespace, rank: int, targets: list[str], seed: int,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random PEFT LoRA tensors of ``rank`` on ``targets`` of every layer of the Llama shape ``a``."""
    kv = a.kv_heads * (a.hidden // a.heads)
    shapes = {"q_proj": (a.hidden, a.hidden), "k_proj": (a.hidden, kv), "v_proj": (a.hidden, kv),
              "o_proj": (a.hidden, a.hidden), "gate_proj": (a.hidden, a.intermediate),
              "up_proj": (a.hidden, a.intermediate), "down_proj": (a.intermediate, a.hidden)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(a.layers):
        for t in targets:
            sub = "self_attn" if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{layer}.{sub}.{t}"
            fin, fout = shapes[t]
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, fin, generator=g) * 0.01).to(dtype)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(fout, rank, generator=g) * 0.01).to(dtype)
    return tensors


def write_adapter_config(folder: Path, rank: int, targets: list[str]) -> None:
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets,
        "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out-dir", default="bench_out/gpu_lora")
    ap.add_argument("--json", default="bench_out/gpu_lora.json")
    ap.add_argument("--lora-backend", default="torch", help="torch, triton or auto")
    a = ap.parse_args()

    from loraplex import LLM, LoRARequest, SamplingParams

    out = Path(a.out_dir)
    model = build_model_folder(out, a)
    adapters = [build_adapter(out, a, i) for i in range(a.batch)]
    llm = LLM(str(model), dtype=a.dtype, load_format="dummy", max_loras=a.batch, max_lora_rank=a.rank,
              max_num_seqs=a.batch, max_model_len=a.prompt_len + a.max_tokens + 8, seed=0,
              lora_backend=a.lora_backend)
    for i, p in enumerate(adapters):
        llm.add_lora(LoRARequest(f"a{i}", str(p)))
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(3, 250, (a.prompt_len,), generator=g).tolist()}
               for _ in range(a.batch)]
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True)
    cases = {
        "base": [None] * a.batch,
        "1 adapter": ["a0"] * a.batch,
        "4 adapters": [f"a{i % 4}" for i in range(a.batch)],
        f"{a.batch} distinct": [f"a{i}" for i in range(a.batch)],
    }
    for loras in cases.values():  # warm-up: every slot loaded once, allocator and kernels warm
        llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True), lora_request=loras, use_tqdm=False)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    results = {}
    for name, loras in cases.items():
        times = []
        for _ in range(a.repeat):
            sync()
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
            sync()
            times.append(time.perf_counter() - t0)
            assert all(len(o.outputs[0].token_ids) == a.max_tokens for o in outs)
        best = min(times)
        results[name] = {"seconds": best, "tokens_per_s": a.batch * a.max_tokens / best, "runs": times}
    base = results["base"]["tokens_per_s"]
    print(f"{'case':<14}{'seconds':>10}{'gen tok/s':>12}{'vs base':>10}")
    for name, r in results.items():
        r["ratio_to_base"] = r["tokens_per_s"] / base
        print(f"{name:<14}{r['seconds']:>10.3f}{r['tokens_per_s']:>12.1f}{r['ratio_to_base']:>10.2f}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({
        "config": vars(a), "results": results, "device": device,
        "torch": torch.__version__, "platform": platform.platform(), "date": time.strftime("%Y-%m-%d"),
    }, indent=2))
    print(f"wrote {a.json} ({device})")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
