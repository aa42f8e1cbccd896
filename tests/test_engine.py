"""Engine behaviour: continuous batching, preemption, adapter slots, sampling,
stop conditions and request errors, on a tiny Llama model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import load_base_model, make_adapter, make_tiny_model
from loraplex import LLM, AdapterError, InvalidRequestError, LoRARequest, SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("engine") / "model", family="llama")


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    targets = [["q_proj", "v_proj"], ["o_proj"], ["gate_proj", "down_proj"], ["k_proj", "up_proj"],
               ["q_proj", "lm_head"], ["v_proj", "embed_tokens"]]
    return {f"a{i}": make_adapter(model_dir, root / f"a{i}", seed=10 + i, r=4 + 2 * i, target_modules=t)
            for i, t in enumerate(targets)}


def make_llm(model_dir: str, **kw) -> LLM:
    args = dict(dtype="float32", device="cpu", max_lora_rank=16, num_kv_blocks=64, block_size=4, seed=0)
    args.update(kw)
    return LLM(model_dir, **args)


def greedy(n: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


PROMPTS = [[5, 17, 33, 99, 120, 7, 8, 250], [3, 4, 5, 6], [100, 101, 102, 103, 104, 105], [9, 8, 7, 6, 5, 4],
           [42, 43, 44], [60, 61, 62, 63, 64, 65, 66, 67], [200, 180, 160], [11, 22, 33, 44, 55]]


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_base_greedy_matches_transformers(model_dir) -> None:
    llm = make_llm(model_dir)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], greedy(16), use_tqdm=False)
    hf = load_base_model(model_dir)
    with torch.no_grad():
        for p, o in zip(PROMPTS, outs):
            ids = torch.tensor([p])
            want = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=16, min_new_tokens=16)[0, len(p):].tolist()
            # ignore_eos lets EOS through while min_new_tokens masks it: compare up to the first EOS
            got = o.outputs[0].token_ids
            cut = next((i for i, t in enumerate(got) if t == hf.config.eos_token_id), len(got))
            assert got[:cut] == want[:cut]


def test_more_adapters_than_slots_all_served_and_identical(model_dir, adapters) -> None:
    names = list(adapters)
    reqs = [LoRARequest(n, adapters[n]) for n in names]
    prompts = [{"prompt_token_ids": PROMPTS[i % len(PROMPTS)]} for i in range(12)]
    loras = [reqs[i % len(reqs)] if i % 4 != 3 else None for i in range(12)]
    roomy = make_llm(model_dir, max_loras=6)
    want = tokens(roomy.generate(prompts, greedy(), lora_request=loras, use_tqdm=False))
    tight = make_llm(model_dir, max_loras=2, max_cpu_loras=3)
    got = tight.generate(prompts, greedy(), lora_request=loras, use_tqdm=False)
    assert tokens(got) == want
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in got)
    pool = tight.engine.pool
    assert pool.num_slot_loads > 2  # slots were reused
    assert len(pool.host_resident) <= 3  # host LRU bound held; evicted adapters were re-read
    assert sorted(tight.list_loras()) == sorted(names)


class _PendingUpload:
    """Stands for the CUDA event of a slot upload on the side stream: done after a few polls."""

    def __init__(self) -> None:
        self.polls = 0
        self.waited = False

    def query(self) -> bool:
        self.polls += 1
        return self.waited or self.polls > 3

    def synchronize(self) -> None:
        self.waited = True


def _slow_uploads(llm: LLM) -> list[_PendingUpload]:
    """Make every slot copy of ``llm`` complete only after a few polls, as uploads on CUDA's side stream do."""
    lora_model = llm.engine.pool.lora_model
    real, uploads = lora_model.set_slot, []

    def set_slot(slot, adapter, after=None):
        real(slot, adapter, after)
        uploads.append(_PendingUpload())
        return uploads[-1]

    lora_model.set_slot = set_slot
    return uploads


