"""loraplex vs transformers + PEFT on CPU: one mixed-adapter batch, greedy, same weights.

Builds a small random Llama and a few PEFT adapters (different ranks and targets: attention only,
attention + embed_tokens + lm_head, all-linear with rsLoRA, MLP with a rank_pattern) under --out-dir,
then generates the same batch (random prompt ids, fixed seed; request i uses adapter i mod (N + 1),
where index N means no adapter) with:

  1. loraplex ``LLM.generate`` (one call, mixed adapters and base requests),
  2. PEFT ``generate(adapter_names=[...])`` on the base model with every adapter loaded,
  3. plain transformers on the base model (no adapters), as a reference line.

Each engine gets one small warm-up run, then the best of --repeat timed runs (taken round-robin over
the engines; every run's time goes to the JSON). Both adapter engines
suppress EOS for the whole generation (loraplex ``min_tokens`` = PEFT ``min_new_tokens`` = max tokens),
so greedy float32 tokens should agree request by request; the match count is reported.

    python benchmarks/cpu_vs_peft.py                    # defaults: 16 prompts x 64 tokens, 32 new
    python benchmarks/cpu_vs_peft.py --num-prompts 32 --repeat 3 --json bench_out/run.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]  # loraplex (repo root) and tests/helpers.py

import torch  # noqa: E402

from helpers import load_base_model, load_peft_model, make_adapter, make_tiny_model  # noqa: E402

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names
Prompts = list[list[int]]  # token ids per request (also the generated tokens)
Loras = list[Optional[str]]  # adapter name per request, None = base model
Runner = Callable[[Prompts, Loras, int], Prompts]  # (prompts, adapter per prompt, new tokens) -> generated tokens

# Adapter i uses spec i mod len(ADAPTER_SPECS) and seed i + 1: ranks 8/16/32/8 and different targets.
ADAPTER_SPECS: list[dict[str, Any]] = [
    dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens", "lm_head"]),
    dict(r=32, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    dict(r=8, lora_alpha=16, target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"],
         rank_pattern={"down_proj": 16, "layers.0.mlp.gate_proj": 4}),
]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="bench_out", help="where the model and adapters are built")
    p.add_argument("--json", default=None, help="result file (default: <out-dir>/cpu_vs_peft.json)")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--num-adapters", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=None, help="default: the helper tokenizer's size (~300)")
    p.add_argument("--init-scale", type=float, default=0.3, help="std of the random LoRA weights")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per engine; the best is reported")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.hidden_size % args.heads or args.heads % args.kv_heads:
        p.error("--hidden-size must be divisible by --heads, and --heads by --kv-heads")
    if min(args.num_prompts, args.prompt_len, args.max_tokens, args.repeat, args.num_adapters) < 1:
        p.error("--num-prompts, --prompt-len, --max-tokens, --repeat and --num-adapters must be >= 1")
    return args


def build(args: argparse.Namespace) -> tuple[str, dict[str, str]]:
    out = Path(args.out_dir)
    model_dir = make_tiny_model(
        out / "model", family="llama", seed=args.seed, vocab_size=args.vocab_size,
        hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden_size // args.heads,
        max_position_embeddings=max(256, args.prompt_len + args.max_tokens),
    )
    adapters = {}
    for i in range(args.num_adapters):
        name = f"a{i}"
        spec = ADAPTER_SPECS[i % len(ADAPTER_SPECS)]
        adapters[name] = make_adapter(model_dir, out / "adapters" / name, seed=args.seed + i + 1,
                                      init_scale=args.init_scale, **spec)
    return model_dir, adapters


def make_batch(args: argparse.Namespace, tokenizer_len: int, names: list[str]) -> tuple[Prompts, Loras]:
    """Random prompt ids (specials 0-2 excluded) and the adapter of each request (None = base)."""
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, tokenizer_len, (args.num_prompts, args.prompt_len), generator=gen).tolist()
    choices: Loras = list(names) + [None]
    return ids, [choices[i % len(choices)] for i in range(args.num_prompts)]


def loraplex_runner(args: argparse.Namespace, model_dir: str, adapters: dict[str, str], n_warm: int) -> Runner:
    from loraplex import LLM, LoRARequest, SamplingParams

    per_seq_blocks = (args.prompt_len + args.max_tokens) // 16 + 2
    llm = LLM(model=model_dir, dtype=args.dtype, device="cpu", seed=args.seed,
              max_loras=len(adapters), max_lora_rank=64, max_cpu_loras=max(16, len(adapters)),
              num_kv_blocks=per_seq_blocks * max(args.num_prompts, n_warm), block_size=16,
              max_num_seqs=max(64, args.num_prompts))
    reqs = {n: LoRARequest(n, p) for n, p in adapters.items()}

    def go(ps: Prompts, ls: Loras, n_new: int) -> Prompts:
        sp = SamplingParams(max_tokens=n_new, min_tokens=n_new, temperature=0.0, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], sp,
                            lora_request=[reqs[n] if n else None for n in ls], use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    return go


def hf_generate(model: Any, prompts: Prompts, n_new: int, pad_id: int, **kw: Any) -> Prompts:
    ids = torch.tensor(prompts)  # equal lengths: no padding, attention mask of ones
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                             min_new_tokens=n_new, do_sample=False, pad_token_id=pad_id, **kw)
    return out[:, ids.shape[1]:].tolist()


def peft_runner(args: argparse.Namespace, model_dir: str, adapters: dict[str, str], pad_id: int) -> Runner:
    model = load_peft_model(model_dir, adapters).to(getattr(torch, args.dtype))

    def go(ps: Prompts, ls: Loras, n_new: int) -> Prompts:
        return hf_generate(model, ps, n_new, pad_id, adapter_names=[n or BASE for n in ls])

    return go


def base_runner(args: argparse.Namespace, model_dir: str, pad_id: int) -> Runner:
    model = load_base_model(model_dir).to(getattr(torch, args.dtype))
    return lambda ps, ls, n_new: hf_generate(model, ps, n_new, pad_id)


def time_engines(runners: dict[str, Runner], prompts: Prompts, loras: Loras, n_new: int,
                 warm_prompts: Prompts, warm_loras: Loras, repeat: int) -> tuple[dict[str, list[float]],
                                                                                 dict[str, Prompts]]:
    """Warm each engine up (2 tokens, every adapter once), then time them round-robin.

    Round-robin rather than engine after engine: on a shared machine a burst of load then slows every engine
    in the same round instead of all runs of one engine, and the best of ``repeat`` stays comparable.
    """
    for go in runners.values():
        go(warm_prompts, warm_loras, 2)  # loraplex: loads every adapter into its slot
    runs: dict[str, list[float]] = {k: [] for k in runners}
    tokens: dict[str, Prompts] = {}
    for _ in range(repeat):
        for k, go in runners.items():
            t0 = time.perf_counter()
            tokens[k] = go(prompts, loras, n_new)
            runs[k].append(time.perf_counter() - t0)
    return runs, tokens


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _quiet() -> None:
    """Hide load/save progress bars and known-harmless warnings so the table stands out."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    _quiet()
    t_build = time.perf_counter()
    model_dir, adapters = build(args)
    import peft
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    names = list(adapters)
    prompts, loras = make_batch(args, len(tok), names)
    warm_prompts = [p[:8] for p in prompts[:len(names) + 1]]
    warm_loras: Loras = list(names) + [None]
    print(f"built model + {len(names)} adapters in {time.perf_counter() - t_build:.1f}s; "
          f"batch: {args.num_prompts} prompts x {args.prompt_len} tokens, {args.max_tokens} new, {args.dtype}, "
          f"{torch.get_num_threads()} threads", flush=True)

    runners = {
        "loraplex": loraplex_runner(args, model_dir, adapters, len(warm_prompts)),
        "peft": peft_runner(args, model_dir, adapters, tok.pad_token_id),
        "transformers_base": base_runner(args, model_dir, tok.pad_token_id),
    }
    runs, tokens = time_engines(runners, prompts, loras, args.max_tokens, warm_prompts, warm_loras, args.repeat)

    timings = {k: min(v) for k, v in runs.items()}
    n_gen = args.num_prompts * args.max_tokens
    tps = {k: n_gen / v for k, v in timings.items()}
    ratio = timings["loraplex"] / timings["peft"]
    matches = sum(a == b for a, b in zip(tokens["loraplex"], tokens["peft"]))
    # Greedy decoding continues from its own tokens, so after the first disagreement the rest differs too:
    # the mean agreeing prefix says how far the two engines stay together (e.g. in bfloat16).
    prefix = sum(_common_prefix(a, b) for a, b in zip(tokens["loraplex"], tokens["peft"])) / args.num_prompts
    base_idx = [i for i, n in enumerate(loras) if n is None]
    base_matches = sum(tokens["loraplex"][i] == tokens["transformers_base"][i] for i in base_idx)
    # Sanity: the adapters must actually change the output, or the match count proves nothing.
    lora_idx = [i for i, n in enumerate(loras) if n is not None]
    changed = sum(tokens["peft"][i] != tokens["transformers_base"][i] for i in lora_idx)

    labels = {"loraplex": "loraplex LLM.generate", "peft": "PEFT generate(adapter_names)",
              "transformers_base": "transformers base (no LoRA)"}
    print(f"\n{'engine':<30} {'seconds':>9} {'gen tok/s':>10}")
    for k in timings:
        print(f"{labels[k]:<30} {timings[k]:>9.3f} {tps[k]:>10.1f}")
    noisy = [k for k, v in runs.items() if max(v) > 2 * min(v)]
    if noisy:
        print(f"note: runs of {', '.join(noisy)} varied more than 2x (a busy machine?); see seconds_all_runs")
    print(f"\nloraplex/PEFT time ratio: {ratio:.2f}  "
          f"(below 1: loraplex is faster; its speed is {1 / ratio:.2f}x PEFT's)")
    print(f"identical sequences loraplex vs PEFT: {matches}/{args.num_prompts} "
          f"(mean agreeing prefix {prefix:.1f}/{args.max_tokens} tokens); "
          f"base requests vs plain transformers: {base_matches}/{len(base_idx)}; "
          f"adapter requests that differ from the base model: {changed}/{len(lora_idx)}")

    result = {
        "benchmark": "cpu_vs_peft",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "adapters": {n: ADAPTER_SPECS[i % len(ADAPTER_SPECS)] for i, n in enumerate(names)},
        "requests_per_adapter": {n or BASE: loras.count(n) for n in warm_loras},
        "generated_tokens": n_gen,
        "seconds": timings,
        "seconds_all_runs": runs,
        "tokens_per_s": tps,
        "ratio_loraplex_over_peft": ratio,
        "matching_sequences_loraplex_vs_peft": matches,
        "mean_agreeing_prefix_loraplex_vs_peft": prefix,
        "matching_base_sequences_loraplex_vs_transformers": base_matches,
        "num_base_requests": len(base_idx),
        "adapter_requests_differing_from_base": changed,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": {"processor": platform.processor(), "model_name": cpu_model_name(), "cpu_count": os.cpu_count(),
                "platform": platform.platform()},
    }
    json_path = Path(args.json) if args.json else Path(args.out_dir) / "cpu_vs_peft.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {json_path}")
    return result


if __name__ == "__main__":
    main()
