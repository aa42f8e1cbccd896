"""The server against offline generation: the same K requests through ``loraplex serve`` and ``LLM.generate``.

In one run:

1. builds (or reuses, under --out-dir) a Llama-shaped model folder, with random weights loaded as
   ``load_format="dummy"``, and --num-adapters random rank-r PEFT adapters on all seven projections
   (``gpu_lora_throughput.build_model_folder`` / ``build_adapter``). The small test tokenizer is widened
   to the model's vocabulary with placeholder tokens (`` w12345``), so every sampled id decodes to text
   and the server streams one chunk per token, as it would for a real model;
2. starts ``python -m loraplex.cli serve`` on a free loopback port (plus any --server-arg), waits for
   /health, sends a warm-up burst (--concurrency requests at once: prompts of the same length, other words,
   8 tokens each, every adapter), and runs ``serve_load.py --url ... --num-requests K`` against it:
   --concurrency streaming clients share one fixed list of K requests (seeded prompts of --prompt-words
   words, adapters by --mix, temperature 0, ``ignore_eos``, --max-tokens each), tokens counted from the
   usage chunks;
3. from the server's /metrics before and after the load (serve_load reads them around the load, after its
   warm-up): engine steps, their summed time, generated tokens and finished requests by reason, hence
   tokens per engine step and the share of the load's wall time the engine was busy; and (serve_load
   ``--server-pid``) the CPU time of the HTTP process, the engine process and the load generator over the
   load, as shares of one core (near 1.0: a process that one core, the GIL, bounds);
4. sends SIGTERM and records the server's exit status;
5. then, with the device free, builds ``LLM`` with exactly the engine arguments the server parsed, registers
   the same adapters, warms up the same way (one short request per model, as serve_load does, then the
   same burst in one ``generate``), and times one ``generate`` of the same K requests end to end, with its
   engine steps, their mean wall and host time, as the server's metrics give them;
6. prints a table (server: completed, errors, output tokens/s, TTFT and ITL p50/p99, tokens per step,
   clients; offline: tokens/s; the ratio server/offline) and writes JSON.

The weights need not match between the two runs: with ``ignore_eos`` every request makes exactly
--max-tokens tokens. The exit status is 0 when every request completed, the server exited 0 and both
sides counted the same tokens; the ratio is reported, not judged.

On an H200 (issue 8):

    python benchmarks/serve_vs_offline.py --preset llama3-8b --concurrency 64 --num-requests 256 --max-tokens 128

On CPU, end to end in under a minute:

    python benchmarks/serve_vs_offline.py --preset tiny --concurrency 8 --num-requests 32 --max-tokens 16

On a machine with few cores the server's two processes and the load generator share them, so other jobs
on the machine slow the server side far more than the offline side: compare runs on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import httpx  # noqa: E402

import serve_load  # noqa: E402

# Model shapes. prompt_words: about 128 prompt tokens with the widened test tokenizer for llama3-8b.
PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256,
                      dtype="bfloat16", device="auto", prompt_words=34),
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=384, dtype="float32",
                 device="cpu", prompt_words=6),
}
SHAPE_KEYS = ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "dtype")
BASE_NAME = "base"  # --served-model-name of the spawned server
WARMUP_TOKENS = 8  # output tokens of each warm-up burst request


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    p.add_argument("--layers", type=int, help="override the preset's number of layers")
    p.add_argument("--dtype", help="override the preset's dtype (llama3-8b: bfloat16, tiny: float32)")
    p.add_argument("--device", help="override the preset's device (llama3-8b: auto, tiny: cpu)")
    p.add_argument("--num-adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--mix", default="uniform", choices=serve_load.MIXES, help="adapter mix (see serve_load.py)")
    p.add_argument("--concurrency", type=int, default=64, help="concurrent streaming clients")
    p.add_argument("--num-requests", type=int, default=256, help="requests, the same on both sides")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens of every request (ignore_eos)")
    p.add_argument("--prompt-words", type=int, help="words per prompt (default: the preset's; llama3-8b: 34, "
                                                    "about 128 tokens)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-loras", type=int, help="device adapter slots (default: --num-adapters)")
    p.add_argument("--max-model-len", type=int, help="default: the longest prompt plus --max-tokens, rounded up "
                                                     "to a multiple of 256")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `loraplex serve` (repeatable, e.g. --server-arg=--lora-backend=triton); "
                        "engine flags among them apply to the offline run too")
    p.add_argument("--health-timeout", type=float, default=900.0, help="seconds to wait for the server's /health")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before one request is an error")
    p.add_argument("--out-dir", default="bench_out/serve_vs_offline", help="model, adapters, server log")
    p.add_argument("--json", default="bench_out/serve_vs_offline.json")
    a = p.parse_args(argv)
    if min(a.num_adapters, a.rank, a.concurrency, a.num_requests, a.max_tokens, a.max_num_seqs) < 1:
        p.error("--num-adapters, --rank, --concurrency, --num-requests, --max-tokens and --max-num-seqs must be >= 1")
    preset = PRESETS[a.preset]
    a.shape = {k: preset[k] for k in SHAPE_KEYS} | {k: v for k, v in (("layers", a.layers), ("dtype", a.dtype))
                                                      if v is not None}
    a.device = a.device or preset["device"]
    a.prompt_words = a.prompt_words or preset["prompt_words"]
    a.max_loras = a.max_loras or a.num_adapters
    a.out_dir = str(Path(a.out_dir).resolve())  # the subprocesses run in the repository root
    return a


# ---- model and adapters ------------------------------------------------------------------------
def widen_tokenizer(folder: Path, vocab: int) -> None:
    """Give every id below ``vocab`` a token in the folder's byte-level BPE tokenizer: ids it lacks become
    placeholder tokens ``Ġw<id>`` (decoded " w<id>"), reachable by decoding only."""
    path = folder / "tokenizer.json"
    tok = json.loads(path.read_text())
    table = tok["model"]["vocab"]
    taken = set(table.values()) | {t["id"] for t in tok.get("added_tokens", [])}
    for i in range(vocab):
        if i not in taken:
            name = f"\u0120w{i}"
            if name in table:
                raise RuntimeError(f"{path}: placeholder token {name!r} for id {i} is already in the vocabulary")
            table[name] = i
    path.write_text(json.dumps(tok, ensure_ascii=False))


def build_assets(a: argparse.Namespace) -> tuple[Path, dict[str, Path]]:
    """The model folder and the adapters, rebuilt unless --out-dir holds ones built with the same settings."""
    from gpu_lora_throughput import build_adapter, build_model_folder

    out = Path(a.out_dir).resolve()
    spec = {"shape": a.shape, "rank": a.rank, "num_adapters": a.num_adapters, "tokenizer": "widened"}
    stamp = out / "build.json"
    model, adapters = out / "model", {f"a{i}": out / f"adapter{i}" for i in range(a.num_adapters)}
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        print(f"reusing the model and {a.num_adapters} adapters under {out}", file=sys.stderr)
        return model, adapters
    t = time.perf_counter()
    stamp.unlink(missing_ok=True)
    ns = SimpleNamespace(**a.shape, rank=a.rank)
    model = build_model_folder(out, ns)
    widen_tokenizer(model, a.shape["vocab"])
    for i in range(a.num_adapters):
        build_adapter(out, ns, i)
    stamp.write_text(json.dumps(spec, indent=2) + "\n")
    print(f"built the model and {a.num_adapters} adapters under {out} in {time.perf_counter() - t:.1f} s",
          file=sys.stderr)
    return model, adapters


def default_max_model_len(model: Path, prompts: list[str], max_tokens: int) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    longest = max(len(tok(p)["input_ids"]) for p in prompts)
    return 256 * math.ceil((longest + max_tokens) / 256)


# ---- the server --------------------------------------------------------------------------------
def server_command(a: argparse.Namespace, model: Path, adapters: dict[str, Path], port: int,
                   max_model_len: int) -> list[str]:
    return [sys.executable, "-m", "loraplex.cli", "serve", str(model),
            *[f"--lora={n}={p}" for n, p in adapters.items()],
            "--load-format=dummy", f"--dtype={a.shape['dtype']}", f"--device={a.device}", f"--seed={a.seed}",
            f"--max-num-seqs={a.max_num_seqs}", f"--max-loras={a.max_loras}", f"--max-lora-rank={a.rank}",
            f"--max-model-len={max_model_len}", "--host=127.0.0.1", f"--port={port}",
            f"--served-model-name={BASE_NAME}", "--log-level=warning", *a.server_arg]


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before /health answered")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not answer /health within {timeout:g} s")


def stop(proc: subprocess.Popen, timeout: float = 120.0) -> Optional[int]:
    """SIGTERM and wait; the exit status, or None when it had to be killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None
    return proc.returncode