def test_requests_wait_only_for_their_own_adapter_upload(model_dir, adapters) -> None:
    """While an adapter is copied into its slot, the requests that need it wait; base requests and those on
    adapters already in slots run on; outputs are those of immediate copies. With nothing else to run, the
    engine waits for the copy instead of failing."""
    names = list(adapters)[:3]
    prompts = PROMPTS[:6]
    order = [None, names[0], None, names[1], names[2], None]
    loras = [LoRARequest(n, adapters[n]) if n else None for n in order]
    want = tokens(make_llm(model_dir, max_loras=3).generate([{"prompt_token_ids": p} for p in prompts], greedy(),
                                                             lora_request=loras, use_tqdm=False))
    llm = make_llm(model_dir, max_loras=3)
    for n in names:
        llm.add_lora(LoRARequest(n, adapters[n]))
    uploads = _slow_uploads(llm)
    eng = llm.engine
    for i, (p, n) in enumerate(zip(prompts, order)):
        eng.add_request({"prompt_token_ids": p}, greedy(), n, f"r{i}")
    eng.step()
    started = {rid for rid, r in eng.requests.items() if r.num_computed_tokens > 0}
    assert started == {"r0", "r2", "r5"} and len(uploads) == 3  # every copy started, none waited on
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    assert [done[f"r{i}"] for i in range(6)] == want
    assert not any(u.waited for u in uploads)  # running requests never waited for a copy

    # nothing but a request whose adapter is being copied in: the engine waits for the copy
    alone = make_llm(model_dir, max_loras=1)
    uploads = _slow_uploads(alone)
    outs = alone.generate([{"prompt_token_ids": prompts[3]}], greedy(), lora_request=loras[3], use_tqdm=False)
    assert tokens(outs) == [want[3]] and len(uploads) == 1 and uploads[0].waited


def test_preemption_recomputes_without_changing_outputs(model_dir, adapters) -> None:
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    loras = [LoRARequest("a0", adapters["a0"]), None] * 4
    params = [greedy(20), SamplingParams(max_tokens=20, temperature=0.8, seed=7, ignore_eos=True)] * 4
    want = tokens(make_llm(model_dir, max_loras=2).generate(prompts, params, lora_request=loras, use_tqdm=False))
    # 14 blocks of 4 tokens cannot hold 8 sequences of up to 32 tokens: forces preemption
    small = make_llm(model_dir, max_loras=2, num_kv_blocks=14)
    outs = small.generate(prompts, params, lora_request=loras, use_tqdm=False)
    assert tokens(outs) == want
    assert sum(o.metrics["num_preemptions"] for o in outs) > 0
    assert small.engine.allocator.num_free == 14  # every block returned


def test_continuous_batching_new_requests_join_running_batch(model_dir) -> None:
    llm = make_llm(model_dir)
    eng = llm.engine
    eng.add_request({"prompt_token_ids": PROMPTS[0]}, greedy(10), request_id="first")
    eng.step()
    eng.step()
    eng.add_request({"prompt_token_ids": PROMPTS[1]}, greedy(10), request_id="second")
    sched_sizes = []
    done = {}
    while eng.has_unfinished_requests():
        sched_sizes.append(len(eng.scheduler.running) + len(eng.scheduler.waiting))
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    assert set(done) == {"first", "second"}
    assert max(sched_sizes) == 2
    alone = make_llm(model_dir).generate([{"prompt_token_ids": PROMPTS[1]}], greedy(10), use_tqdm=False)
    assert done["second"].outputs[0].token_ids == alone[0].outputs[0].token_ids


