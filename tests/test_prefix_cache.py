"""Prefix caching keyed by adapter content: outputs equal runs without it, never shared across adapters."""

from __future__ import annotations

import pytest

from helpers import make_adapter, make_tiny_model
from loraplex import LLM, LoRARequest, SamplingParams

PREFIX = [7, 19, 23, 101, 5, 6, 88, 41, 42, 43, 44, 45, 200, 201, 13, 12, 11, 10, 9, 8, 77, 78, 79, 80, 81]
SUFFIXES = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, 12, 13, 14, 15, 16], [17, 18]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    model_dir = make_tiny_model(root / "model", family="llama")
    adapters = {
        "a": make_adapter(model_dir, root / "a", seed=1, r=4, target_modules=["q_proj", "v_proj"]),
        "b": make_adapter(model_dir, root / "b", seed=2, r=8, target_modules="all-linear"),
        "emb": make_adapter(model_dir, root / "emb", seed=3, r=4, target_modules=["embed_tokens", "k_proj"]),
    }
    return model_dir, adapters


def make(model_dir, caching: bool, **kw) -> LLM:
    args = dict(dtype="float32", device="cpu", max_loras=3, max_lora_rank=16, num_kv_blocks=128, block_size=4,
                seed=0, enable_prefix_caching=caching)
    args.update(kw)
    return LLM(model_dir, **args)


def run(llm: LLM, adapters: dict, names: list, prompts: list, **params) -> list:
    p = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=1, **params)
    outs = llm.generate([{"prompt_token_ids": q} for q in prompts], p, use_tqdm=False,
                        lora_request=[LoRARequest(n, adapters[n]) if n else None for n in names])
    return [(o.outputs[0].token_ids, [lp[t] for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)],
             o.prompt_logprobs) for o in outs]


def assert_same(got: list, want: list) -> None:
    for (gt, glp, gp), (wt, wlp, wp) in zip(got, want):
        assert gt == wt
        assert max(abs(a - b) for a, b in zip(glp, wlp)) < 1e-4
        if wp is not None:
            for g, w in zip(gp[1:], wp[1:]):
                assert all(abs(g[k] - w[k]) < 1e-4 for k in w)


NAMES = [None, "a", "b", "a", None, "emb"]
PROMPTS = [PREFIX + s for s in SUFFIXES]


