"""``loraplex demo``: the embedded model and its adapters, every prompt through each of them in one batch."""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path
from typing import Optional, TextIO

from loraplex.demo import ADAPTER_SPECS, MODEL_DIR, adapter_paths
from loraplex.demo.text import rot13

# Held-out prompts on which every adapter shows its behaviour (the swap adapter needs a swapped word in play).
DEFAULT_PROMPTS = ("A lawyer is a person who", "Every night the machine", "In the old days, the computer")


def add_demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", action="append", metavar="TEXT",
                        help="prompt text (repeatable; default: three built-in prompts)")
    parser.add_argument("--adapter", action="append", choices=[s.name for s in ADAPTER_SPECS], metavar="NAME",
                        help="run only these adapters, besides the base model (repeatable; default: all)")
    parser.add_argument("--max-tokens", type=int, default=24, help="new tokens per request (default: 24)")
    parser.add_argument("--width", type=int, default=60, help="wrap outputs at this many characters (default: 60)")


def _row(cells: list[str], widths: list[int]) -> str:
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"


def print_table(rows: list[tuple[str, str, str]], width: int, out: TextIO) -> None:
    """A plain-text table (adapter, prompt, output); long prompts and outputs wrap inside their cell."""
    wrapped = [[textwrap.wrap(c, width) or [""] for c in r] for r in rows]
    header = ["adapter", "prompt", "output"]
    widths = [max([len(header[i])] + [len(line) for r in wrapped for line in r[i]]) for i in range(3)]
    rule = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    print(rule, file=out)
    print(_row(header, widths), file=out)
    print(rule.replace("-", "="), file=out)
    for cells in wrapped:
        for i in range(max(len(c) for c in cells)):
            print(_row([c[i] if i < len(c) else "" for c in cells], widths), file=out)
        print(rule, file=out)


def cmd_demo(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    from loraplex import LLM, LoRARequest, SamplingParams
    from loraplex.cli import engine_kwargs

    out = out or sys.stdout
    if not (MODEL_DIR / "model.safetensors").exists():
        print(f"loraplex: error: the demo model is missing from {MODEL_DIR} "
              "(rebuild it with: python -m loraplex.demo.train)", file=sys.stderr)
        return 2
    specs = [s for s in ADAPTER_SPECS if not args.adapter or s.name in args.adapter]
    paths: dict[str, Path] = adapter_paths()
    llm = LLM(str(MODEL_DIR), **engine_kwargs(args))
    for spec in specs:
        llm.add_lora(LoRARequest(spec.name, str(paths[spec.name])))
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    jobs: list[tuple[Optional[str], str]] = [(a, p) for a in [None] + [s.name for s in specs] for p in prompts]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    t0 = time.perf_counter()
    outs = llm.generate([p for _, p in jobs], params, lora_request=[a for a, _ in jobs], use_tqdm=False)
    seconds = time.perf_counter() - t0

    print(f"loraplex demo: a {_describe(MODEL_DIR)} trained on public-domain text, and {len(specs)} LoRA "
          "adapters:", file=out)
    for spec in specs:
        print(f"  {spec.name:<6} rank {spec.rank:<2} on {', '.join(spec.targets)}: {spec.description}", file=out)
    rows = [(a or "base", p, " ".join(o.outputs[0].text.split())) for (a, p), o in zip(jobs, outs)]
    print_table(rows, args.width, out)
    decoded = [(p, rot13(text)) for a, p, text in rows if a == "rot13"]
    for prompt, text in decoded:
        print(f"rot13 decoded: {prompt!r} -> {text!r}", file=out)
    ntok = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"{len(outs)} requests ({len(specs)} adapters + base) in one generate call: {ntok} tokens in "
          f"{seconds:.2f} s, {ntok / seconds:.0f} tokens/s", file=out)
    return 0


def _describe(model_dir: Path) -> str:
    import json

    cfg = json.loads((model_dir / "config.json").read_text())
    return (f"{cfg['num_hidden_layers']}-layer Llama (hidden {cfg['hidden_size']}, "
            f"vocabulary {cfg['vocab_size']})")
