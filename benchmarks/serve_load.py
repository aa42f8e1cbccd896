"""Load test of an OpenAI-compatible server: N concurrent streaming clients, a mix of adapters, bounded time.

Each client loops until --duration seconds have passed: POST /v1/completions with ``stream=true`` and
``stream_options.include_usage``, a prompt from a fixed seeded list, temperature 0 or 0.7 (or
--temperature), and as ``model`` an adapter name (or the base model's name). With --num-requests K the
clients instead share one fixed, seeded list of K requests (request i takes prompt i mod --num-prompts;
see :func:`fixed_requests`) and stop when it is used up, so another run (an offline one, say) can replay
exactly the same requests. Per request it measures TTFT (request start to the
first chunk with non-empty text) and the gaps between later text chunks (inter-token latency, per chunk as
the client sees it: a chunk may hold several tokens), and takes the prompt and output token counts from the
final usage chunk (never from the text, which may hold fewer tokens' worth than were generated). Errors
are non-200 answers, error events in the stream, streams without usage or [DONE], and exceptions
(timeouts, dropped connections); any error makes the script exit non-zero.

Adapter mixes (--mix): ``uniform`` (each request picks an adapter uniformly), ``skewed`` (70% go to one
adapter, the rest spread evenly), ``distinct`` (client i always uses adapter i: needs at least --concurrency
adapters; with more adapters than device slots it exercises slot swapping), ``base`` (no adapter), ``all``
(each mix in turn).

Modes: ``--url URL`` drives a running server and discovers adapters from GET /v1/models (entries with a
``parent`` are adapters). Without --url (``--spawn``) it builds a tiny random Llama and --num-adapters PEFT
adapters with tests/helpers.py under --out-dir, starts ``python -m loraplex.cli serve`` on a free loopback
port, waits for /health, runs the load, then sends SIGTERM and checks that the server exits 0.

    python benchmarks/serve_load.py --spawn --mix all --duration 10
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --mix skewed --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.util
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import httpx

HERE = Path(__file__).resolve().parent
MIXES = ("uniform", "skewed", "distinct", "base")
SKEW_TOP = 0.7  # share of requests that go to the most popular adapter in the skewed mix
STALL_S = 1.0  # an inter-token gap this long is counted as a stall
WORDS = ("the quick brown fox jumps over lazy dog a small model reads short story and writes next word once "
         "upon time there was little robot who lived in quiet town by sea every morning walked to harbour "
         "counted boats said hello fishermen one day storm came from west wind strong waves were high servers "
         "answer many requests at each request may ask for different adapter").split()

# Adapter i of a spawned server uses spec i mod len(ADAPTER_SPECS): different ranks and targets.
ADAPTER_SPECS: list[dict[str, Any]] = [
    dict(r=8, target_modules=["q_proj", "v_proj"]),
    dict(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens", "lm_head"]),
    dict(r=32, target_modules="all-linear", use_rslora=True),
    dict(r=4, target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"]),
]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--url", help="base URL of a running OpenAI-compatible server (e.g. http://127.0.0.1:8000)")
    mode.add_argument("--spawn", action="store_true", help="build a tiny model + adapters and start loraplex "
                                                           "(the default when --url is not given)")
    p.add_argument("--mix", default="all", choices=MIXES + ("all",))
    p.add_argument("--concurrency", type=int, default=8, help="concurrent streaming clients")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per mix")
    p.add_argument("--num-requests", type=int, help="send exactly this many requests per mix, from a fixed seeded "
                                                     "list the clients share, instead of looping for --duration")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, help="temperature of every request (default: 0 or 0.7, drawn "
                                                      "per request)")
    p.add_argument("--num-prompts", type=int, default=32, help="size of the fixed seeded prompt list")
    p.add_argument("--prompt-words", type=int, help="words in every prompt (default: 4 to 24, drawn per prompt)")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos=true (vLLM/loraplex extension)")
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds before one request is an error")
    p.add_argument("--base-model", help="--url mode: the base model's name (default: the first entry of "
                                        "/v1/models without a parent)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="(default: $OPENAI_API_KEY)")
    p.add_argument("--server-pid", type=int, help="--url mode: the server's process id, to report the CPU time of "
                   "it and its children (the engine process) over each mix (Linux)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="bench_out/serve_load.json")
    p.add_argument("--plot", default="bench_out/serve_load.png", help="PNG plot ('' for none)")
    s = p.add_argument_group("--spawn")
    s.add_argument("--out-dir", default="bench_out/serve", help="where the model and adapters are built")
    s.add_argument("--num-adapters", type=int, default=8)
    s.add_argument("--max-loras", type=int, default=4, help="device adapter slots (fewer than --num-adapters "
                                                            "makes the distinct mix swap adapters)")
    s.add_argument("--max-num-seqs", type=int, default=16)
    s.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `loraplex serve` (repeatable, e.g. --server-arg=--block-size=8)")
    args = p.parse_args(argv)
    if min(args.concurrency, args.max_tokens, args.num_prompts, args.num_adapters, args.max_loras) < 1:
        p.error("--concurrency, --max-tokens, --num-prompts, --num-adapters and --max-loras must be >= 1")
    if args.duration <= 0 or args.request_timeout <= 0:
        p.error("--duration and --request-timeout must be > 0")
    if min(args.num_requests or 1, args.prompt_words or 1) < 1:
        p.error("--num-requests and --prompt-words must be >= 1")
    if args.temperature is not None and args.temperature < 0:
        p.error("--temperature must be >= 0")
    args.spawn = args.url is None
    return args


# ---- the spawned server ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_assets(args: argparse.Namespace) -> tuple[str, dict[str, str]]:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from helpers import make_adapter, make_tiny_model

    out = Path(args.out_dir)
    model_dir = make_tiny_model(out / "model", family="llama", seed=args.seed)
    adapters = {}
    for i in range(args.num_adapters):
        spec = dict(ADAPTER_SPECS[i % len(ADAPTER_SPECS)])
        adapters[f"a{i}"] = make_adapter(model_dir, out / "adapters" / f"a{i}", seed=args.seed + i + 1,
                                         lora_alpha=2 * spec["r"], **spec)
    return model_dir, adapters


class SpawnedServer:
    """``python -m loraplex.cli serve`` in a child process on a free loopback port; its log goes to a file."""

    def __init__(self, args: argparse.Namespace, model_dir: str, adapters: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        rank = max(spec["r"] for spec in ADAPTER_SPECS[:len(adapters)])
        self.cmd = [sys.executable, "-m", "loraplex.cli", "serve", model_dir,
                    *[f"--lora={n}={p}" for n, p in adapters.items()],
                    "--host=127.0.0.1", f"--port={self.port}", "--device=cpu", "--dtype=float32",
                    "--served-model-name=tiny", f"--max-loras={args.max_loras}", f"--max-lora-rank={rank}",
                    f"--max-num-seqs={args.max_num_seqs}", "--log-level=warning", *args.server_arg]
        self.log_path = Path(args.out_dir) / "server.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it was healthy:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not healthy after {timeout:.0f} s:\n{self.tail()}")

    def stop(self, timeout: float = 60.0) -> Optional[int]:
        """SIGTERM, wait; returns the exit status (None if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.log.close()
                return None
        self.log.close()
        return self.proc.returncode

    def tail(self, n: int = 30) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


# ---- the load ----------------------------------------------------------------------------------
@dataclass
class MixResult:
    mix: str
    models: list[str]
    elapsed_s: float = 0.0
    requests: int = 0  # finished without error
    output_tokens: int = 0
    prompt_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)  # "HTTP 400", "ReadTimeout", ...
    error_samples: list[str] = field(default_factory=list)  # the first few messages
    per_model: dict[str, int] = field(default_factory=dict)  # finished requests by model
    finish_reasons: dict[str, int] = field(default_factory=dict)
    chunks: int = 0  # text chunks received (one may carry several tokens: incomplete characters are held back)
    server: dict[str, Any] = field(default_factory=dict)  # deltas of the server's /metrics over the mix

    def error(self, kind: str, message: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
        if len(self.error_samples) < 20:
            self.error_samples.append(message[:300])


def make_prompts(n: int, seed: int, words: Optional[int] = None) -> list[str]:
    """``n`` seeded prompts of ``words`` words each (4 to 24 at random when None)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words or rng.randint(4, 24))).capitalize() for _ in range(n)]


def picker(mix: str, adapters: list[str], base: str, client: int, rng: random.Random) -> Callable[[], str]:
    """A function that returns the ``model`` of a client's next request."""
    if mix == "base":
        return lambda: base
    if mix == "distinct":
        return lambda: adapters[client]
    if mix == "uniform" or len(adapters) == 1:
        return lambda: rng.choice(adapters)
    return lambda: adapters[0] if rng.random() < SKEW_TOP else rng.choice(adapters[1:])  # skewed


def fixed_requests(num: int, mix: str, adapters: list[str], base: str, prompts: list[str], concurrency: int,
                   seed: int, temperature: Optional[float]) -> list[tuple[str, str, float]]:
    """The --num-requests list as (model, prompt, temperature): request i takes prompt i mod len(prompts);
    its model follows the mix, except that ``distinct`` gives request i adapter i mod concurrency."""
    rng = random.Random(f"{seed}-{mix}-fixed")
    pick = picker(mix, adapters, base, 0, rng)
    out = []
    for i in range(num):
        model = adapters[i % min(concurrency, len(adapters))] if mix == "distinct" else pick()
        out.append((model, prompts[i % len(prompts)], temperature if temperature is not None
                    else rng.choice((0.0, 0.7))))
    return out


def request_body(args: argparse.Namespace, model: str, prompt: str, temperature: float) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    return body


async def one_request(http: httpx.AsyncClient, url: str, body: dict, res: MixResult) -> None:
    model = body["model"]
    t0 = time.perf_counter()
    last: Optional[float] = None
    ttft: Optional[float] = None
    gaps: list[float] = []
    usage: Optional[dict] = None
    done = False
    finish = None
    try:
        async with http.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:200]
                res.error(f"HTTP {resp.status_code}", f"{model}: HTTP {resp.status_code}: {text}")
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error("error event", f"{model}: error event: {json.dumps(event['error'])[:200]}")
                    return
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or []:
                    finish = choice.get("finish_reason") or finish
                    if choice.get("text"):
                        now = time.perf_counter()
                        if ttft is None:
                            ttft = now - t0
                        else:
                            gaps.append(now - last)
                        last = now
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        res.error(type(e).__name__, f"{model}: {type(e).__name__}: {e}")
        return
    if not done or usage is None:
        what = "[DONE]" if not done else "a usage chunk"
        res.error(f"no {what}", f"{model}: stream ended without {what}")
        return
    res.requests += 1
    res.output_tokens += int(usage.get("completion_tokens", 0))
    res.prompt_tokens += int(usage.get("prompt_tokens", 0))
    res.e2e_s.append(time.perf_counter() - t0)
    if ttft is not None:  # a request that produced only empty text (e.g. immediate EOS) has no TTFT
        res.ttft_s.append(ttft)
    res.itl_s.extend(gaps)
    res.chunks += len(gaps) + (ttft is not None)
    res.per_model[model] = res.per_model.get(model, 0) + 1
    res.finish_reasons[str(finish)] = res.finish_reasons.get(str(finish), 0) + 1