def test_cached_prefixes_give_the_same_outputs(setup) -> None:
    model_dir, adapters = setup
    want = run(make(model_dir, False), adapters, NAMES, PROMPTS)
    llm = make(model_dir, True)
    alloc = llm.engine.allocator
    first = run(llm, adapters, NAMES, PROMPTS)  # one batch: nothing cached yet at admission
    assert_same(first, want)
    assert alloc.num_cached > 0
    hits = alloc.hit_tokens
    again = run(llm, adapters, NAMES, PROMPTS)  # every request finds its own prefix
    assert_same(again, want)
    assert alloc.hit_tokens - hits >= len(PROMPTS) * (len(PREFIX) // 4) * 4
    # a later request reuses the blocks of requests that finished (shared prefix, new suffix), and outputs of
    # requests whose generated tokens were cached too (the same prompt again)
    later = run(llm, adapters, ["a", "b"], [PREFIX + [99, 98], PROMPTS[1]])
    assert_same(later, run(make(model_dir, False), adapters, ["a", "b"], [PREFIX + [99, 98], PROMPTS[1]]))


def test_no_block_is_shared_across_adapters(setup, tmp_path) -> None:
    """A prefix cached under one adapter is never read under another or under the base model; the same adapter
    content registered under a second name shares its blocks."""
    import shutil

    model_dir, adapters = setup
    llm = make(model_dir, True)
    alloc = llm.engine.allocator
    run(llm, adapters, ["a"], [PREFIX + [1]])
    for name in (None, "b", "emb"):
        before = alloc.hit_tokens
        run(llm, adapters, [name], [PREFIX + [2]])
        assert alloc.hit_tokens == before, name
    twin = tmp_path / "a_twin"
    shutil.copytree(adapters["a"], twin)
    before = alloc.hit_tokens
    got = run(llm, {**adapters, "a_twin": str(twin)}, ["a_twin"], [PREFIX + [3]])
    assert alloc.hit_tokens - before == (len(PREFIX) // 4) * 4
    assert_same(got, run(make(model_dir, False), adapters, ["a"], [PREFIX + [3]]))


def test_reloaded_adapter_never_reads_its_old_blocks(setup) -> None:
    model_dir, adapters = setup
    llm = make(model_dir, True)
    run(llm, adapters, ["a"], [PREFIX + [1]])
    llm.engine.add_lora(LoRARequest("a", adapters["b"]), reload=True)  # new weights under the same name
    before = llm.engine.allocator.hit_tokens
    got = run(llm, {"a": adapters["b"]}, ["a"], [PREFIX + [1]])
    assert llm.engine.allocator.hit_tokens == before
    assert_same(got, run(make(model_dir, False), adapters, ["b"], [PREFIX + [1]]))


def test_eviction_and_preemption_under_memory_pressure(setup) -> None:
    """A cache too small for every prefix: cached blocks are evicted (LRU) and running requests preempted;
    outputs stay those of runs without caching."""
    model_dir, adapters = setup
    prompts = [[i * 3 + 1] * 5 + PREFIX[: 12 + i] for i in range(6)] * 2
    names = (NAMES * 2)[:len(prompts)]
    want = run(make(model_dir, False, num_kv_blocks=24), adapters, names, prompts)
    llm = make(model_dir, True, num_kv_blocks=24)
    got = run(llm, adapters, names, prompts)
    assert_same(got, want)
    got = run(llm, adapters, names, prompts)
    assert_same(got, want)
    assert llm.engine.allocator.evictions > 0


def test_prompt_logprobs_of_a_cached_prefix(setup) -> None:
    """Requests asking for prompt logprobs recompute every position (and still fill the cache)."""
    model_dir, adapters = setup
    want = run(make(model_dir, False), adapters, NAMES, PROMPTS, prompt_logprobs=2)
    llm = make(model_dir, True)
    run(llm, adapters, NAMES, PROMPTS)
    assert_same(run(llm, adapters, NAMES, PROMPTS, prompt_logprobs=2), want)


def test_block_hash_depends_on_everything_before() -> None:
    from loraplex.engine.kv_cache import BlockAllocator, block_hash

    h1 = block_hash(None, [1, 2, 3, 4], None)
    assert h1 == block_hash(None, [1, 2, 3, 4], None)
    assert h1 != block_hash(None, [1, 2, 3, 5], None)
    assert h1 != block_hash(None, [1, 2, 3, 4], b"adapter")
    assert block_hash(h1, [5, 6, 7, 8], None) != block_hash(block_hash(None, [0, 2, 3, 4], None), [5, 6, 7, 8], None)
    alloc = BlockAllocator(4, 4, enable_caching=True)
    blocks = alloc.allocate(2)
    first = blocks[0]
    alloc.commit(first, h1)
    alloc.free(blocks)
    assert alloc.num_free == 4 and alloc.num_cached == 1
    assert alloc.lookup([h1, b"other"]) == [first] and alloc.num_free == 3
    alloc.free([first])
    alloc.allocate(4)  # takes the free blocks first, then evicts the cached one
    assert alloc.evictions == 1 and alloc.num_cached == 0 and alloc.lookup([h1]) == []


def test_metrics_in_llm_and_server(setup) -> None:
    import httpx

    from server_harness import ENGINE_KW, Server

    model_dir, adapters = setup
    llm = make(model_dir, True)
    run(llm, adapters, ["a", "a"], [PREFIX + [1], PREFIX + [2]])
    run(llm, adapters, ["a"], [PREFIX + [3]])
    m = llm.get_metrics()
    assert m["prefix_cache_hit_tokens"] == (len(PREFIX) // 4) * 4 and m["prefix_cache_blocks"] > 0
    assert 0 < m["prefix_cache_hit_rate"] < 1 and m["prefix_cache_queried_tokens"] == 3 * (len(PREFIX) + 1)

    s = Server(model_dir, {"a": adapters["a"]}, engine_kw=ENGINE_KW)
    try:
        c = s.client()
        prompt = " ".join(["once upon a time"] * 8)
        for _ in range(2):
            c.completions.create(model="a", prompt=prompt, max_tokens=2, temperature=0)
        text = httpx.get(s.url + "/metrics").text
        values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                  if line.startswith("loraplex_prefix_cache")}
        assert values["loraplex_prefix_cache_hits_total"] > 0 and values["loraplex_prefix_cache_blocks"] > 0
        assert values["loraplex_prefix_cache_queries_total"] > values["loraplex_prefix_cache_hits_total"]
        assert values["loraplex_prefix_cache_evictions_total"] == 0
    finally:
        s.stop()
