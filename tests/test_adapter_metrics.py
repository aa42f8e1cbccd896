"""Per-adapter Prometheus metrics of the server: bounded labels, requests, tokens, latencies, slot hits and
loads, residency tiers."""

from __future__ import annotations

import httpx
import pytest

from helpers import make_adapter, make_tiny_model
from server_harness import ENGINE_KW, PROMPT, Server


def parse(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("loraplex_adapter_"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_per_adapter_metrics(tmp_path) -> None:
    model_dir = make_tiny_model(tmp_path / "model", family="llama")
    loras = {n: make_adapter(model_dir, tmp_path / n, seed=i, r=4) for i, n in enumerate(["a", "b", "c"])}
    # one device slot, two adapters in host memory: c evicts a or b; at most two adapters named in /metrics
    s = Server(model_dir, loras, engine_kw={**ENGINE_KW, "max_loras": 1, "max_cpu_loras": 2}, max_adapter_metrics=2)
    try:
        c = s.client()
        for model in ["a", "a", "b", "c", "tiny", "a"]:
            c.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0)
        m = parse(httpx.get(s.url + "/metrics").text)
        req = lambda label: m.get(f'loraplex_adapter_requests_total{{adapter="{label}",finish_reason="length"}}', 0)  # noqa: E731
        assert (req("a"), req("b"), req("other"), req("tiny")) == (3, 1, 1, 1)
        assert not any('adapter="c"' in k for k in m)  # beyond max_adapter_metrics: counted as other
        assert m['loraplex_adapter_generation_tokens_total{adapter="a"}'] == 12
        assert m['loraplex_adapter_time_to_first_token_seconds_count{adapter="a"}'] == 3
        assert m['loraplex_adapter_inter_token_latency_seconds_count{adapter="a"}'] == 9
        # a: loaded, then a hit, then loaded again after b and c took the one slot
        assert m['loraplex_adapter_load_seconds_count{adapter="a",source="host"}'] == 2
        assert m['loraplex_adapter_slot_hits_total{adapter="a"}'] == 1
        # tiers now: a in the slot; b, c in host memory or on disk (two host places for three adapters)
        assert m['loraplex_adapter_residency{adapter="a",tier="device"}'] == 1
        assert m['loraplex_adapter_residency{adapter="b",tier="device"}'] == 0
        other = {t: m[f'loraplex_adapter_residency{{adapter="other",tier="{t}"}}'] for t in ("device", "host", "disk")}
        assert sum(other.values()) == 1 and other["device"] == 0  # c
    finally:
        s.stop()


@pytest.mark.parametrize("clients", ["one", "many"])
def test_evicted_adapters_are_re_read_off_the_step_loop(tmp_path, clients) -> None:
    """With one host place per slot, every switch of adapter re-reads a folder: the engine process does it off
    its step loop (reported as disk loads), and the outputs stay those of offline generation. With one client
    the requests come one after another; with many, for four evicted adapters at once, so their re-reads queue
    on the re-read thread, and a request for an adapter whose re-read is queued or running waits for that one
    (each name is read once at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    from loraplex import LLM, LoRARequest, SamplingParams

    model_dir = make_tiny_model(tmp_path / "model", family="llama")
    names = ["a", "b", "c"] if clients == "one" else ["a", "b", "c", "d"]
    loras = {n: make_adapter(model_dir, tmp_path / n, seed=i, r=4) for i, n in enumerate(names)}
    kw = {**ENGINE_KW, "max_loras": 1, "max_cpu_loras": 1}
    llm = LLM(model_dir, **kw)
    p = SamplingParams(max_tokens=4, temperature=0.0)
    want = {n: llm.generate(PROMPT, p, lora_request=LoRARequest(n, path), use_tqdm=False)[0].outputs[0].text
            for n, path in loras.items()}
    s = Server(model_dir, loras, engine_kw=kw)
    try:
        c = s.client()
        order = ["a", "b", "c", "a", "b"] if clients == "one" else names * 3
        complete = lambda m: c.completions.create(model=m, prompt=PROMPT, max_tokens=4,  # noqa: E731
                                                  temperature=0).choices[0].text
        with ThreadPoolExecutor(max_workers=1 if clients == "one" else len(order)) as ex:
            got = list(ex.map(complete, order))
        assert got == [want[m] for m in order]
        m = parse(httpx.get(s.url + "/metrics").text)
        disk = sum(v for k, v in m.items() if k.startswith("loraplex_adapter_load_seconds_count") and 'disk' in k)
        # every switch to an adapter not in host memory re-reads it: b, c, a, b one after another; at least b,
        # c and d (each once, whatever the order) with many clients
        assert disk >= (4 if clients == "one" else 3)
    finally:
        s.stop()
