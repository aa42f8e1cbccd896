"""``loraplex serve MODEL``: the OpenAI-compatible server.

Flags come from :class:`ServerConfig` and the engine's config dataclasses. The
server binds to 127.0.0.1 unless told otherwise. SIGTERM (or Ctrl-C) stops
accepting connections, lets requests in flight finish for up to
``--timeout-graceful-shutdown`` seconds (then aborts them), and exits 0. The API key
may also come from the ``LORAPLEX_API_KEY`` environment variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
from typing import Any

from loraplex.config import EngineConfig, ServerConfig


def add_serve_parser(sub: Any, add_dataclass_args: Any, add_engine_args: Any, parse_lora: Any) -> None:
    p = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                       description="Serve a model and its LoRA adapters over an OpenAI-compatible HTTP API.")
    p.add_argument("model", help="Hugging Face model folder")
    p.add_argument("--lora", type=parse_lora, action="append", default=[], metavar="NAME=PATH",
                   help="register a PEFT adapter folder at start-up (repeatable)")
    add_dataclass_args(p, ServerConfig, "server")
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from loraplex.cli import engine_kwargs
    from loraplex.engine.engine import LLMEngine
    from loraplex.server.api import build_app, wrap
    from loraplex.server.async_engine import AsyncLLMEngine
    from loraplex.types import LoRARequest

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)}
    if values["api_key"] is None:  # keeps the key out of the process list
        values["api_key"] = os.environ.get("LORAPLEX_API_KEY") or None
    cfg = ServerConfig(**values)
    logging.basicConfig(level=getattr(logging, cfg.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = LLMEngine(EngineConfig.from_kwargs(model=args.model, **engine_kwargs(args)))
    for name, path in args.lora:
        engine.add_lora(LoRARequest(name, path))
    async_engine = AsyncLLMEngine(engine)
    app = build_app(async_engine, cfg, args.model)
    # uvicorn handles SIGTERM/SIGINT while serving (graceful shutdown), then restores the
    # previous handlers and raises the signal again; make those handlers no-ops so a
    # graceful stop ends with exit status 0 instead of death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(wrap(app, cfg), host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                timeout_graceful_shutdown=cfg.timeout_graceful_shutdown or None, lifespan="on")
    return 0
