"""``loraplex serve MODEL``: the OpenAI-compatible server.

Two processes: this one (HTTP: parse, validate, tokenise, stream) and the engine process it
spawns (model, scheduler, steps). Flags come from :class:`ServerConfig` and the engine's config
dataclasses. The server binds to 127.0.0.1 unless told otherwise. SIGTERM (or Ctrl-C) stops
accepting connections, lets requests in flight finish for up to ``--timeout-graceful-shutdown``
seconds (then cuts them: streams get an error event), and exits 0. If the engine process dies,
the server answers 503 and exits 1. The API key may also come from ``LORAPLEX_API_KEY``.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import logging
import signal
from typing import Any

from loraplex import envs
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
    from loraplex.cli import engine_kwargs
    from loraplex.multimodal.chat import load_chat_template
    from loraplex.server.api import HTTPServer, build_app
    from loraplex.server.engine_client import EngineClient
    from loraplex.tokenizer import load_tokenizer

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)}
    if values["api_key"] is None:  # keeps the key out of the process list
        values["api_key"] = envs.LORAPLEX_API_KEY
    cfg = ServerConfig(**values)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID` prints every thread's stack
    logging.basicConfig(level=getattr(logging, cfg.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kwargs = engine_kwargs(args)
    config = EngineConfig.from_kwargs(model=args.model, **kwargs)
    chat_template = load_chat_template(cfg.chat_template) if cfg.chat_template else None
    tokenizer = load_tokenizer(config.model_config.tokenizer or args.model)
    client = EngineClient.start(config, args.lora, cfg.log_level)  # the model is built in the engine process
    server = HTTPServer(build_app(client, cfg, args.model, tokenizer, chat_template), cfg, log_level=cfg.log_level)
    # uvicorn handles SIGTERM/SIGINT while serving (graceful shutdown), then restores the
    # previous handlers and raises the signal again; make those handlers no-ops so a
    # graceful stop ends with exit status 0 instead of death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    finally:
        if client.is_running:
            client.shutdown()
    if server.engine_died:
        logging.getLogger("loraplex.server").error("stopped because the engine process died: %s", client.dead)
        return 1
    return 0