def test_mixed_steps_attend_like_separate_ones(model_dir) -> None:
    """Prefill chunks that join a batch of decodes (one attention call over the flat varlen layout, decodes
    first) give the same tokens and logprobs as each request alone."""
    eng = make_llm(model_dir).engine
    lp = dict(logprobs=2)
    for i in range(3):
        eng.add_request({"prompt_token_ids": PROMPTS[i]}, greedy(8, **lp), request_id=f"d{i}")
    eng.step()
    eng.step()
    for i in (3, 5):
        eng.add_request({"prompt_token_ids": PROMPTS[i]}, greedy(8, prompt_logprobs=2, **lp), request_id=f"p{i}")
    prepare, mixed = eng.runner.prepare, []

    def spy(seqs):
        batch = prepare(seqs)
        meta = batch.ctx.attn
        mixed.append(meta.num_decodes > 0 and meta.max_query_len > 1)
        return batch

    eng.runner.prepare = spy
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    assert mixed[0] and not mixed[1]  # the joining step was mixed, the next ones all decodes
    for rid, prompt in [("d0", 0), ("d1", 1), ("d2", 2), ("p3", 3), ("p5", 5)]:
        extra = dict(prompt_logprobs=2) if rid.startswith("p") else {}
        alone = make_llm(model_dir).generate([{"prompt_token_ids": PROMPTS[prompt]}], greedy(8, **lp, **extra),
                                             use_tqdm=False)[0]
        got = done[rid]
        assert got.outputs[0].token_ids == alone.outputs[0].token_ids, rid
        for a, b in zip(got.outputs[0].logprobs, alone.outputs[0].logprobs):
            assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-5 for t in a), rid
        for a, b in zip(got.prompt_logprobs or [], alone.prompt_logprobs or []):
            assert (a is None) == (b is None) and (a is None or all(abs(a[t] - b[t]) < 1e-5 for t in a)), rid


def test_seeded_sampling_is_reproducible_and_batch_independent(model_dir) -> None:
    llm = make_llm(model_dir)
    p = {"prompt_token_ids": PROMPTS[0]}
    sp = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    a = tokens(llm.generate([p], sp, use_tqdm=False))[0]
    others = [{"prompt_token_ids": q} for q in PROMPTS[1:5]]
    b = tokens(llm.generate(others + [p], [SamplingParams(max_tokens=16, temperature=1.0)] * 4 + [sp],
                            use_tqdm=False))[-1]
    assert a == b
    c = tokens(llm.generate([p], SamplingParams(max_tokens=16, temperature=1.0, seed=99, ignore_eos=True),
                            use_tqdm=False))[0]
    assert c != a
    # unseeded requests follow the engine seed: a new LLM with the same seed repeats them
    sp2 = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    x = tokens(make_llm(model_dir, seed=5).generate([p], sp2, use_tqdm=False))
    y = tokens(make_llm(model_dir, seed=5).generate([p], sp2, use_tqdm=False))
    assert x == y


