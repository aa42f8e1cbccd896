"""The OpenAI-compatible server, started for real on a loopback port and driven
with the official ``openai`` client and raw HTTP."""

from __future__ import annotations

import json
import signal
import time

import httpx
import openai
import pytest

from helpers import make_adapter, make_tiny_model
from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.server.engine_client import EngineClient
from server_harness import ENGINE_KW, PROMPT, Server, serve_cli

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    model_dir = make_tiny_model(root / "model", family="llama")
    loras = {
        "qv": make_adapter(model_dir, root / "loras" / "qv", seed=1, r=8, target_modules=["q_proj", "v_proj"]),
        "emb": make_adapter(model_dir, root / "loras" / "emb", seed=2, r=4,
                            target_modules=["embed_tokens", "lm_head", "o_proj"]),
        "extra": make_adapter(model_dir, root / "loras" / "extra", seed=3, r=16, target_modules="all-linear"),
    }
    return root, model_dir, loras


@pytest.fixture(scope="module")
def server(assets):
    _, model_dir, loras = assets
    s = Server(model_dir, {"qv": loras["qv"], "emb": loras["emb"]})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def offline(assets):
    _, model_dir, loras = assets
    llm = LLM(model_dir, **ENGINE_KW)
    for name in ("qv", "emb", "extra"):
        llm.add_lora(LoRARequest(name, loras[name]))
    return llm


def offline_text(llm: LLM, prompt, adapter, n: int = 12, **kw) -> str:
    p = SamplingParams(max_tokens=n, temperature=0.0, **kw)
    return llm.generate(prompt, p, lora_request=adapter, use_tqdm=False)[0].outputs[0].text


# ---- models, completions, chat ---------------------------------------------------------------
def test_models_lists_base_and_adapters(server, assets) -> None:
    _, model_dir, loras = assets
    data = server.client().models.list().data
    by_id = {m.id: m for m in data}
    assert set(by_id) == {"tiny", "qv", "emb"}
    assert by_id["qv"].parent == "tiny" and by_id["emb"].parent == "tiny"
    assert getattr(by_id["tiny"], "parent", None) is None
    assert by_id["qv"].root == loras["qv"]


@pytest.mark.parametrize("model,adapter", [("tiny", None), ("qv", "qv"), ("tiny:emb", "emb"), ("emb", "emb")])
def test_completion_matches_offline_generate(server, offline, model, adapter) -> None:
    r = server.client().completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == model
    assert r.choices[0].text == offline_text(offline, PROMPT, adapter)
    assert r.usage.completion_tokens == 12 or r.choices[0].finish_reason == "stop"