async def run_mix(args: argparse.Namespace, url: str, mix: str, adapters: list[str], base: str,
                  prompts: list[str]) -> MixResult:
    models = [base] if mix == "base" else adapters[:args.concurrency] if mix == "distinct" else list(adapters)
    res = MixResult(mix, models)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 2, max_keepalive_connections=args.concurrency + 2)
    async with httpx.AsyncClient(timeout=args.request_timeout, limits=limits, headers=headers) as http:
        # One iterator that every client draws from (one event loop, so each request is taken once).
        shared = iter(fixed_requests(args.num_requests, mix, adapters, base, prompts, args.concurrency, args.seed,
                                     args.temperature)) if args.num_requests else None
        t0 = time.perf_counter()
        deadline = t0 + args.duration

        async def send(body: dict[str, Any]) -> None:
            try:  # httpx's timeout is per read; this bounds the whole request
                await asyncio.wait_for(one_request(http, url, body, res), args.request_timeout)
            except asyncio.TimeoutError:
                res.error("timeout", f"{body['model']}: no complete answer within {args.request_timeout:g} s")

        async def client(i: int) -> None:
            if shared is not None:
                for model, prompt, temperature in shared:
                    await send(request_body(args, model, prompt, temperature))
                return
            rng = random.Random(f"{args.seed}-{mix}-{i}")
            pick = picker(mix, adapters, base, i, rng)
            # Bounded: a new request starts only before the deadline, and each one ends within its timeout.
            while time.perf_counter() < deadline:
                model, prompt = pick(), rng.choice(prompts)
                temperature = args.temperature if args.temperature is not None else rng.choice((0.0, 0.7))
                await send(request_body(args, model, prompt, temperature))

        await asyncio.gather(*(client(i) for i in range(args.concurrency)))
        res.elapsed_s = time.perf_counter() - t0
    return res


