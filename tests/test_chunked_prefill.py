"""Chunked prefill: a small per-step token budget splits prompts into chunks that share steps with running
decodes. Outputs (greedy and seeded tokens, output and prompt logprobs) must equal an unchunked engine's; a
long prompt must not pause the other requests' streams; preemption of partially prefilled requests, images
(never split across chunks) and the configuration checks are covered too."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers import make_adapter, make_tiny_model
from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.config import SchedulerConfig
from loraplex.engine.kv_cache import BlockAllocator
from loraplex.engine.scheduler import Scheduler

BUDGET = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("chunked") / "model", family="llama")


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory) -> dict[str, LoRARequest]:
    root = tmp_path_factory.mktemp("chunked-adapters")
    targets = {"qv": ["q_proj", "v_proj"], "mlp": ["gate_proj", "down_proj", "o_proj"],
               "emb": ["k_proj", "embed_tokens", "lm_head"]}
    return {n: LoRARequest(n, make_adapter(model_dir, root / n, seed=20 + i, r=4, target_modules=t))
            for i, (n, t) in enumerate(targets.items())}


def make_llm(model_dir: str, chunked: bool, **kw) -> LLM:
    args = dict(dtype="float32", device="cpu", max_lora_rank=8, max_loras=4, num_kv_blocks=256, block_size=4,
                seed=0, max_num_seqs=BUDGET)
    if chunked:
        args.update(enable_chunked_prefill=True, max_num_batched_tokens=BUDGET)
    else:
        args.update(enable_chunked_prefill=False)
    args.update(kw)
    return LLM(model_dir, **args)


def record_steps(llm: LLM) -> list[list[tuple[str, int, int]]]:
    """Wrap the scheduler so every step's (request id, start, new tokens) are kept."""
    sched = llm.engine.scheduler
    steps: list[list[tuple[str, int, int]]] = []
    inner = sched.schedule

    def schedule():
        out = inner()
        steps.append([(s.req.request_id, s.start, s.num_new_tokens) for s in out.seqs])
        return out

    sched.schedule = schedule
    return steps


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (n,), generator=g).tolist()


LENGTHS = [23, 5, 40, 13, 8, 31, 9, 17]


def assert_same_logprobs(got, want) -> None:
    assert (got is None) == (want is None)
    if got is None:
        return
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is None:
            continue
        assert list(g) == list(w)  # chosen token first, then the same top tokens in the same order
        for tok in w:
            # float32 sums in another order: an unchunked engine alone differs by up to 1.7e-5 (7.5e-6 relative)
            # between batch compositions (one request at a time vs all together); chunked runs by 2.3e-5 (1.1e-5
            # relative). A wrong position, KV entry or logits row shows up as 1e-2 or more.
            assert g[tok] == pytest.approx(w[tok], rel=3e-5, abs=1e-5)


def assert_same_outputs(got, want) -> None:
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids, g.request_id
        assert_same_logprobs(g.outputs[0].logprobs, w.outputs[0].logprobs)
        assert_same_logprobs(g.prompt_logprobs, w.prompt_logprobs)


def test_mixed_batch_with_adapters_matches_unchunked(model_dir, adapters) -> None:
    prompts = [{"prompt_token_ids": prompt(n, i)} for i, n in enumerate(LENGTHS)]
    names = [None, "qv", "mlp", None, "emb", "qv", None, "mlp"]
    loras = [adapters[n] if n else None for n in names]
    params = [SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=3) for _ in LENGTHS]
    params[3] = SamplingParams(max_tokens=10, temperature=0.9, top_k=20, seed=11, ignore_eos=True, logprobs=1)
    params[5] = SamplingParams(max_tokens=10, temperature=0.7, seed=5, ignore_eos=True)
    want = make_llm(model_dir, chunked=False).generate(prompts, params, lora_request=loras, use_tqdm=False)
    llm = make_llm(model_dir, chunked=True)
    steps = record_steps(llm)
    got = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    assert_same_outputs(got, want)
    assert all(sum(n for _, _, n in step) <= BUDGET for step in steps)
    firsts = {}  # request id -> its first chunk's length
    for step in steps:
        for rid, start, n in step:
            if start == 0:
                firsts.setdefault(rid, n)
    assert any(n < LENGTHS[int(rid)] for rid, n in firsts.items())  # prompts were really chunked


