"""enable_lora_merging: steps whose every request uses one adapter run on weights with it merged in.

Against an engine without merging on the same weights: the same tokens and logprobs (float32, 1e-4) over
uniform batches, mixes with the base model and other adapters, and adapters that cannot be merged (LoRA on the
embedding and head, DoRA); the base weights restored bit for bit whenever a step is not all on the merged
adapter, and before any slot is written; two ranks merging in step.
"""

from __future__ import annotations

import pytest
import torch

from helpers import make_adapter, make_tiny_model
from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.lora.merge import MERGE_AFTER_STEPS
from test_cuda_graph import in_interpreter

# long enough that a merge runs more steps than it waited for (a shorter one doubles the next wait)
PARAMS = SamplingParams(max_tokens=2 * MERGE_AFTER_STEPS + 6, temperature=0.0, ignore_eos=True, logprobs=2)
PROMPTS = [[5, 17, 33, 99, 120, 7], [42, 43, 44], [60, 61, 62, 63, 64], [8, 9], [100, 101, 102, 103]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    model = make_tiny_model(root / "model")
    adapters = {
        "all": make_adapter(model, root / "all", seed=1, target_modules="all-linear"),
        "qv": make_adapter(model, root / "qv", seed=2, r=4),
        "head": make_adapter(model, root / "head", seed=3, target_modules=["q_proj", "embed_tokens", "lm_head"]),
        "dora": make_adapter(model, root / "dora", seed=4, target_modules=["v_proj", "down_proj"], use_dora=True),
    }
    kw = dict(dtype="float32", device="cpu", seed=0, max_loras=2, max_lora_rank=8, block_size=4, num_kv_blocks=256)
    merging = LLM(model, enable_lora_merging=True, **kw)
    plain = LLM(model, **kw)
    return merging, plain, {n: LoRARequest(n, p) for n, p in adapters.items()}


def _run(llm: LLM, names: list, reqs: dict) -> list:
    loras = [reqs[n] if n else None for n in names]
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:len(names)]], PARAMS, lora_request=loras,
                        use_tqdm=False)
    return [o.outputs[0] for o in outs]


def _assert_same(got: list, want: list) -> None:
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        for x, y in zip(g.logprobs, w.logprobs):
            assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-4 for t in x), (x, y)


def _weights(llm: LLM) -> list[torch.Tensor]:
    return [wm.wrapper.base_layer.weight for wm in llm.engine.merger.linears]


def test_uniform_batches_merge_and_match(setup) -> None:
    merging, plain, reqs = setup
    merger = merging.engine.merger
    before = merger.num_merges
    for names in (["all"] * 4, ["qv"] * 3, ["all", None, "qv", "all"], [None, None], ["all"] * 5):
        _assert_same(_run(merging, names, reqs), _run(plain, names, reqs))
    assert merger.num_merges >= before + 3  # each uniform batch ran long enough to merge its adapter
    # a step off the merged adapter restored W0 bit for bit before it ran
    merged_before = merging.get_metrics()
    _run(merging, [None], reqs)
    assert merger.merged is None
    after = merging.get_metrics()
    assert merged_before["lora_merged"] == 1.0 and after["lora_merged"] == 0.0
    assert after["lora_merges"] == merger.num_merges and after["lora_merge_restores"] == merged_before[
        "lora_merge_restores"] + 1
    assert all(torch.equal(w, w0) for w, w0 in zip(_weights(merging), merger.originals))


def test_a_mix_that_changes_often_stops_merging(tmp_path) -> None:
    """Merges restored before they ran MERGE_AFTER_STEPS steps double the wait for the next one; long merged
    runs halve it again, never below MERGE_AFTER_STEPS."""
    model = make_tiny_model(tmp_path / "model")
    reqs = {"all": LoRARequest("all", make_adapter(model, tmp_path / "all", seed=1, target_modules="all-linear"))}
    llm = LLM(model, dtype="float32", device="cpu", seed=0, max_loras=2, max_lora_rank=8, block_size=4,
              num_kv_blocks=256, enable_lora_merging=True)
    merger = llm.engine.merger

    def uniform(steps: int) -> None:  # one prefill step, then steps - 1 decodes, every row on "all"
        llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:2]],
                     SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True),
                     lora_request=reqs["all"], use_tqdm=False)

    def base() -> None:
        llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(max_tokens=1), use_tqdm=False)

    uniform(MERGE_AFTER_STEPS + 3)  # merged for 4 steps, then restored by the base step
    base()
    assert (merger.num_merges, merger.after_steps) == (1, 2 * MERGE_AFTER_STEPS)
    for _ in range(2):  # shorter than the wait now: no merge
        uniform(MERGE_AFTER_STEPS + 3)
        base()
    assert merger.num_merges == 1
    uniform(2 * MERGE_AFTER_STEPS + 4 * 2 * MERGE_AFTER_STEPS)  # merged for 4x the wait: it halves
    base()
    assert (merger.num_merges, merger.after_steps) == (2, MERGE_AFTER_STEPS)