def cpu_seconds(pid: int) -> dict[int, float]:
    """CPU time (user + system, seconds) of process ``pid`` and each of its descendants, from /proc (Linux; empty
    elsewhere): the server's HTTP process and its engine process, to tell which one a load saturates."""
    out: dict[int, float] = {}
    todo = [pid]
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            out[p] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime: fields 14 and 15 of stat(5)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return out


def scrape_metrics(url: str, api_key: Optional[str]) -> dict[str, float]:
    """Prometheus samples of GET /metrics as {'name{labels}': value}; empty if the server has none."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(url + "/metrics", headers=headers, timeout=10)
    except httpx.HTTPError:
        return {}
    if r.status_code != 200:
        return {}
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                pass
    return out


def server_side(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What the server counted during one mix (loraplex metric names; empty for other servers)."""
    d = {k: after[k] - before.get(k, 0.0) for k in after if k.startswith("loraplex_")}
    steps = d.get("loraplex_engine_step_seconds_count", 0)
    if not steps:
        return {}
    reasons = {k.split('finish_reason="')[1].rstrip('"}'): int(v)
               for k, v in d.items() if k.startswith("loraplex_requests_total{") and v}
    return {"engine_steps": int(steps),
            "engine_step_mean_ms": round(1000 * d["loraplex_engine_step_seconds_sum"] / steps, 3),
            "engine_busy_s": round(d["loraplex_engine_step_seconds_sum"], 3),
            "engine_step_host_mean_ms": round(1000 * d.get("loraplex_engine_step_host_seconds_sum", 0.0) / steps, 3),
            "requests_by_finish_reason": reasons,
            "generation_tokens": int(d.get("loraplex_generation_tokens_total", 0)),
            "inter_token_latency_observations": int(d.get("loraplex_inter_token_latency_seconds_count", 0))}