def test_prompt_logprobs_gathered_across_chunks(model_dir, adapters) -> None:
    # 17 = 8 + 8 + 1 (the last chunk is one token), 9 = 8 + 1, 16 = 8 + 8, 30 spans four chunks
    lengths = [17, 9, 16, 30, 2, 1]
    prompts = [{"prompt_token_ids": prompt(n, 100 + i)} for i, n in enumerate(lengths)]
    loras = [adapters["emb"], None, adapters["qv"], None, adapters["mlp"], None]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=4, logprobs=2)
    want = make_llm(model_dir, chunked=False).generate(prompts, params, lora_request=loras, use_tqdm=False)
    # one request at a time, so chunk boundaries fall where the comment says
    solo = make_llm(model_dir, chunked=True, max_num_seqs=1)
    got = [solo.generate([p], params, lora_request=lr, use_tqdm=False)[0] for p, lr in zip(prompts, loras)]
    assert_same_outputs(got, want)
    for o, n in zip(got, lengths):
        assert len(o.prompt_logprobs) == n and o.prompt_logprobs[0] is None
    together = make_llm(model_dir, chunked=True).generate(prompts, params, lora_request=loras, use_tqdm=False)
    assert_same_outputs(together, want)


def test_streamed_prompt_logprobs_arrive_whole_with_the_first_token(model_dir) -> None:
    llm = make_llm(model_dir, chunked=True)
    eng = llm.engine
    eng.output_kind = "delta"
    p = prompt(29, 7)
    eng.add_request({"prompt_token_ids": p}, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True,
                                                            prompt_logprobs=1), request_id="r")
    deltas = []
    while eng.has_unfinished_requests():
        deltas.extend(eng.step())
    assert [len(d.new_token_ids) for d in deltas] == [1, 1, 1, 1]  # no empty delta for a prompt chunk
    assert len(deltas[0].prompt_logprobs) == len(p) and deltas[0].prompt_token_ids == p
    assert all(d.prompt_logprobs is None for d in deltas[1:])


def test_long_prompt_does_not_pause_running_decodes(model_dir, adapters) -> None:
    llm = make_llm(model_dir, chunked=True, max_num_seqs=4)
    eng = llm.engine
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    eng.add_request({"prompt_token_ids": prompt(6, 1)}, greedy, request_id="a")
    eng.add_request({"prompt_token_ids": prompt(5, 2)}, greedy, lora_name=None, request_id="b")
    eng.add_lora(adapters["qv"])
    eng.add_request({"prompt_token_ids": prompt(4, 3)}, greedy, lora_name="qv", request_id="c")
    produced = {"a": 0, "b": 0, "c": 0}
    while min(produced.values()) == 0:
        for o in eng.step():
            produced[o.request_id] = len(o.outputs[0].token_ids)
    long_prompt = prompt(70, 4)
    eng.add_request({"prompt_token_ids": long_prompt}, SamplingParams(max_tokens=2, temperature=0.0,
                                                                      ignore_eos=True), request_id="long")
    steps = record_steps(llm)
    while True:
        before = dict(produced)
        outs = {o.request_id: o for o in eng.step()}
        step = steps[-1]
        assert sum(n for _, _, n in step) <= BUDGET
        for rid in ("a", "b", "c"):  # every running stream advances by exactly one token each step
            assert len(outs[rid].outputs[0].token_ids) == before[rid] + 1, (rid, len(steps))
            produced[rid] += 1
        if "long" in outs:
            break
    # 70 prompt tokens at 8 - 3 = 5 per step: 14 steps, the last of which gives the first token
    assert len(steps) == 14
    assert [n for st in steps for rid, _, n in st if rid == "long"] == [5] * 14
    # the long prompt's output is the one it gets alone, unchunked
    rest = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            rest[o.request_id] = o
    alone = make_llm(model_dir, chunked=False).generate(
        [{"prompt_token_ids": long_prompt}], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
        use_tqdm=False)
    assert rest["long"].outputs[0].token_ids == alone[0].outputs[0].token_ids


def test_preemption_of_chunked_prompts_keeps_outputs(model_dir, adapters) -> None:
    lengths = [14, 11, 21, 9, 18, 12]
    prompts = [{"prompt_token_ids": prompt(n, 200 + i)} for i, n in enumerate(lengths)]
    loras = [adapters["qv"], None, adapters["mlp"], None, adapters["emb"], adapters["qv"]]
    params = [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=2),
              SamplingParams(max_tokens=16, temperature=0.8, seed=3, ignore_eos=True)] * 3
    want = make_llm(model_dir, chunked=False).generate(prompts, params, lora_request=loras, use_tqdm=False)
    # 12 blocks of 4 tokens hold fewer than all six sequences at once: decodes preempt the newest requests
    small = make_llm(model_dir, chunked=True, num_kv_blocks=12, max_num_seqs=6)
    sched = small.engine.scheduler
    partial: list[tuple[str, int]] = []  # (request id, computed tokens) of preempted partial prefills
    inner = sched._preempt

    def preempt(req, out):
        if 0 < req.num_computed_tokens < len(req.prompt_token_ids):
            partial.append((req.request_id, req.num_computed_tokens))
        inner(req, out)

    sched._preempt = preempt
    got = small.generate(prompts, params, lora_request=loras, use_tqdm=False)
    assert_same_outputs(got, want)
    assert sum(o.metrics["num_preemptions"] for o in got) > 0
    assert partial  # some request was preempted between two chunks of its prompt
    assert small.engine.allocator.num_free == 12  # every block returned
    assert not sched.running and not sched.waiting