def test_adapters_change_the_output(server) -> None:
    c = server.client()
    texts = {m: c.completions.create(model=m, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
             for m in ("tiny", "qv", "emb")}
    assert len(set(texts.values())) == 3


def test_streaming_completion_equals_non_streaming(server) -> None:
    c = server.client()
    full = c.completions.create(model="qv", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    chunks = list(c.completions.create(model="qv", prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert all(ch.object == "text_completion" for ch in chunks)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")


def test_chat_matches_offline_chat(server, offline) -> None:
    msgs = [{"role": "user", "content": "Tell me a story"}]
    r = server.client().chat.completions.create(model="emb", messages=msgs, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    want = offline.chat(msgs, SamplingParams(max_tokens=10, temperature=0.0), lora_request="emb",
                        use_tqdm=False)[0].outputs[0].text
    assert r.choices[0].message.content == want
    stream = list(server.client().chat.completions.create(model="emb", messages=msgs, max_tokens=10,
                                                          temperature=0, stream=True,
                                                          stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in stream)
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == want
    assert stream[-1].usage.total_tokens == stream[-1].usage.prompt_tokens + stream[-1].usage.completion_tokens


def test_n_seed_logprobs_echo_stop(server, offline) -> None:
    c = server.client()
    r = c.completions.create(model="qv", prompt=PROMPT, max_tokens=8, temperature=1.0, n=2, seed=11)
    again = c.completions.create(model="qv", prompt=PROMPT, max_tokens=8, temperature=1.0, n=2, seed=11)
    assert [ch.index for ch in r.choices] == [0, 1]
    assert [ch.text for ch in r.choices] == [ch.text for ch in again.choices]
    assert r.choices[0].text != r.choices[1].text
    r = c.completions.create(model="qv", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2, echo=True)
    ch = r.choices[0]
    assert ch.text.startswith(PROMPT)
    n_prompt = r.usage.prompt_tokens
    assert len(ch.logprobs.tokens) == n_prompt + 5
    assert ch.logprobs.token_logprobs[0] is None and ch.logprobs.token_logprobs[n_prompt] < 0
    assert all(len(t) >= 1 for t in ch.logprobs.top_logprobs[1:])
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                  temperature=0, logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == 4 and all(len(t.top_logprobs) == 3 for t in lp)
    assert lp[0].logprob == pytest.approx(max(t.logprob for t in lp[0].top_logprobs))
    full = offline_text(offline, PROMPT, None, n=16)
    if len(full) > 5:
        stop = full[2:5]
        r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
        assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


# ---- errors ----------------------------------------------------------------------------------
def test_errors_have_openai_shape_and_status(server) -> None:
    c = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="nope", prompt="x", max_tokens=2)
    assert "qv" in str(e.value) and "tiny" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="other:qv", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_model_len"):
        c.completions.create(model="tiny", prompt="x", max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="max_model_len"):
        c.completions.create(model="tiny", prompt=list(range(3, 300)), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="n=100 = 100 sequences; the limit is 8"):
        c.completions.create(model="tiny", prompt="x", max_tokens=2, n=100)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        c.completions.create(model="tiny", prompt=[1, 10 ** 6], max_tokens=2)
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "max_tokens": "many", "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/v1/completions", content=b"{" + b" " * (40 * 1024 * 1024) + b"}",
                   headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"})
    assert r.status_code == 403 and "allow-runtime-lora-updates" in r.json()["error"]["message"]
    # the server still serves
    assert c.completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].text is not None


def test_health_and_metrics(server) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    server.client().completions.create(model="qv", prompt="x", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("loraplex_requests_total", "loraplex_generation_tokens_total", "loraplex_prompt_tokens_total",
                 "loraplex_time_to_first_token_seconds_bucket", "loraplex_e2e_request_latency_seconds_bucket",
                 "loraplex_num_requests_running", "loraplex_num_requests_waiting", "loraplex_loras_registered 2.0",
                 "loraplex_kv_cache_usage_ratio"):
        assert name in text, name
    itl_count = next(line for line in text.splitlines() if line.startswith("loraplex_inter_token_latency_seconds_count"))
    assert float(itl_count.split()[-1]) >= 2  # the 3-token request above had two gaps
    host = {line.split()[0]: float(line.split()[-1]) for line in text.splitlines()
            if line.startswith(("loraplex_engine_step_host_seconds_count", "loraplex_engine_step_host_seconds_sum",
                                "loraplex_engine_step_seconds_sum"))}
    assert host["loraplex_engine_step_host_seconds_count"] >= 3  # one per step
    # on CPU the whole step is host time; at most the step's duration
    assert 0 < host["loraplex_engine_step_host_seconds_sum"] <= host["loraplex_engine_step_seconds_sum"] + 1e-6


def wait_idle(engine: EngineClient, timeout: float = 10.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline and (engine.stats["running"] or engine.stats["waiting"]):
        time.sleep(0.05)
    return engine.stats


def test_client_disconnect_aborts_and_frees(server) -> None:
    eng = server.engine
    before = eng.num_aborted
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", server.url + "/v1/completions",
                      json={"model": "qv", "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True,
                            "stream": True}) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    break  # one chunk, then hang up
    deadline = time.time() + 10
    while time.time() < deadline and eng.num_aborted == before:
        time.sleep(0.05)
    assert eng.num_aborted == before + 1
    stats = wait_idle(eng)
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_usage"] == 0.0
    assert stats["lora_slot_refs"] == 0


# ---- auth and runtime adapter updates ----------------------------------------------------------
def test_api_key_required(assets) -> None:
    _, model_dir, loras = assets
    s = Server(model_dir, {}, api_key="sekrit")
    try:
        assert httpx.get(s.url + "/health").status_code == 200
        for path in ("/v1/models", "/metrics"):
            r = httpx.get(s.url + path)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").completions.create(model="tiny", prompt="x", max_tokens=2)
        assert s.client("sekrit").completions.create(model="tiny", prompt="x", max_tokens=2).choices
    finally:
        s.stop()


def test_runtime_load_unload(assets, offline, tmp_path) -> None:
    root, model_dir, loras = assets
    lora_root = root / "loras"
    outside = tmp_path / "outside"
    outside.mkdir()
    if not (lora_root / "escape").exists():
        (lora_root / "escape").symlink_to(outside)  # a link inside the root that points out of it
    s = Server(model_dir, {}, allow_runtime_lora_updates=True, lora_root=str(lora_root))
    try:
        c = s.client()
        post = lambda path, body: httpx.post(s.url + path, json=body)  # noqa: E731
        assert post("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "qv"}).status_code == 200
        assert post("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "qv"}).status_code == 400
        for bad in ("../loras/qv", str(outside), "escape", "/etc"):
            r = post("/v1/load_lora_adapter", {"lora_name": "b", "lora_path": bad})
            assert r.status_code == 400, bad
        r = post("/v1/load_lora_adapter", {"lora_name": "b", "lora_path": "missing"})
        assert r.status_code == 400 and "missing" in r.json()["error"]["message"]
        assert {m.id for m in c.models.list().data} == {"tiny", "a"}
        got = c.completions.create(model="a", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
        assert got == offline_text(offline, PROMPT, "qv")

        # reload "a" with other weights, then unload it, while a long request with the old weights streams
        with httpx.Client(timeout=60) as h:
            with h.stream("POST", s.url + "/v1/completions",
                          json={"model": "a", "prompt": PROMPT, "max_tokens": 200, "temperature": 0,
                                "ignore_eos": True, "stream": True}) as resp:
                assert resp.status_code == 200
                events = []
                lines = resp.iter_lines()
                events.append(next(line for line in lines if line.startswith("data: ")))
                r = post("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "extra", "load_inplace": True})
                assert r.status_code == 200
                new = c.completions.create(model="a", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
                assert post("/v1/unload_lora_adapter", {"lora_name": "a"}).status_code == 200
                events.extend(line for line in lines if line.startswith("data: "))
        assert new == offline_text(offline, PROMPT, "extra")
        assert events[-1] == "data: [DONE]"
        old = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
        assert old == offline_text(offline, PROMPT, "qv", n=200, ignore_eos=True)  # the weights it started with
        assert post("/v1/unload_lora_adapter", {"lora_name": "a"}).status_code == 404
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="a", prompt="x", max_tokens=2)
    finally:
        s.stop()


# ---- graceful shutdown -------------------------------------------------------------------------
def test_sigterm_finishes_inflight_and_exits_zero(assets) -> None:
    _, model_dir, loras = assets
    proc, url = serve_cli(model_dir, loras["qv"])
    try:
        lines: list[str] = []
        with httpx.Client(timeout=60) as h:
            with h.stream("POST", url + "/v1/completions",
                          json={"model": "qv", "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True,
                                "stream": True}) as resp:
                it = resp.iter_lines()
                lines.append(next(line for line in it if line.startswith("data: ")))
                proc.send_signal(signal.SIGTERM)
                lines.extend(it)
        assert lines[-1] == "data: [DONE]" or "data: [DONE]" in lines
        assert proc.wait(60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- images in chat (vision-language models) ---------------------------------------------------
def test_chat_with_data_url_images_matches_offline(tmp_path) -> None:
    import base64
    import io

    from vlm_helpers import make_image, make_tiny_vlm

    model_dir = make_tiny_vlm(tmp_path / "vlm", family="qwen2_vl")
    s = Server(model_dir, {}, max_request_body_bytes=4 * 1024 * 1024)
    try:
        def data_url(img) -> str:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

        a, b = make_image(1, 32, 32), make_image(2, 24, 40)
        content = [{"type": "text", "text": "Compare "}, {"type": "image_url", "image_url": {"url": data_url(a)}},
                   {"type": "text", "text": " with "}, {"type": "image_url", "image_url": {"url": data_url(b)}}]
        msgs = [{"role": "user", "content": content}]
        r = s.client().chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0)
        offline = LLM(model_dir, **ENGINE_KW)
        want = offline.chat([{"role": "user", "content": [content[0], {"type": "image", "image": a}, content[2],
                                                          {"type": "image", "image": b}]}],
                            SamplingParams(max_tokens=6, temperature=0.0), use_tqdm=False)[0]
        assert r.choices[0].message.content == want.outputs[0].text
        assert r.usage.prompt_tokens == len(want.prompt_token_ids)  # image positions included
        bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
        with pytest.raises(openai.BadRequestError):
            s.client().chat.completions.create(model="tiny", messages=bad, max_tokens=2)
        remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]
        with pytest.raises(openai.BadRequestError, match="remote"):
            s.client().chat.completions.create(model="tiny", messages=remote, max_tokens=2)
    finally:
        s.stop()


def test_text_only_model_refuses_images(server) -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    with pytest.raises(openai.BadRequestError, match="does not accept images"):
        server.client().chat.completions.create(model="tiny", messages=msgs, max_tokens=2)


def test_adapter_versions_and_pinning(assets, offline) -> None:
    """name@version through the server: after an in-place reload the kept previous version still serves its
    own outputs; /v1/models lists versions and pins; pinning needs runtime updates enabled."""
    root, model_dir, loras = assets
    s = Server(model_dir, {}, engine_kw={**ENGINE_KW, "max_loras": 3}, allow_runtime_lora_updates=True,
               lora_root=str(root / "loras"))
    try:
        c = s.client()
        post = lambda path, body: httpx.post(s.url + path, json=body)  # noqa: E731
        assert post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "qv"}).status_code == 200
        v_qv = {m.id: m for m in c.models.list().data}["x"].versions[0]
        assert post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "extra",
                                              "load_inplace": True}).status_code == 200
        card = {m.id: m for m in c.models.list().data}["x"]
        assert card.versions[1] == v_qv and card.pinned is False
        text = lambda model: c.completions.create(model=model, prompt=PROMPT, max_tokens=12,  # noqa: E731
                                                  temperature=0).choices[0].text
        assert text("x") == offline_text(offline, PROMPT, "extra")
        assert text(f"x@{v_qv}") == offline_text(offline, PROMPT, "qv")
        assert text(f"tiny:x@{card.versions[0]}") == offline_text(offline, PROMPT, "extra")
        with pytest.raises(openai.NotFoundError, match="has no version 'nope'"):
            text("x@nope")
        assert post("/v1/pin_lora_adapter", {"lora_name": "x"}).status_code == 200
        assert {m.id: m for m in c.models.list().data}["x"].pinned is True
        r = post("/v1/pin_lora_adapter", {"lora_name": "missing"})
        assert r.status_code == 404
        assert post("/v1/pin_lora_adapter", {"lora_name": "x", "pinned": False}).status_code == 200
        assert post("/v1/pin_lora_adapter", {"lora_name": "x", "pinned": False}).status_code == 400  # not pinned
    finally:
        s.stop()


@pytest.mark.parametrize("send_thread", ["1", "0"])
def test_send_thread_streams_what_the_loop_would_send(assets, offline, monkeypatch, send_thread) -> None:
    """The engine process's messages go out through a writer thread (LORAPLEX_ENGINE_SEND_THREAD, the default)
    or from the step loop itself (=0). Either way, concurrent streams of different adapters get the tokens
    offline generation gives, in order and whole; a runtime load gets its reply; and a stop drains what was
    queued (the engine process exits cleanly)."""
    import concurrent.futures

    root, model_dir, loras = assets
    monkeypatch.setenv("LORAPLEX_ENGINE_SEND_THREAD", send_thread)  # read by the engine process, spawned below
    s = Server(model_dir, {"qv": loras["qv"], "emb": loras["emb"]}, allow_runtime_lora_updates=True,
               lora_root=str(root / "loras"))
    try:
        c = s.client().with_options(timeout=60)  # a lost message fails the test instead of hanging it

        def stream(model: str) -> str:
            chunks = c.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                          extra_body={"ignore_eos": True})
            return "".join(ch.choices[0].text for ch in chunks if ch.choices)

        models = ["tiny", "qv", "emb"] * 3
        with concurrent.futures.ThreadPoolExecutor(len(models)) as ex:
            got = list(ex.map(stream, models))
        for model, text in zip(models, got):
            want = offline_text(offline, PROMPT, None if model == "tiny" else model, n=24, ignore_eos=True)
            assert text == want, model
        r = httpx.post(s.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "extra"})
        assert r.status_code == 200
        assert stream("x") == offline_text(offline, PROMPT, "extra", n=24, ignore_eos=True)
    finally:
        s.stop()
        s.engine.shutdown()
    assert s.engine.proc.exitcode == 0  # the writer drained and the process ended on its own


def test_send_thread_failure_stops_the_engine_loop_loudly(monkeypatch) -> None:
    """LORAPLEX_ENGINE_SEND_THREAD (the default): a message the writer thread cannot send (here, one that cannot be pickled)
    stops the loop and is raised by EngineCore.run, as the loop's own send would have raised it (the engine
    process then reports it as fatal), instead of the loop stepping on with its outputs going nowhere."""
    import queue as queue_mod
    from types import SimpleNamespace

    from loraplex.server.engine_core import EngineCore

    class Conn:  # the engine's end of the pipe: one request's worth of messages in, pickling on the way out
        def __init__(self) -> None:
            self.incoming: "queue_mod.Queue[tuple]" = queue_mod.Queue()
            self.incoming.put(("abort", ["nothing"]))
            self.sent: list = []

        def recv(self) -> tuple:
            return self.incoming.get()

        def send(self, msg: tuple) -> None:
            import pickle

            self.sent.append(pickle.dumps(msg))

    engine = SimpleNamespace(output_kind=None, pool=None, scheduler=SimpleNamespace(running=[], waiting=[]),
                             allocator=SimpleNamespace(usage=0.0), last_step_host_seconds=0.0,
                             cache_stats=lambda: {}, has_unfinished_requests=lambda: False,
                             abort_request=lambda rid: None)
    monkeypatch.setenv("LORAPLEX_ENGINE_SEND_THREAD", "1")
    conn = Conn()
    core = EngineCore(engine, conn)
    core.stats = lambda: {"unpicklable": lambda: None}  # the step message after the abort cannot be sent
    with pytest.raises(Exception, match="pickle|lambda"):
        core.run()
    assert conn.sent == [] and not core.running