def warm_up(url: str, models: list[str], api_key: Optional[str]) -> None:
    """One short request per model, so the first timed requests do not pay for one-time set-up."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(timeout=60, headers=headers) as http:
        for m in models:
            r = http.post(url + "/v1/completions", json={"model": m, "prompt": "Once upon a time", "max_tokens": 4})
            if r.status_code != 200:
                raise RuntimeError(f"warm-up request for model {m!r} failed: HTTP {r.status_code}: {r.text[:300]}")


def discover(url: str, api_key: Optional[str], base_override: Optional[str]) -> tuple[str, list[str]]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(url + "/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    data = r.json()["data"]
    bases = [m["id"] for m in data if not m.get("parent")]
    adapters = sorted(m["id"] for m in data if m.get("parent"))
    if base_override is None and not bases:
        raise RuntimeError(f"GET {url}/v1/models lists no base model (an entry without 'parent'): {data}")
    return base_override or bases[0], adapters


# ---- statistics and output ---------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> Optional[float]:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(r: MixResult) -> dict[str, Any]:
    ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    return {
        "mix": r.mix, "models": r.models, "elapsed_s": round(r.elapsed_s, 3), "requests": r.requests,
        "requests_per_s": round(r.requests / r.elapsed_s, 3), "output_tokens": r.output_tokens,
        "output_tokens_per_s": round(r.output_tokens / r.elapsed_s, 2), "prompt_tokens": r.prompt_tokens,
        # requests in flight on average over the mix (Little's law: summed request time / wall time)
        "mean_in_flight": round(sum(r.e2e_s) / r.elapsed_s, 2),
        **{f"ttft_p{q}_ms": ms(percentile(r.ttft_s, q)) for q in (50, 90, 99)},
        "ttft_max_ms": ms(max(r.ttft_s, default=None)),
        **{f"itl_p{q}_ms": ms(percentile(r.itl_s, q)) for q in (50, 90, 99)},
        "itl_max_ms": ms(max(r.itl_s, default=None)),
        f"itl_gaps_over_{STALL_S:g}s": sum(g > STALL_S for g in r.itl_s),
        # gaps under 1 ms are chunks that arrived together (one socket read), not separate engine steps
        "itl_under_1ms_frac": round(sum(g < 1e-3 for g in r.itl_s) / len(r.itl_s), 3) if r.itl_s else None,
        "tokens_per_chunk": round(r.output_tokens / r.chunks, 3) if r.chunks else None,
        "e2e_p50_ms": ms(percentile(r.e2e_s, 50)), "e2e_p99_ms": ms(percentile(r.e2e_s, 99)),
        "errors": r.errors, "error_kinds": r.error_kinds, "error_samples": r.error_samples,
        "requests_per_model": dict(sorted(r.per_model.items())), "finish_reasons": r.finish_reasons,
        "server_metrics": r.server,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = [("mix", "mix", "{}"), ("requests", "requests", "{}"), ("req/s", "requests_per_s", "{:.2f}"),
            ("out tok/s", "output_tokens_per_s", "{:.1f}"),
            *[(f"TTFT p{q} ms", f"ttft_p{q}_ms", "{:.1f}") for q in (50, 90, 99)],
            *[(f"ITL p{q} ms", f"itl_p{q}_ms", "{:.1f}") for q in (50, 90, 99)], ("errors", "errors", "{}")]
    cells = [[h for h, _, _ in cols]] + [["-" if r[k] is None else f.format(r[k]) for _, k, f in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    for j, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def machine_info() -> dict[str, Any]:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_model": model,
            "cpu_count": os.cpu_count(), "date": dt.datetime.now().isoformat(timespec="seconds")}


def plot(results: list[MixResult], rows: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.mix for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, attr, label in ((axes[0], "ttft_s", "TTFT (ms)"), (axes[1], "itl_s", "inter-token latency (ms)")):
        data = [[x * 1000 for x in getattr(r, attr)] or [float("nan")] for r in results]
        ax.boxplot(data, whis=(1, 99), showfliers=True, flierprops=dict(markersize=2, alpha=0.4))
        ax.set_xticks(range(1, len(names) + 1), names)
        if any(x > 0 for r in results for x in getattr(r, attr)):  # log scale needs data (all may have failed)
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.set_title(f"{label.split(' (')[0]} per mix (whiskers p1/p99)")
        ax.grid(axis="y", alpha=0.3, which="both")
    ax = axes[2]
    x = range(len(names))
    bars = ax.bar(x, [r["output_tokens_per_s"] for r in rows], color="tab:blue", label="output tokens/s")
    ax.bar_label(bars, fmt="%.0f")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("output tokens/s")
    ax2 = ax.twinx()
    ax2.plot(list(x), [r["requests_per_s"] for r in rows], "o-", color="tab:orange", label="requests/s")
    ax2.set_ylabel("requests/s")
    ax.set_ylim(0, 1.15 * max(max(r["output_tokens_per_s"] for r in rows), 1))
    ax2.set_ylim(0, 2.2 * max(max(r["requests_per_s"] for r in rows), 1))  # keeps the line below the bar labels
    ax.set_title("throughput per mix")
    ax.legend(handles=[bars, ax2.lines[0]], loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main --------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    server: Optional[SpawnedServer] = None
    exit_status: Optional[int] = None
    problems: list[str] = []
    results: list[MixResult] = []
    mixes: list[str] = []
    try:
        if args.spawn:
            t = time.perf_counter()
            model_dir, adapter_dirs = build_assets(args)
            print(f"built a tiny model and {len(adapter_dirs)} adapters under {args.out_dir} "
                  f"in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            server = SpawnedServer(args, model_dir, adapter_dirs)
            t = time.perf_counter()
            server.wait_healthy()
            print(f"server healthy on {server.url} after {time.perf_counter() - t:.1f} s (log: {server.log_path})",
                  file=sys.stderr)
        url = (server.url if server else args.url).rstrip("/")
        base, adapters = discover(url, args.api_key, args.base_model)
        mixes = list(MIXES) if args.mix == "all" else [args.mix]
        if not adapters:
            if args.mix not in ("all", "base"):
                raise RuntimeError(f"--mix {args.mix} needs adapters, but {url}/v1/models lists none")
            mixes = ["base"]
            problems.append("no adapters listed: only the base mix was run")
        if "distinct" in mixes and len(adapters) < args.concurrency:
            msg = f"the distinct mix needs >= {args.concurrency} adapters (one per client), the server has " \
                  f"{len(adapters)}"
            if args.mix == "distinct":
                raise RuntimeError(msg)
            mixes.remove("distinct")
            problems.append(msg + ": skipped")
        print(f"base model {base!r}, {len(adapters)} adapters: {adapters}", file=sys.stderr)
        warm_up(url, [base] + adapters, args.api_key)
        prompts = make_prompts(args.num_prompts, args.seed, args.prompt_words)
        for mix in mixes:
            load = f"{args.num_requests} requests" if args.num_requests else f"{args.duration:g} s"
            print(f"mix {mix}: {args.concurrency} clients, {load} ...", file=sys.stderr)
            before = scrape_metrics(url, args.api_key)
            pid = server.proc.pid if server is not None else args.server_pid
            cpu0, own0 = cpu_seconds(pid) if pid else {}, time.process_time()
            t0, unix0 = time.perf_counter(), time.time()
            res = asyncio.run(run_mix(args, url, mix, adapters, base, prompts))
            cpu1, own1, wall = cpu_seconds(pid) if pid else {}, time.process_time(), time.perf_counter() - t0
            res.server = server_side(before, scrape_metrics(url, args.api_key))
            res.server["window_unix_s"] = [round(unix0, 6), round(unix0 + wall, 6)]  # to line up server-side traces
            if cpu1:  # shares of one core over the mix: the HTTP process, its engine process(es), these clients
                used = {p: v - cpu0.get(p, 0.0) for p, v in cpu1.items()}
                res.server["cpu_share"] = {
                    "http_process": round(used.get(pid, 0.0) / wall, 3),
                    "engine_process": round(sum(v for p, v in used.items() if p != pid) / wall, 3),
                    "load_generator": round((own1 - own0) / wall, 3)}
            results.append(res)
            if server is not None and server.proc.poll() is not None:
                problems.append(f"server exited with {server.proc.returncode} during mix {mix}")
                break
    except (RuntimeError, httpx.HTTPError) as e:  # set-up failed: no server, no models, warm-up refused
        print(f"serve_load: error: {e}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            exit_status = server.stop()
            if exit_status != 0:
                problems.append(f"server did not exit 0 after SIGTERM: "
                                f"{'killed after 60 s' if exit_status is None else exit_status}")
                print(server.tail(), file=sys.stderr)

    rows = [summarize(r) for r in results]
    print_table(rows)
    n_err = sum(r["errors"] for r in rows)
    for r in rows:
        if r["errors"]:
            print(f"errors [{r['mix']}]: {r['error_kinds']}; first: {r['error_samples'][0]}", file=sys.stderr)
    for p in problems:
        print(f"note: {p}", file=sys.stderr)
    config = {k: v for k, v in vars(args).items() if k != "api_key"}
    if server is not None:
        config["server_command"] = server.cmd
        config["server_exit_status"] = exit_status
    out = {"config": config, "machine": machine_info(), "mixes": rows, "total_errors": n_err, "problems": problems}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    plotted = bool(results and args.plot)
    if plotted and importlib.util.find_spec("matplotlib") is None:
        print("note: matplotlib is not installed: no plot", file=sys.stderr)
        plotted = False
    if plotted:
        target = "spawned loraplex (tiny random Llama, CPU)" if server else args.url
        load = f"{args.num_requests} requests" if args.num_requests else f"{args.duration:g} s"
        plot(results, rows, args.plot, f"{target}: {args.concurrency} streaming clients, max_tokens "
                                       f"{args.max_tokens}, {load} per mix")
    print(f"wrote {args.json}" + (f" and {args.plot}" if plotted else ""), file=sys.stderr)
    server_failed = server is not None and (exit_status != 0 or len(results) < len(mixes))
    return 1 if n_err or server_failed else 0


if __name__ == "__main__":
    sys.exit(main())