def test_adapters_that_cannot_merge_run_as_lora(setup) -> None:
    merging, plain, reqs = setup
    merger = merging.engine.merger
    for name, why in (("head", "not linear"), ("dora", "DoRA or LoRA bias")):
        before = merger.num_merges
        _assert_same(_run(merging, [name] * 3, reqs), _run(plain, [name] * 3, reqs))
        assert merger.num_merges == before, name
        slot = merging.engine.pool.slot_of(merging.engine.pool.get(name))
        assert why in merger.blocker(slot)


def test_a_slot_write_restores_first(setup) -> None:
    """A slot load while an adapter is merged (a DoRA adapter's scales read the base weights) restores W0
    before the copy, and the merge's memory of which slots can merge is forgotten."""
    merging, plain, reqs = setup
    merger = merging.engine.merger
    _run(merging, ["all"] * 2, reqs)
    assert merger.merged is not None
    merging.engine.pool.lora_model.set_slot(merger.merged, None)  # what an eviction does
    assert merger.merged is None and not merger._mergeable
    assert all(torch.equal(w, w0) for w, w0 in zip(_weights(merging), merger.originals))
    _assert_same(_run(merging, ["dora"] * 2, reqs), _run(plain, ["dora"] * 2, reqs))


def test_config_errors() -> None:
    from loraplex.config import EngineConfig

    with pytest.raises(ValueError, match="enable_lora_merging merges adapters: it needs enable_lora"):
        EngineConfig.from_kwargs(model="m", enable_lora=False, enable_lora_merging=True)


def test_ranks_merge_in_step_under_tensor_parallelism(setup) -> None:
    """Two ranks (gloo): rank 0 decides, each step's plan carries the merged slot, and the other rank merges
    or restores its shard before the step: the outputs are one unmerged rank's."""
    _, plain, reqs = setup
    model = str(plain.engine.config.model_config.model)
    mixes = (["all"] * 4, ["all", None, "qv"], ["qv"] * 3, ["dora"] * 2)
    want = [_run(plain, names, reqs) for names in mixes]  # first: this process joins the ranks' group next
    llm = LLM(model, dtype="float32", device="cpu", seed=0, max_loras=2, max_lora_rank=8, block_size=4,
              num_kv_blocks=256, tensor_parallel_size=2, enable_lora_merging=True)
    try:
        for names, w in zip(mixes, want):
            _assert_same(_run(llm, names, reqs), w)
        assert llm.engine.merger.num_merges == 2
        # an engine built for one rank, stepped while this process belongs to the two ranks' group, would hang
        # in its first collective: it refuses instead
        with pytest.raises(RuntimeError, match="group now has 2 ranks, not the size this engine was built for"):
            _run(plain, ["all"], reqs)
    finally:
        llm.engine.shutdown()
    _assert_same(_run(plain, ["all"], reqs), want[0][:1])  # the group is gone: the one-rank engine runs again


@in_interpreter
def test_merged_graph_steps_replay_the_base_graphs(setup, tmp_path) -> None:
    """Graph steps (their buffers set up, their forward run eagerly: CPU) on the Triton backend: a merged step
    replays a graph of the base family (no LoRA kernel), and the outputs are what eager torch-backend steps
    without merging give."""
    _, plain, reqs = setup
    model = str(plain.engine.config.model_config.model)
    llm = LLM(model, dtype="float32", device="cpu", seed=0, max_loras=2, max_lora_rank=8, block_size=4,
              num_kv_blocks=256, max_num_seqs=8, lora_backend="triton", attention_backend="triton",
              enable_lora_merging=True)
    graphs = llm.engine.runner
    graphs.capture_graphs(lora=True, capture=False)
    families = []
    inner = graphs.graphs.run

    def run(seqs, *args):
        families.append(any(s.slot >= 0 for s in seqs))  # the LoRA family, or the base one
        return inner(seqs, *args)

    graphs.graphs.run = run
    for names in (["all"] * 3, ["all", None, "qv"]):
        _assert_same(_run(llm, names, reqs), _run(plain, names, reqs))
    assert llm.engine.merger.num_merges == 1
    # the uniform batch: LoRA graphs until the merge, base graphs after it
    first = families[:PARAMS.max_tokens]
    assert first[:MERGE_AFTER_STEPS - 1] == [True] * (MERGE_AFTER_STEPS - 1) and not any(first[MERGE_AFTER_STEPS:])


