"""Command line: ``loraplex generate``, ``loraplex serve``.

Engine flags are generated from the config dataclasses, so every ``LLM(**kwargs)``
setting is also a flag (``max_loras`` -> ``--max-loras``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any, Optional, Sequence

from loraplex.config import ModelConfig, config_fields


def _flag_type(f: dataclasses.Field) -> Any:
    default = f.default
    if isinstance(default, bool):
        return None
    if isinstance(default, (int, float, str)):
        return type(default)
    ann = str(f.type)
    if "bool" in ann:  # Optional[bool]: --flag / --no-flag, absent: None
        return None
    if "int" in ann:
        return int
    if "float" in ann:
        return float
    return str


def field_help(f: dataclasses.Field) -> str:
    """A config field's flag help: its documentation, then its default and environment variable.

    The default is left to argparse (``%(default)s``) so ``set_defaults`` on a subcommand shows in it."""
    doc = f.metadata.get("help", "").replace("%", "%%")
    env = f.metadata.get("env")
    return f"{doc} (default: %(default)s" + (f"; env: {env})" if env else ")")


def _add_field(group: Any, f: dataclasses.Field) -> None:
    flag = "--" + f.name.replace("_", "-")
    kind = _flag_type(f)
    default = None if f.default is dataclasses.MISSING else f.default
    if kind is None:
        action = group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default)
    else:
        action = group.add_argument(flag, dest=f.name, type=kind, default=default)
    action.help = field_help(f)  # set afterwards: Python 3.10's BooleanOptionalAction appends its own default


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """One flag per field of a config dataclass (``lora_root`` -> ``--lora-root``)."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        _add_field(group, f)


def add_engine_args(parser: argparse.ArgumentParser, skip: Sequence[str] = ("model",)) -> None:
    group = parser.add_argument_group("engine")
    for _, f in config_fields():
        if f.name in skip:
            continue
        _add_field(group, f)


def engine_kwargs(args: argparse.Namespace, skip: Sequence[str] = ("model",)) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for _, f in config_fields() if f.name not in skip}


def _parse_lora(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora takes NAME=PATH, got {spec!r}")
    return name, path


def cmd_generate(args: argparse.Namespace) -> int:
    from loraplex import LLM, LoRARequest, SamplingParams

    llm = LLM(args.model, **engine_kwargs(args))
    for name, path in args.lora:
        llm.add_lora(LoRARequest(name, path))
    adapters: list[Optional[str]] = [args.adapter] if args.adapter else [None] + [n for n, _ in args.lora]
    prompts = args.prompt or ["Hello"]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sampling_seed)
    jobs = [(a, p) for a in adapters for p in prompts]
    t0 = time.perf_counter()
    outs = llm.generate([p for _, p in jobs], params, lora_request=[a for a, _ in jobs], use_tqdm=False)
    dt = time.perf_counter() - t0
    ntok = 0
    for (adapter, prompt), out in zip(jobs, outs):
        ntok += len(out.outputs[0].token_ids)
        print(f"[{adapter or 'base'}] {prompt!r} -> {out.outputs[0].text!r}")
    print(f"{len(outs)} requests, {ntok} tokens in {dt:.2f} s ({ntok / dt:.1f} tokens/s)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="Serve one base LLM with many LoRA adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text with a model and its adapters",
                         description="Run prompts through the base model and adapters in one batch.")
    gen.add_argument("--model", required=True, help=ModelConfig.__dataclass_fields__["model"].metadata["help"])
    gen.add_argument("--lora", type=_parse_lora, action="append", default=[], metavar="NAME=PATH",
                     help="register a PEFT adapter folder (repeatable)")
    gen.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    gen.add_argument("--adapter", help="run the prompts with this adapter only (default: base and every --lora)")
    gen.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (default: %(default)s)")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="sampling temperature; 0 is greedy (default: %(default)s)")
    gen.add_argument("--top-p", type=float, default=1.0,
                     help="nucleus sampling: smallest set of tokens whose probability reaches P (default: %(default)s)")
    gen.add_argument("--top-k", type=int, default=-1,
                     help="sample among the K most likely tokens; -1 for all (default: %(default)s)")
    gen.add_argument("--sampling-seed", type=int, default=None,
                     help="per-request sampling seed (default: None: the engine's --seed stream)")
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    from loraplex.server.cli import add_serve_parser

    add_serve_parser(sub, add_dataclass_args, add_engine_args, _parse_lora)

    from loraplex.demo.run import add_demo_args, cmd_demo  # light: no torch until the command runs

    demo = sub.add_parser("demo", help="run the embedded model and its adapters (no download)",
                          description="Run prompts through the embedded demo model and each of its LoRA "
                                      "adapters in one batch, and print a table.")
    add_demo_args(demo)
    add_engine_args(demo)
    demo.set_defaults(func=cmd_demo, dtype="float32")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from loraplex.errors import LoraplexError

    try:
        return args.func(args)
    except (LoraplexError, ValueError) as e:
        print(f"loraplex: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
