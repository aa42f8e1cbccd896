"""A real loraplex server on a loopback port for tests: uvicorn in a thread of the test process,
the engine in its own process (as ``loraplex serve`` runs them)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Optional

import httpx
import openai

from loraplex.config import EngineConfig, ServerConfig
from loraplex.server.api import HTTPServer, build_app
from loraplex.server.engine_client import EngineClient
from loraplex.tokenizer import load_tokenizer

ENGINE_KW = dict(dtype="float32", device="cpu", max_model_len=256, num_kv_blocks=256, block_size=8,
                 max_loras=2, max_lora_rank=16, max_num_seqs=8)
PROMPT = "Once upon a time there was"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real server on a loopback port: the HTTP side (uvicorn) in a thread of the test process,
    the engine in its own process, as ``loraplex serve`` runs them."""

    def __init__(self, model_dir: str, loras: dict[str, str], engine_kw: Optional[dict] = None, **cfg) -> None:
        self.port = free_port()
        cfg.setdefault("served_model_name", "tiny")
        self.cfg = ServerConfig(port=self.port, **cfg)
        config = EngineConfig.from_kwargs(model=model_dir, **(engine_kw or ENGINE_KW))
        self.engine = EngineClient.start(config, list(loras.items()), "warning")
        self.app = build_app(self.engine, self.cfg, model_dir, load_tokenizer(model_dir))
        self.server = HTTPServer(self.app, self.cfg, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def sse_events(resp: httpx.Response) -> list:
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def serve_cli(model_dir: str, qv: str, *extra: str) -> tuple[subprocess.Popen, str]:
    """``loraplex serve`` as users start it (a subprocess, adapter ``qv``), once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "loraplex.cli", "serve", model_dir, "--port", str(port), "--device", "cpu",
           "--dtype", "float32", "--max-model-len", "256", "--lora", f"qv={qv}", "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "server did not come up"
        time.sleep(0.2)