def warmup_burst(a: argparse.Namespace, models: list[str]) -> list[tuple[str, str]]:
    """(model, prompt) of the warm-up burst: --concurrency requests on prompts as long as the timed ones but
    of other words (no prefix-cache hits later), cycling over ``models``, so that both sides have run
    full-size prefill and decode batches with every adapter resident before the clock starts."""
    prompts = serve_load.make_prompts(a.concurrency, a.seed + 1_000_003, a.prompt_words)
    return [(models[i % len(models)], p) for i, p in enumerate(prompts)]


async def send_burst(url: str, burst: list[tuple[str, str]], timeout: float) -> None:
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=len(burst))) as http:
        answers = await asyncio.gather(*(http.post(url + "/v1/completions", json={
            "model": m, "prompt": p, "max_tokens": WARMUP_TOKENS, "temperature": 0.0, "ignore_eos": True})
            for m, p in burst))
    for r in answers:
        if r.status_code != 200:
            raise RuntimeError(f"warm-up request refused: HTTP {r.status_code}: {r.text[:300]}")


def trace_rows(path: Path, window: Optional[list[float]] = None) -> list[dict]:
    """The rows of a LORAPLEX_STEP_TRACE file, in order: the steps that started inside ``window`` (Unix seconds)
    if given, all of them otherwise; none if the file is missing."""
    if not path.exists():
        return []
    rows = (json.loads(line) for line in path.read_text().splitlines())
    return [r for r in rows if window is None or window[0] <= r["unix_s"] <= window[1]]