@pytest.mark.gpu  # tests/conftest.py skips it without CUDA
def test_merged_steps_in_captured_graphs(tmp_path) -> None:
    """On CUDA, with captured graphs and the Triton backend: merged steps (the base graphs over the merged
    weights) give what eager torch-backend steps without merging give, and a step off the adapter restores
    the weights bit for bit."""
    model = make_tiny_model(tmp_path / "model")
    reqs = {"all": LoRARequest("all", make_adapter(model, tmp_path / "all", seed=1, target_modules="all-linear")),
            "qv": LoRARequest("qv", make_adapter(model, tmp_path / "qv", seed=2, r=4))}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        kw = dict(dtype="float32", device="cuda", seed=0, max_loras=2, max_lora_rank=8, block_size=4,
                  num_kv_blocks=256, max_num_seqs=8)
        merging = LLM(model, enable_lora_merging=True, **kw)
        assert merging.engine.runner.graphs is not None
        plain = LLM(model, lora_backend="torch", enforce_eager=True, **kw)
        for names in (["all"] * 4, ["all", None, "qv"], ["qv"] * 2):
            _assert_same(_run(merging, names, reqs), _run(plain, names, reqs))
        merger = merging.engine.merger
        assert merger.num_merges == 2
        _run(merging, [None], reqs)
        assert all(torch.equal(w, w0) for w, w0 in zip(_weights(merging), merger.originals))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def test_merges_are_exported_as_prometheus_metrics() -> None:
    """The engine's merge figures (LLMEngine.cache_stats, forwarded by the engine process) in /metrics."""
    from prometheus_client import generate_latest

    from loraplex.server.metrics import ServerMetrics

    stats = {"lora_merges": 3.0, "lora_merge_restores": 2.0, "lora_merged": 1.0}
    m = ServerMetrics(lambda: stats)
    m._last = stats
    text = generate_latest(m.registry).decode()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith("loraplex_lora_merge")}
    assert values == {"loraplex_lora_merges_total": 3.0, "loraplex_lora_merge_restores_total": 2.0,
                      "loraplex_lora_merged": 1.0}


@pytest.mark.parametrize("scattered", [False, True])
def test_slices_read_a_slots_weights_from_any_pages(scattered) -> None:
    """The merge reads each slice's A and B of a slot from the stack's pages, a view when they run consecutively,
    gathered through the page table's device index when an eviction left them scattered (pages 0, 1 and 4)."""
    from types import SimpleNamespace

    from loraplex.lora.backends.base import LoRAStack, PageTable
    from loraplex.lora.merge import LoRAMerger

    g = torch.Generator().manual_seed(0)
    pages = PageTable(3, 7, 4, 12, 3, torch.device("cpu"))
    slices = (8, 4)  # two slices (a fused layer), 8 and 4 output rows
    stack = LoRAStack.zeros(2, 3, 12, 12, 16, slices, torch.float32, torch.device("cpu"), pages=pages)
    pages.assign(0, 8, False)  # pages 0, 1
    pages.assign(1, 8, False)  # pages 2, 3
    slot = 2
    if scattered:
        pages.release(0)  # frees 0, 1: a rank-12 adapter then takes 0, 1 and 4
    pages.assign(slot, 12, False)
    assert pages.pages_of(slot) == ([0, 1, 4] if scattered else [4, 5, 6])
    want = []
    col = 0
    for i, n in enumerate(slices):
        a, b = torch.randn(12, 16, generator=g), torch.randn(n, 12, generator=g)
        stack.write_a(slot, i, a)
        stack.write_b(slot, col, b)
        stack.set(slot, i, 12, 0.5 + i)
        want.append((col, n, b, a, 0.5 + i))
        col += n
    merger = LoRAMerger.__new__(LoRAMerger)
    merger.linears = [SimpleNamespace(wrapper=SimpleNamespace(active={slot}, stack=stack))]
    got = list(merger._slices(0, slot))
    assert len(got) == 2
    for (off, n, b, a, scale), (w_off, w_n, w_b, w_a, w_scale) in zip(got, want):
        assert (off, n, scale) == (w_off, w_n, w_scale)
        assert torch.equal(a, w_a) and torch.equal(b, w_b)