def test_stop_token_ids_stop_strings_and_logprobs(model_dir) -> None:
    llm = make_llm(model_dir)
    p = {"prompt_token_ids": PROMPTS[0]}
    base = llm.generate([p], greedy(16, logprobs=3), use_tqdm=False)[0].outputs[0]
    assert len(base.logprobs) == 16
    for tok, lp in zip(base.token_ids, base.logprobs):
        assert tok in lp and len(lp) >= 3
        assert max(lp.values()) == pytest.approx(lp[tok])  # greedy picks the most likely token
    stop_id = base.token_ids[5]
    first = base.token_ids.index(stop_id)
    out = llm.generate([p], greedy(16, stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    text = base.text
    if len(text) > 6:
        stop = text[3:6]
        out = llm.generate([p], greedy(16, stop=[stop]), use_tqdm=False)[0].outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.text == text[:text.index(stop)]


def test_eos_from_model_folder_stops(model_dir) -> None:
    llm = make_llm(model_dir)
    eos = llm.get_tokenizer().eos_token_id
    assert eos in llm.engine.eos_token_ids
    p = {"prompt_token_ids": PROMPTS[0]}
    base = llm.generate([p], greedy(16), use_tqdm=False)[0].outputs[0]
    # force EOS by making it the only allowed next token through a stop id on the same token
    out = llm.generate([p], SamplingParams(max_tokens=16, temperature=0.0), use_tqdm=False)[0].outputs[0]
    if eos in base.token_ids:
        assert out.token_ids == base.token_ids[:base.token_ids.index(eos) + 1]
        assert out.finish_reason == "stop"
    else:
        assert out.finish_reason == "length"


def test_request_errors_are_clear_and_engine_keeps_serving(model_dir, adapters) -> None:
    llm = make_llm(model_dir, max_model_len=32)
    vocab = llm.engine.vocab_size
    good = {"prompt_token_ids": PROMPTS[0]}
    with pytest.raises(InvalidRequestError, match=rf"outside the vocabulary \[0, {vocab}\)"):
        llm.generate([good, {"prompt_token_ids": [1, vocab + 5]}], greedy(), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="max_model_len is 32"):
        llm.generate({"prompt_token_ids": list(range(1, 40))}, greedy(), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate({"prompt_token_ids": []}, greedy(), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="unknown adapter 'nope'"):
        llm.generate(good, greedy(), lora_request="nope", use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="temperature"):
        llm.generate(good, SamplingParams(temperature=-1.0), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="2 entries for 1 prompts"):
        llm.generate(good, [greedy(), greedy()], use_tqdm=False)
    with pytest.raises(AdapterError, match="does not exist|not found|missing"):
        llm.generate(good, greedy(), lora_request=LoRARequest("ghost", "/nonexistent/adapter"), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()  # nothing left half-added
    out = llm.generate([good, good], greedy(4), lora_request=[LoRARequest("a0", adapters["a0"]), None], use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 4 for o in out)
    # max_tokens is clipped to max_model_len
    out = llm.generate({"prompt_token_ids": list(range(1, 30))}, greedy(50), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].finish_reason == "length"


def test_add_remove_list_loras(model_dir, adapters) -> None:
    llm = make_llm(model_dir, max_loras=2)
    llm.add_lora(LoRARequest("x", adapters["a1"]))
    llm.add_lora(LoRARequest("x", adapters["a1"]))  # same name and path: no-op
    with pytest.raises(AdapterError, match="already registered"):
        llm.add_lora(LoRARequest("x", adapters["a2"]))
    assert llm.list_loras() == ["x"]
    p = {"prompt_token_ids": PROMPTS[2]}
    by_name = tokens(llm.generate(p, greedy(), lora_request="x", use_tqdm=False))
    by_req = tokens(llm.generate(p, greedy(), lora_request=LoRARequest("x", adapters["a1"]), use_tqdm=False))
    assert by_name == by_req
    llm.remove_lora("x")
    assert llm.list_loras() == []
    with pytest.raises(InvalidRequestError, match="unknown adapter"):
        llm.generate(p, greedy(), lora_request="x", use_tqdm=False)
    assert llm.engine.pool.device_resident == [None, None]
    with pytest.raises(AdapterError, match="not registered"):
        llm.remove_lora("x")


def test_string_prompts_and_progress_bar(model_dir, capsys) -> None:
    llm = make_llm(model_dir)
    outs = llm.generate(["The quick brown fox", "Once upon a time"], greedy(4))
    tok = llm.get_tokenizer()
    assert outs[0].prompt == "The quick brown fox"
    assert outs[0].prompt_token_ids == tok("The quick brown fox")["input_ids"]
    assert outs[1].outputs[0].text == tok.decode(outs[1].outputs[0].token_ids, skip_special_tokens=True)
    assert "generate" in capsys.readouterr().err


def test_chat_uses_the_folders_template(model_dir) -> None:
    llm = make_llm(model_dir)
    msgs = [{"role": "user", "content": "hello there"}]
    out = llm.chat(msgs, greedy(4), use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    want = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert out.prompt_token_ids == list(want)
    assert out.prompt_token_ids[0] == tok.bos_token_id
    direct = llm.generate({"prompt_token_ids": list(want)}, greedy(4), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == direct.outputs[0].token_ids


def test_max_num_seqs_bounds_the_running_batch(model_dir) -> None:
    llm = make_llm(model_dir, max_num_seqs=3)
    eng = llm.engine
    for i, p in enumerate(PROMPTS):
        eng.add_request({"prompt_token_ids": p}, greedy(6), request_id=str(i))
    finished = set()
    while eng.has_unfinished_requests():
        outs = eng.step()
        assert len(eng.scheduler.running) <= 3
        finished |= {o.request_id for o in outs if o.finished}
    assert finished == {str(i) for i in range(len(PROMPTS))}


def test_sharded_checkpoint_loads_identically(model_dir, tmp_path) -> None:
    hf = load_base_model(model_dir)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / f).write_bytes((Path(model_dir) / f).read_bytes())
    p = [{"prompt_token_ids": q} for q in PROMPTS[:3]]
    a = tokens(make_llm(model_dir).generate(p, greedy(8), use_tqdm=False))
    b = tokens(make_llm(str(sharded)).generate(p, greedy(8), use_tqdm=False))
    assert a == b


def test_bad_model_folder_errors(tmp_path) -> None:
    from loraplex import ModelLoadError

    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(str(tmp_path / "missing"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        LLM(str(tmp_path / "empty"), device="cpu")


def test_adapter_folder_vanishing_fails_only_its_requests(model_dir, adapters, tmp_path) -> None:
    import shutil

    doomed = tmp_path / "doomed"
    shutil.copytree(adapters["a1"], doomed)
    llm = make_llm(model_dir, max_loras=1, max_cpu_loras=1)
    llm.add_lora(LoRARequest("keep", adapters["a0"]))
    llm.add_lora(LoRARequest("doomed", str(doomed)))  # evicts "keep" from host memory (capacity 1)
    llm.generate({"prompt_token_ids": PROMPTS[0]}, greedy(2), lora_request="keep", use_tqdm=False)  # evicts "doomed"
    shutil.rmtree(doomed)
    eng = llm.engine
    running = eng.add_request({"prompt_token_ids": PROMPTS[1]}, greedy(4), "keep")
    eng.step()
    with pytest.raises(AdapterError, match="doomed"):
        eng.add_request({"prompt_token_ids": PROMPTS[0]}, greedy(4), "doomed")
    done = {}
    while eng.has_unfinished_requests():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert len(done[running].outputs[0].token_ids) == 4
    with pytest.raises(AdapterError, match="doomed"):
        llm.generate({"prompt_token_ids": PROMPTS[0]}, greedy(2), lora_request="doomed", use_tqdm=False)
    assert len(llm.generate({"prompt_token_ids": PROMPTS[0]}, greedy(2), use_tqdm=False)[0].outputs[0].token_ids) == 2


def test_inflight_requests_keep_their_adapter_version(model_dir, adapters) -> None:
    """Reload or unload while a request runs: it finishes with the weights it started with."""
    p = {"prompt_token_ids": PROMPTS[0]}
    ref = make_llm(model_dir, max_loras=2)
    want_a1 = tokens(ref.generate(p, greedy(8), lora_request=LoRARequest("x", adapters["a1"]), use_tqdm=False))[0]
    want_a2 = tokens(ref.generate(p, greedy(8), lora_request=LoRARequest("y", adapters["a2"]), use_tqdm=False))[0]
    assert want_a1 != want_a2

    llm = make_llm(model_dir, max_loras=2)
    eng = llm.engine
    llm.add_lora(LoRARequest("x", adapters["a1"]))
    first = eng.add_request(p, greedy(8), "x")
    eng.step()
    eng.add_lora(LoRARequest("x", adapters["a2"]), reload=True)  # same name, new weights
    second = eng.add_request(p, greedy(8), "x")
    eng.step()
    llm.remove_lora("x")  # unload while both run
    assert llm.list_loras() == []
    done = {}
    while eng.has_unfinished_requests():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert done[first].outputs[0].token_ids == want_a1
    assert done[second].outputs[0].token_ids == want_a2
    assert eng.pool.device_resident == [None, None]  # stale versions freed once unused


def test_versions_and_pinning(model_dir, adapters, tmp_path) -> None:
    """name@version names one version: after a reload the new version serves plain name requests, and the
    previous one stays servable as name@old; a pinned adapter keeps its slot and is never evicted."""
    llm = make_llm(model_dir, max_loras=2, max_cpu_loras=2)
    eng = llm.engine
    p = [{"prompt_token_ids": PROMPTS[0]}]
    llm.add_lora(LoRARequest("x", adapters["a0"]))
    v0 = eng.pool.version_of("x")
    assert len(v0) == 12
    first = tokens(llm.generate(p, greedy(), lora_request="x", use_tqdm=False))
    eng.add_lora(LoRARequest("x", adapters["a1"]), reload=True)
    v1 = eng.pool.version_of("x")
    assert v1 != v0 and eng.pool.versions_of("x") == [v1, v0]
    want1 = tokens(llm.generate(p, greedy(), lora_request=LoRARequest("a1", adapters["a1"]), use_tqdm=False))
    assert tokens(llm.generate(p, greedy(), lora_request="x", use_tqdm=False)) == want1 != first
    assert tokens(llm.generate(p, greedy(), lora_request=f"x@{v0}", use_tqdm=False)) == first
    assert tokens(llm.generate(p, greedy(), lora_request=f"x@{v1}", use_tqdm=False)) == want1
    with pytest.raises(AdapterError, match=r"adapter 'x' has no version 'feedbeef0000'; versions: \['"):
        llm.generate(p, greedy(), lora_request="x@feedbeef0000", use_tqdm=False)

    # pinning: "x" keeps a slot while four other adapters pass through the other one
    llm.pin_lora("x")
    slot = eng.pool.device_resident.index("x")
    loads = eng.pool.num_slot_loads
    for n in ["a2", "a3", "a4", "a5"]:
        llm.generate(p, greedy(), lora_request=LoRARequest(n, adapters[n]), use_tqdm=False)
    assert eng.pool.device_resident[slot] == "x" and "x" in eng.pool.host_resident
    assert tokens(llm.generate(p, greedy(), lora_request="x", use_tqdm=False)) == want1
    assert eng.pool.num_slot_loads == loads + 4  # x never reloaded
    with pytest.raises(AdapterError, match="must stay for the other adapters"):
        llm.pin_lora("a5")
    llm.unpin_lora("x")
    with pytest.raises(AdapterError, match="'x' is not pinned"):
        llm.unpin_lora("x")


def test_an_adapter_never_starves_behind_a_stream_of_others(model_dir, adapters) -> None:
    """One slot, a steady stream of requests for adapter a0, and one request for a1: after STARVATION_ROUNDS
    rounds the a0 requests stop joining the slot, it drains, and a1 gets it while a0 requests still arrive;
    every output stays what it is alone."""
    from loraplex.engine.scheduler import STARVATION_ROUNDS

    llm = make_llm(model_dir, max_loras=1, max_num_seqs=8)
    eng = llm.engine
    for n in ("a0", "a1"):
        llm.add_lora(LoRARequest(n, adapters[n]))
    params = greedy(6)
    eng.add_request({"prompt_token_ids": PROMPTS[0]}, params, "a0", "first")
    eng.step()
    eng.add_request({"prompt_token_ids": PROMPTS[1]}, params, "a1", "cold")
    started, outs, i = None, {}, 0
    for step in range(4 * STARVATION_ROUNDS):
        eng.add_request({"prompt_token_ids": PROMPTS[2 + i % 4]}, params, "a0", f"warm{i}")  # one a step
        i += 1
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
        if started is None and eng.requests.get("cold") is not None and eng.requests["cold"].num_computed_tokens:
            started = step
        if "cold" in outs:
            break
    assert started is not None and started < 2 * STARVATION_ROUNDS  # not after the stream ends
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
    alone = make_llm(model_dir, max_loras=2)
    want = tokens(alone.generate([{"prompt_token_ids": PROMPTS[1]}], params,
                                 lora_request=LoRARequest("a1", adapters["a1"]), use_tqdm=False))
    assert outs["cold"] == want[0]


def test_slot_uploads_wait_only_for_the_steps_that_read_the_slot(model_dir, adapters) -> None:
    """On CUDA each step marks the slots it reads with an event; an upload into a slot (and the clears of slots
    evicted for its memory) waits for those events only, not for every step queued, so a slot unused for a while
    loads at once. Here the marks are made by hand (a CPU engine records none) and the events the uploads are
    given are checked."""
    llm = make_llm(model_dir, max_loras=1)
    pool = llm.engine.pool
    calls = []
    real = pool.lora_model.set_slot

    def spy(slot, adapter, after=None):
        calls.append((slot, adapter.name if adapter is not None else None, after))
        return real(slot, adapter, after)

    pool.lora_model.set_slot = spy
    for n in ("a0", "a1"):
        llm.add_lora(LoRARequest(n, adapters[n]))
    llm.generate([{"prompt_token_ids": PROMPTS[0]}], greedy(2), lora_request=LoRARequest("a0", adapters["a0"]),
                 use_tqdm=False)
    assert calls == [(0, "a0", [])]  # an empty slot: nothing to wait for
    pool.mark_used({0}, "step-7")  # stands for the event of the last step that read slot 0
    llm.generate([{"prompt_token_ids": PROMPTS[1]}], greedy(2), lora_request=LoRARequest("a1", adapters["a1"]),
                 use_tqdm=False)
    assert calls[1:] == [(0, "a1", ["step-7"])]  # a0 evicted: a1's copy waits for the step that read a0
    pool.mark_used({0}, "step-9")
    llm.remove_lora("a1")  # frees the slot: the clear waits for its last reader too
    assert calls[2:] == [(0, None, ["step-9"])]


def test_a_copy_that_completes_while_nothing_runs_admits_its_request(model_dir, adapters) -> None:
    """A request passed over because its adapter's copy was in flight, in a step where nothing else runs, is
    admitted the next step when the copy completes before the engine checks for loads (fast copies on an idle
    GPU): not failed as 'no progress'. A CPU engine copies at once, so the copy's event here is one whose first
    query says 'in flight' and every later one 'done'."""
    llm = make_llm(model_dir, max_loras=1)
    pool = llm.engine.pool
    real = pool.lora_model.set_slot

    class Event:
        queries = 0

        def query(self) -> bool:
            self.queries += 1
            return self.queries > 1

        def synchronize(self) -> None:
            pass

    pool.lora_model.set_slot = lambda slot, adapter, after=None: (real(slot, adapter, after), Event())[1]
    llm.add_lora(LoRARequest("a0", adapters["a0"]))
    out = llm.generate([{"prompt_token_ids": PROMPTS[0]}], greedy(3), lora_request=LoRARequest("a0", adapters["a0"]),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3 and pool.num_slot_loads == 1


def test_admit_loading_hands_out_a_slot_whose_copy_is_in_flight(monkeypatch) -> None:
    """By default a request waits until the host sees its adapter's copy into a slot done; with
    LORAPLEX_ADMIT_LOADING=1 it gets the slot at once, with the copy's event (``load_event``) for its step to
    wait on, on the device. The load is counted once and its completion noted when the event is done."""
    from types import SimpleNamespace

    from loraplex.lora.pool import LoRAPool

    class Event:  # a CUDA event the test completes by hand
        def __init__(self) -> None:
            self.done = False

        def query(self) -> bool:
            return self.done

    events: list[Event] = []

    def set_slot(slot, adapter, after=None):
        events.append(Event())
        return events[-1]

    model = SimpleNamespace(num_slots=2, fits=lambda adapter, freed: True, set_slot=set_slot)
    a, b = SimpleNamespace(uid=1, name="a"), SimpleNamespace(uid=2, name="b")

    monkeypatch.delenv("LORAPLEX_ADMIT_LOADING", raising=False)
    pool = LoRAPool(model, 2, 8, 4)
    assert pool.acquire(a) is None and pool.acquire(a) is None  # copying: the request waits
    assert len(events) == 1 and pool.num_slot_loads == 1
    events[0].done = True
    slot = pool.acquire(a)
    assert slot is not None and pool.load_event(slot) is None and pool.slot_refcount(slot) == 1

    monkeypatch.setenv("LORAPLEX_ADMIT_LOADING", "1")
    pool = LoRAPool(model, 2, 8, 4)
    slot = pool.acquire(b)
    assert slot is not None and pool.load_event(slot) is events[-1] and pool.slot_refcount(slot) == 1
    assert pool.acquire(b) == slot and pool.num_slot_loads == 1  # a second request: the same copy
    pool.poll()
    assert pool.load_event(slot) is events[-1]
    events[-1].done = True
    pool.poll()
    assert pool.load_event(slot) is None
    assert [e[:2] for e in pool.drain_events()] == [("b", "load")]

    # =next: not in the round that started the copy, but from the next one, still copying (the step waits on
    # the device for an event that has usually completed by then)
    monkeypatch.setenv("LORAPLEX_ADMIT_LOADING", "next")
    pool = LoRAPool(model, 2, 8, 4)
    assert pool.waits_on_device and not pool.admit_loading
    pool.new_round()
    assert pool.acquire(a) is None and pool.acquire(a) is None  # the round that started the copy
    pool.new_round()
    slot = pool.acquire(a)
    assert slot is not None and pool.load_event(slot) is events[-1] and pool.num_slot_loads == 1
    events[-1].done = True
    pool.poll()
    assert pool.load_event(slot) is None
    pool.new_round()
    assert pool.acquire(b) is None  # a new copy: its own round again
    assert len(events) == 4 and pool.acquire(a) == slot  # a is resident: a plain hit

    monkeypatch.setenv("LORAPLEX_ADMIT_LOADING", "yes")
    with pytest.raises(ValueError, match="LORAPLEX_ADMIT_LOADING='yes': expected one of 0, 1, next"):
        LoRAPool(model, 2, 8, 4)


def test_step_trace_writes_a_line_per_step(model_dir, tmp_path, monkeypatch) -> None:
    """LORAPLEX_STEP_TRACE: every engine step appends one JSON line saying what it launched; the lines add up to
    the work done (every prompt token once, every sampled token but the last fed back, every request finished
    once), chunked prompts show as prompt chunks, and the CPU's steps as eager. A path that cannot be opened
    stops the engine naming the variable."""
    import json

    path = tmp_path / "steps.jsonl"
    monkeypatch.setenv("LORAPLEX_STEP_TRACE", str(path))
    llm = make_llm(model_dir, max_num_batched_tokens=16, max_num_seqs=4)
    n = 5
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], greedy(n), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == n for o in outs)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows and {"t_s", "unix_s", "wall_ms", "host_ms", "seqs", "tokens", "prompt_chunks", "forward",
                     "finished"} <= set(rows[0])
    assert sum(r["tokens"] for r in rows) == sum(map(len, PROMPTS)) + len(PROMPTS) * (n - 1)
    assert sum(r["finished"] for r in rows) == len(PROMPTS)
    assert all(r["tokens"] <= 16 and r["seqs"] <= 4 for r in rows)
    assert any(r["prompt_chunks"] for r in rows) and rows[-1]["prompt_chunks"] == 0  # decodes alone at the end
    assert all(r["forward"] == "eager" for r in rows if r["seqs"])
    assert [r["t_s"] for r in rows] == sorted(r["t_s"] for r in rows)
    assert abs(rows[-1]["unix_s"] - rows[0]["unix_s"] - (rows[-1]["t_s"] - rows[0]["t_s"])) < 1e-3
    assert all(r["wall_ms"] >= 0 and r["host_ms"] >= 0 for r in rows)
    monkeypatch.setenv("LORAPLEX_STEP_TRACE", str(tmp_path / "missing" / "steps.jsonl"))
    with pytest.raises(ValueError, match="LORAPLEX_STEP_TRACE=.*missing.*cannot open it"):
        make_llm(model_dir)