def _p99(ascending: list[float]) -> float:
    return ascending[min(len(ascending) - 1, int(0.99 * len(ascending)))]


def step_summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Trace rows (:func:`trace_rows`) of the steps that ran sequences, by the forward they ran (``decode-N``,
    ``mixed-N``: the CUDA graph of that size; ``eager``): how many, their wall time (sum, p50, p99, ms) and
    mean tokens."""
    import statistics

    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["seqs"]:
            groups.setdefault(row["forward"], []).append(row)
    out = {}
    for kind, rows in sorted(groups.items(), key=lambda kv: -sum(r["wall_ms"] for r in kv[1])):
        walls = sorted(r["wall_ms"] for r in rows)
        out[kind] = {"steps": len(rows), "wall_ms_sum": round(sum(walls), 1),
                     "wall_ms_p50": round(statistics.median(walls), 2), "wall_ms_p99": round(_p99(walls), 2),
                     "tokens_mean": round(sum(r["tokens"] for r in rows) / len(rows), 1)}
    return out


def step_gaps(rows: list[dict]) -> dict[str, float]:
    """The time between consecutive engine steps of trace rows (:func:`trace_rows`), from one step's end to the
    next one's start: what the loop does besides stepping (the server's: sending the step's outputs, taking in
    requests, its stats). Sum, p50 and p99 in ms."""
    import statistics

    gaps = sorted(max(0.0, (b["t_s"] - a["t_s"]) * 1e3 - a["wall_ms"]) for a, b in zip(rows, rows[1:]))
    if not gaps:
        return {}
    return {"gaps": len(gaps), "gap_ms_sum": round(sum(gaps), 1), "gap_ms_p50": round(statistics.median(gaps), 3),
            "gap_ms_p99": round(_p99(gaps), 3)}


def tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def run_server_side(a: argparse.Namespace, cmd: list[str], url: str, burst: list[tuple[str, str]],
                    problems: list[str]) -> dict[str, Any]:
    """Start the server, run serve_load against it, stop it. Returns serve_load's result for the mix with
    the derived server figures, the exit statuses and the wall times."""
    log_path = Path(a.out_dir) / "server.log"
    load_json = Path(a.out_dir) / "serve_load.json"
    load_json.unlink(missing_ok=True)
    trace = Path(a.out_dir).resolve() / "server_steps.jsonl"  # LORAPLEX_STEP_TRACE: the engine's steps
    trace.unlink(missing_ok=True)
    out: dict[str, Any] = {"log": str(log_path)}
    with open(log_path, "w") as log:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "LORAPLEX_STEP_TRACE": str(trace)})
        try:
            wait_healthy(proc, url, a.health_timeout)
            out["startup_s"] = round(time.perf_counter() - t, 1)
            print(f"server healthy on {url} after {out['startup_s']} s (log: {log_path}); warm-up burst of "
                  f"{len(burst)} requests ...", file=sys.stderr)
            asyncio.run(send_burst(url, burst, a.request_timeout))
            load_cmd = [sys.executable, str(HERE / "serve_load.py"), f"--url={url}", f"--mix={a.mix}",
                        f"--concurrency={a.concurrency}", f"--num-requests={a.num_requests}",
                        f"--num-prompts={a.num_requests}", f"--prompt-words={a.prompt_words}",
                        f"--max-tokens={a.max_tokens}", "--temperature=0", "--ignore-eos", f"--seed={a.seed}",
                        f"--request-timeout={a.request_timeout}", f"--json={load_json}", "--plot=",
                        f"--server-pid={proc.pid}"]
            out["load_command"] = load_cmd
            out["load_exit_status"] = subprocess.run(load_cmd, stdout=sys.stderr, cwd=ROOT).returncode
            if proc.poll() is not None:
                problems.append(f"the server exited with {proc.returncode} during the load")
        finally:
            out["exit_status"] = stop(proc)
    if out["exit_status"] != 0:
        problems.append(f"the server did not exit 0 after SIGTERM: "
                        f"{'killed after 120 s' if out['exit_status'] is None else out['exit_status']}")
        print(tail(log_path), file=sys.stderr)
    if not load_json.exists():
        problems.append(f"serve_load.py wrote no result (exit status {out['load_exit_status']})")
        return out
    report = json.loads(load_json.read_text())
    problems.extend(f"serve_load: {p}" for p in report["problems"])
    rows = [r for r in report["mixes"] if r["mix"] == a.mix]
    if not rows:
        problems.append(f"serve_load.py ran no {a.mix} mix")
        return out
    row = out["load"] = rows[0]
    m = row["server_metrics"]
    if m.get("engine_steps"):
        out["tokens_per_step"] = round(m["generation_tokens"] / m["engine_steps"], 2)
        out["engine_busy_share"] = round(m["engine_busy_s"] / row["elapsed_s"], 3)
        rows = trace_rows(trace, m.get("window_unix_s"))  # the load's steps only
        out["steps_by_forward"] = step_summary(rows)
        out["step_gaps"] = step_gaps(rows)
    else:
        problems.append("the server's /metrics had no engine steps")
    return out


# ---- offline -----------------------------------------------------------------------------------
def run_offline(a: argparse.Namespace, cmd: list[str], burst: list[tuple[str, str]],
                requests: list[tuple[str, str, float]]) -> dict[str, Any]:
    """``LLM.generate`` of the same requests with the engine arguments the server parsed from ``cmd``."""
    import torch

    from loraplex import LLM, LoRARequest, SamplingParams
    from loraplex.cli import build_parser, engine_kwargs

    parsed = build_parser().parse_args(cmd[3:])  # ["serve", MODEL, flags...]: exactly what the server read
    kwargs = engine_kwargs(parsed)
    trace = Path(a.out_dir).resolve() / "offline_steps.jsonl"
    trace.unlink(missing_ok=True)
    os.environ["LORAPLEX_STEP_TRACE"] = str(trace)  # read when the engine starts
    t = time.perf_counter()
    try:
        llm = LLM(parsed.model, **kwargs)
    finally:
        del os.environ["LORAPLEX_STEP_TRACE"]
    for name, path in parsed.lora:
        llm.add_lora(LoRARequest(name, path))
    startup = time.perf_counter() - t
    cuda = llm.engine.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(llm.engine.device)) if cuda else (lambda: None)
    models = [None] + [name for name, _ in parsed.lora]  # as serve_load's warm-up: one short request per model
    llm.generate(["Once upon a time"] * len(models), SamplingParams(max_tokens=4), lora_request=models,
                 use_tqdm=False)
    llm.generate([p for _, p in burst], SamplingParams(max_tokens=WARMUP_TOKENS, temperature=0.0, ignore_eos=True),
                 lora_request=[None if m == BASE_NAME else m for m, _ in burst], use_tqdm=False)
    prompts = [p for _, p, _ in requests]
    loras = [None if m == BASE_NAME else m for m, _, _ in requests]
    params = [SamplingParams(max_tokens=a.max_tokens, temperature=temp, ignore_eos=True) for _, _, temp in requests]
    # the engine's steps, timed as the server's engine process times them (server/engine_core.py: the call)
    eng = llm.engine
    real_step, step_s, host_s = eng.step, [], []

    def timed_step() -> list:
        t0 = time.perf_counter()
        out = real_step()
        step_s.append(time.perf_counter() - t0)
        host_s.append(eng.last_step_host_seconds)
        return out

    eng.step = timed_step
    sync()
    trace.write_text("")  # the warm-ups' steps out
    t = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    sync()
    wall = time.perf_counter() - t
    eng.step = real_step
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    rows = trace_rows(trace)
    return {"engine_kwargs": kwargs, "startup_s": round(startup, 1), "requests": len(outs),
            "engine_steps": len(step_s), "engine_step_mean_ms": round(1000 * sum(step_s) / max(len(step_s), 1), 3),
            "engine_step_host_mean_ms": round(1000 * sum(host_s) / max(len(host_s), 1), 3),
            "engine_busy_share": round(sum(step_s) / wall, 3), "steps_by_forward": step_summary(rows),
            "step_gaps": step_gaps(rows),
            "tokens_per_step": round(out_tokens / max(len(step_s), 1), 2),
            "completed": sum(o.finished for o in outs), "elapsed_s": round(wall, 3), "output_tokens": out_tokens,
            "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs),
            "output_tokens_per_s": round(out_tokens / wall, 2),
            "device_name": torch.cuda.get_device_name(llm.engine.device) if cuda else cpu_name()}


def cpu_name() -> str:
    return serve_load.machine_info()["cpu_model"] or platform.processor() or "cpu"


# ---- output ------------------------------------------------------------------------------------
def print_table(a: argparse.Namespace, server: dict[str, Any], offline: dict[str, Any],
                ratio: Optional[float]) -> None:
    row = server.get("load", {})
    m = row.get("server_metrics") or {}
    cpu = m.get("cpu_share") or {}

    def f(v: Any, fmt: str = "{}") -> str:
        return "-" if v is None else fmt.format(v)

    def gaps(side: dict[str, Any]) -> str:
        g = side.get("step_gaps") or {}
        return f"{f(g.get('gap_ms_sum'), '{:.0f}')} / {f(g.get('gap_ms_p50'), '{:.2f}')} / {f(g.get('gap_ms_p99'), '{:.2f}')}"

    def pair(k1: str, k2: str) -> str:
        return f"{f(row.get(k1), '{:.1f}')} / {f(row.get(k2), '{:.1f}')}"

    lines = [
        ("requests completed", f"{f(row.get('requests'))}/{a.num_requests}",
         f"{f(offline.get('completed'))}/{a.num_requests}"),
        ("errors", f(row.get("errors")), "-"),
        ("output tokens", f(row.get("output_tokens")), f(offline.get("output_tokens"))),
        ("wall time, s", f(row.get("elapsed_s"), "{:.2f}"), f(offline.get("elapsed_s"), "{:.2f}")),
        ("output tokens/s", f(row.get("output_tokens_per_s"), "{:.1f}"),
         f(offline.get("output_tokens_per_s"), "{:.1f}")),
        ("TTFT p50 / p99, ms", pair("ttft_p50_ms", "ttft_p99_ms"), "-"),
        ("ITL p50 / p99, ms", pair("itl_p50_ms", "itl_p99_ms"), "-"),
        ("engine steps", f(m.get("engine_steps")), f(offline.get("engine_steps"))),
        ("step mean / host mean, ms", f"{f(m.get('engine_step_mean_ms'), '{:.2f}')} / "
         f"{f(m.get('engine_step_host_mean_ms'), '{:.2f}')}",
         f"{f(offline.get('engine_step_mean_ms'), '{:.2f}')} / {f(offline.get('engine_step_host_mean_ms'), '{:.2f}')}"),
        ("tokens per engine step", f(server.get("tokens_per_step"), "{:.2f}"), f(offline.get("tokens_per_step"))),
        ("engine busy share", f(server.get("engine_busy_share"), "{:.3f}"), f(offline.get("engine_busy_share"))),
        ("between steps, ms: sum / p50 / p99", gaps(server), gaps(offline)),
        ("clients / mean in flight", f"{a.concurrency} / {f(row.get('mean_in_flight'), '{:.1f}')}", "-"),
        ("CPU share: HTTP / engine / clients", " / ".join(f(cpu.get(k), "{:.2f}") for k in
                                                          ("http_process", "engine_process", "load_generator")), "-"),
        ("server exit status", f(server.get("exit_status")), "-"),
    ]
    w0 = max(len(r[0]) for r in lines)
    w1 = max(len(r[1]) for r in lines + [("", "server")])
    print(f"{'':<{w0}}  {'server':>{w1}}  offline")
    for name, s, o in lines:
        print(f"{name:<{w0}}  {s:>{w1}}  {o}")
    print(f"{'ratio server/offline':<{w0}}  {f(ratio, '{:.3f}'):>{w1}}  (output tokens/s; issue 8 asks >= 0.90)")
    for side, steps in (("server", server.get("steps_by_forward") or {}),
                        ("offline", offline.get("steps_by_forward") or {})):
        print(f"{side} steps by forward (steps, wall ms sum / p50 / p99, mean tokens): " + "; ".join(
            f"{k} {v['steps']}, {v['wall_ms_sum']:.0f} / {v['wall_ms_p50']:.1f} / {v['wall_ms_p99']:.1f}, "
            f"{v['tokens_mean']:.0f}" for k, v in list(steps.items())[:8]))


def main(argv: Optional[list[str]] = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    a = parse_args(argv)
    Path(a.out_dir).mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    model, adapters = build_assets(a)
    prompts = serve_load.make_prompts(a.num_requests, a.seed, a.prompt_words)  # serve_load's --num-prompts K list
    burst = warmup_burst(a, [BASE_NAME] if a.mix == "base" else sorted(adapters))
    max_model_len = a.max_model_len or default_max_model_len(model, prompts + [p for _, p in burst], a.max_tokens)
    port = serve_load.free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = server_command(a, model, adapters, port, max_model_len)
    # serve_load lists the adapters from /v1/models, sorted; the offline side replays the same list
    requests = serve_load.fixed_requests(a.num_requests, a.mix, sorted(adapters), BASE_NAME, prompts, a.concurrency,
                                         a.seed, 0.0)
    try:
        server = run_server_side(a, cmd, url, burst, problems)
    except RuntimeError as e:
        print(f"serve_vs_offline: error: {e}\n{tail(Path(a.out_dir) / 'server.log')}", file=sys.stderr)
        return 2
    print(f"offline: LLM.generate of the same {a.num_requests} requests ...", file=sys.stderr)
    offline = run_offline(a, cmd, burst, requests)

    row = server.get("load", {})
    if row:
        if row["requests"] != a.num_requests or row["errors"]:
            problems.append(f"server: {row['requests']} of {a.num_requests} requests completed, "
                            f"{row['errors']} errors: {row['error_kinds']}")
        expected = {mdl: sum(m == mdl for m, _, _ in requests) for mdl, _, _ in requests}
        if row["requests_per_model"] != dict(sorted(expected.items())):
            problems.append(f"requests per model differ: server {row['requests_per_model']}, offline {expected}")
        for k in ("prompt_tokens", "output_tokens"):
            if row[k] != offline[k]:
                problems.append(f"{k} differ: server {row[k]}, offline {offline[k]}")
    ratio = (round(row["output_tokens_per_s"] / offline["output_tokens_per_s"], 3)
             if row and offline["output_tokens_per_s"] else None)

    print_table(a, server, offline, ratio)
    for p in problems:
        print(f"note: {p}", file=sys.stderr)
    import torch

    result = {
        "config": {k: v for k, v in vars(a).items()} | {"max_model_len": max_model_len, "server_command": cmd},
        "server": server, "offline": offline, "ratio_server_to_offline": ratio,
        "device": offline["device_name"], "torch": torch.__version__, "cuda": torch.version.cuda,
        "machine": serve_load.machine_info(), "date": dt.datetime.now().isoformat(timespec="seconds"),
        "problems": problems,
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.json} ({offline['device_name']})", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