def test_abort_between_chunks_frees_everything(model_dir, adapters) -> None:
    llm = make_llm(model_dir, chunked=True, num_kv_blocks=32)
    eng = llm.engine
    eng.add_lora(adapters["mlp"])
    eng.add_request({"prompt_token_ids": prompt(30, 9)}, SamplingParams(max_tokens=4), lora_name="mlp",
                    request_id="long")
    assert eng.step() == [] and eng.step() == []  # two chunks of the prompt: no output yet
    req = eng.requests["long"]
    slot = req.slot
    assert req.num_computed_tokens == 2 * BUDGET and len(req.block_table) == 2 * BUDGET // 4
    assert slot >= 0 and eng.pool.slot_refcount(slot) == 1
    eng.abort_request("long")
    assert not eng.has_unfinished_requests()
    assert eng.allocator.num_free == 32 and eng.pool.slot_refcount(slot) == 0 and req.slot == -1


# ---- images ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory) -> str:
    from vlm_helpers import make_tiny_vlm

    return make_tiny_vlm(tmp_path_factory.mktemp("chunked-vlm") / "model", family="qwen2_vl")


def test_images_are_never_split_and_outputs_match_unchunked(vlm_dir) -> None:
    from vlm_helpers import image_prompt, make_image

    images = {"a": make_image(1, 32, 32), "b": make_image(2, 24, 40), "c": make_image(3, 40, 16)}
    requests = [("{image}Describe the robot", ["a"]), ("Look at {image} please", ["b"]),
                ("Compare {image} and {image} now", ["a", "c"]), ("The storm came from the west", []),
                ("{image}{image} two boats", ["b", "c"])]
    prompts = []
    for template, names in requests:
        p: dict = {"prompt": image_prompt(vlm_dir, template)}
        if names:
            p["multi_modal_data"] = {"image": [images[n] for n in names]}
        prompts.append(p)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    common = dict(dtype="float32", device="cpu", max_loras=2, max_lora_rank=8, seed=0, num_kv_blocks=256,
                  block_size=4, max_num_seqs=4)
    want = LLM(vlm_dir, enable_chunked_prefill=False, **common).generate(prompts, params, use_tqdm=False)
    # 4 and 8: smaller than every image block (blocks that start a chunk go whole, past the budget);
    # 20: larger than each block (a chunk that would cut one ends before it)
    for budget in (4, 8, 20):
        llm = LLM(vlm_dir, enable_chunked_prefill=True, max_num_batched_tokens=budget, **common)
        steps = record_steps(llm)
        image_blocks: dict[str, list[tuple[int, int]]] = {}
        inner_add = llm.engine.scheduler.add

        def add(req):
            images = req.mm.images if req.mm is not None else []
            image_blocks[req.request_id] = [(im.offset, im.offset + im.length) for im in images]
            inner_add(req)

        llm.engine.scheduler.add = add
        got = llm.generate(prompts, params, use_tqdm=False)
        assert_same_outputs(got, want)
        assert sum(map(len, image_blocks.values())) == 6
        spans: dict[str, list[tuple[int, int]]] = {}
        for step in steps:
            for rid, start, n in step:
                spans.setdefault(rid, []).append((start, start + n))
        for rid, chunks in spans.items():
            for first, last in image_blocks[rid]:  # each image lies inside one chunk; no chunk cuts one
                assert any(a <= first and last <= b for a, b in chunks), (budget, rid, first)
                assert not any(a < last and first < b and not (a <= first and last <= b) for a, b in chunks)
        firsts = {first for blocks in image_blocks.values() for first, _ in blocks}
        moved = any(b in firsts and b - a < budget for chunks in spans.values() for a, b in chunks)
        past = any(sum(n for _, _, n in step) > budget for step in steps)
        assert moved and past == (budget < 10), budget  # the smallest image block has 10 positions
        lengths = [len(o.prompt_token_ids) for o in got]
        assert any(len(c) > 1 and c[0][1] < lengths[int(r)] for r, c in spans.items())  # chunked


def test_chunk_len_moves_before_or_extends_over_an_image() -> None:
    sched = Scheduler(BlockAllocator(64, 4), None, max_num_seqs=4, max_num_batched_tokens=8, chunked_prefill=True)
    mm = SimpleNamespace(images=[SimpleNamespace(offset=5, length=6), SimpleNamespace(offset=12, length=3)])

    def req(computed: int) -> SimpleNamespace:
        return SimpleNamespace(num_computed_tokens=computed, num_tokens=30, block_table=[], mm=mm)

    assert sched._chunk_len(req(0), 8) == 5  # [0, 8) would cut image [5, 11): stop before it
    assert sched._chunk_len(req(0), 4) == 4  # ends before the image
    assert sched._chunk_len(req(5), 4) == 6  # the image starts the chunk: it goes whole, past the budget
    assert sched._chunk_len(req(5), 8) == 7  # [5, 13) would cut [12, 15): stop at 12
    assert sched._chunk_len(req(11), 2) == 1  # [11, 13) cuts [12, 15): one text token
    assert sched._chunk_len(req(11), 0) == 0
    assert sched._chunk_len(req(15), 100) == 15  # to the end of the sequence
    full = Scheduler(BlockAllocator(2, 4), None, max_num_seqs=4, max_num_batched_tokens=8, chunked_prefill=True)
    assert full._chunk_len(req(5), 8) == 0  # the image [5, 11) needs 3 blocks of 4 tokens; only 2 exist
    assert full._chunk_len(req(0), 8) == 5
    assert full._chunk_len(req(0), 4) == 4


def test_long_prefill_token_threshold_caps_each_chunk(model_dir, adapters) -> None:
    """vLLM's ``long_prefill_token_threshold``: with a budget of 64 tokens a step, a 70-token prompt still
    prefills at most 7 tokens a step (first-come prompts included), beside decodes that advance every step;
    every output equals the unchunked run's."""
    llm = make_llm(model_dir, chunked=True, max_num_batched_tokens=64, long_prefill_token_threshold=7)
    assert llm.engine.scheduler.long_prefill_token_threshold == 7
    prompts = [{"prompt_token_ids": prompt(n, i)} for i, n in enumerate([70, 5, 20])]
    names = [None, "qv", "mlp"]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2)
    steps = record_steps(llm)
    got = llm.generate(prompts, params, lora_request=[adapters[n] if n else None for n in names],
                       use_tqdm=False)
    chunks = [(rid, n) for st in steps for rid, start, n in st if start < (70, 5, 20)[int(rid)]]
    assert max(n for _, n in chunks) == 7  # capped, though the budget had room for more
    assert [n for rid, n in chunks if rid == "0"] == [7] * 10
    want = make_llm(model_dir, chunked=False).generate(prompts, params,
                                                       lora_request=[adapters[n] if n else None for n in names],
                                                       use_tqdm=False)
    assert_same_outputs(got, want)
    with pytest.raises(ValueError, match="long_prefill_token_threshold must be >= 0, got -1"):
        SchedulerConfig(long_prefill_token_threshold=-1)


# ---- configuration ---------------------------------------------------------------------------------------

def test_config_validation_and_defaults(model_dir) -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= 1"):
        SchedulerConfig(max_num_batched_tokens=0)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(8\) must be >= max_num_seqs \(16\)"):
        SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=16)
    SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=16, enable_chunked_prefill=False)  # decodes unbounded
    assert SchedulerConfig().enable_chunked_prefill
    with pytest.raises(ValueError, match="without chunked prefill"):
        LLM(model_dir, device="cpu", num_kv_blocks=64, enable_chunked_prefill=False, max_num_batched_tokens=100)
    llm = LLM(model_dir, device="cpu", num_kv_blocks=64, max_num_batched_tokens=100)  # < max_model_len 256: fine
    assert llm.engine.max_num_batched_tokens == 100 and llm.engine.scheduler.chunked_prefill
    assert LLM(model_dir, device="cpu", num_kv_blocks=64).engine.max_num_batched_tokens == 2048
    assert LLM(model_dir, device="cpu", num_kv_blocks=64,
               max_num_seqs=3000).engine.max_num_batched_tokens == 3000
    off = LLM(model_dir, device="cpu", num_kv_blocks=64, enable_chunked_prefill=False)
    assert off.engine.max_num_batched_tokens == 2048 and not off.engine.scheduler.chunked_prefill


def test_cli_flag() -> None:
    from loraplex.config import config_fields

    f = dict((f.name, f) for _, f in config_fields())["enable_chunked_prefill"]
    assert f.default is True and "chunk" in f.metadata["help"]
