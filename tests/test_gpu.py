"""The same engine on a CUDA device: float32 parity with PEFT on the GPU, and
bfloat16 / float16 runs that stay close to the float32 reference."""

from __future__ import annotations

import pytest
import torch

from helpers import load_peft_model, make_tiny_model
from loraplex import LLM, LoRARequest, SamplingParams
from test_parity import ADAPTERS, NEW_TOKENS, PROMPTS, build_adapters

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    root = tmp_path_factory.mktemp("gpu")
    model_dir = make_tiny_model(root / "model", family="qwen2", tie_word_embeddings=True)
    return model_dir, build_adapters(model_dir, root)


def _run(model_dir, paths, dtype):
    llm = LLM(model_dir, dtype=dtype, device="cuda", max_loras=2, max_lora_rank=16, num_kv_blocks=64, block_size=4)
    params = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0.0, prompt_logprobs=0)
    loras = [LoRARequest(a, paths[a]) if a else None for a in ADAPTERS]
    return llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, lora_request=loras, use_tqdm=False)


def _reference_logprobs(model_dir, paths, dtype=torch.float32):
    ref = load_peft_model(model_dir, paths).to(device="cuda", dtype=dtype)
    out = []
    with torch.no_grad():
        for p, a in zip(PROMPTS, ADAPTERS):
            ids = torch.tensor([p], device="cuda")
            out.append(ref(input_ids=ids, adapter_names=[a or "__base__"]).logits[0].float().log_softmax(-1).cpu())
    return ref, out


def test_float32_cuda_matches_peft(setup) -> None:
    model_dir, paths = setup
    outs = _run(model_dir, paths, "float32")
    ref, logps = _reference_logprobs(model_dir, paths)
    with torch.no_grad():
        for p, a, o, lp in zip(PROMPTS, ADAPTERS, outs, logps):
            for i in range(1, len(p)):
                assert o.prompt_logprobs[i][p[i]] == pytest.approx(lp[i - 1, p[i]].item(), abs=1e-4)
            ids = torch.tensor([p], device="cuda")
            want = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=[a or "__base__"],
                                do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
            assert o.outputs[0].token_ids == want[0, len(p):].tolist(), a


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_no_worse_than_peft(setup, dtype) -> None:
    """In half precision loraplex may differ from float32 by rounding, but by no more than PEFT does."""
    model_dir, paths = setup
    _, exact = _reference_logprobs(model_dir, paths)
    _, peft_half = _reference_logprobs(model_dir, paths, getattr(torch, dtype))
    outs = _run(model_dir, paths, dtype)
    for p, o, lp, lp_half in zip(PROMPTS, outs, exact, peft_half):
        ours = max(abs(o.prompt_logprobs[i][p[i]] - lp[i - 1, p[i]].item()) for i in range(1, len(p)))
        theirs = max(abs(lp_half[i - 1, p[i]].item() - lp[i - 1, p[i]].item()) for i in range(1, len(p)))
        assert ours <= 2 * theirs + 0.02, (dtype, ours, theirs)


class _CudaReference:
    """The PEFT reference model on the GPU, taking and returning CPU tensors."""

    def __init__(self, model) -> None:
        self.model = model.cuda()

    @staticmethod
    def _to_cuda(kw: dict) -> dict:
        return {k: v.cuda() if torch.is_tensor(v) else v for k, v in kw.items()}

    def __call__(self, **kw):
        out = self.model(**self._to_cuda(kw))
        out.logits = out.logits.float().cpu()
        return out

    def generate(self, **kw):
        gen = self.model.generate(**self._to_cuda(kw))
        gen.sequences = gen.sequences.cpu()
        gen.logits = tuple(x.float().cpu() for x in gen.logits)
        return gen

    def set_adapter(self, name: str) -> None:
        self.model.set_adapter(name)

    def disable_adapter(self):
        return self.model.disable_adapter()


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_vlm_mixed_batch_on_cuda_matches_peft(family, tmp_path, monkeypatch) -> None:
    """The VLM parity test of test_vlm.py with loraplex and the PEFT reference both on the GPU."""
    import test_vlm
    from vlm_helpers import make_tiny_vlm

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False  # the vision towers' patch convolutions run in cuDNN
    base_args = dict(dtype="float32", device="cuda", max_loras=4, max_lora_rank=8, seed=0, num_kv_blocks=256,
                     block_size=4)
    monkeypatch.setattr(test_vlm, "make_llm", lambda d, **kw: LLM(d, **{**base_args, **kw}))
    monkeypatch.setattr(test_vlm, "load_peft_model", lambda d, paths: _CudaReference(load_peft_model(d, paths)))
    model_dir = make_tiny_vlm(tmp_path / "model", family=family)
    test_vlm.test_mixed_batch_matches_peft((family, model_dir, test_vlm.build_adapters(model_dir, family, tmp_path)))


# ---- CUDA graphs --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def graph_setup(tmp_path_factory):
    """The model and adapters of test_cuda_graph: plain LoRA, DoRA and LoRA bias, all in graph steps."""
    from test_cuda_graph import build_graph_case

    return build_graph_case(tmp_path_factory.mktemp("gpu-graphs"))


GRAPH_ARGS = dict(device="cuda", max_lora_rank=16, max_loras=3, num_kv_blocks=64, block_size=4, seed=0,
                  max_num_seqs=8)


def test_graph_replay_equals_eager_over_changing_mixes(graph_setup) -> None:
    from test_cuda_graph import assert_same, run_mixes

    torch.backends.cuda.matmul.allow_tf32 = False
    model_dir, adapters = graph_setup
    # the reference: eager steps of the torch backend (DoRA and LoRA bias applied per segment, not in the kernels)
    want, _ = run_mixes(LLM(model_dir, dtype="float32", enforce_eager=True, lora_backend="torch", **GRAPH_ARGS),
                        adapters, use_graphs=False)
    llm = LLM(model_dir, dtype="float32", **GRAPH_ARGS)
    graphs = llm.engine.runner.graphs
    # max_num_batched_tokens 2,048 (the default): mixed graphs to 2,048 tokens, every 64 up to 512
    assert graphs is not None and graphs.sizes == [1, 2, 4, 8]
    assert graphs.mixed_sizes == [16, 32, 64, 128, 192, 256, 320, 384, 448, 512, 1024, 2048]
    assert len(graphs._graphs) == 32  # decode and mixed sizes, with and without LoRA
    got, sizes = run_mixes(llm, adapters, use_graphs=True, capture=True)
    assert_same(got, want, sizes)


@pytest.mark.parametrize("switch", ["LORAPLEX_LORA_OVERLAP=0", "LORAPLEX_GRAPH_CUBLASLT_TOKENS=0"])
def test_graph_variants_equal_eager(graph_setup, monkeypatch, switch) -> None:
    """Graphs captured another way give the same logprobs as eager steps of the torch backend, over changing
    adapter mixes in decode and mixed graphs: LORAPLEX_LORA_OVERLAP=0 (each shrink after the base GEMM on one
    stream, where the default runs it on a side stream beside the GEMM, forked and joined inside the graphs);
    LORAPLEX_GRAPH_CUBLASLT_TOKENS=0 (every graph captured with cuBLAS's GEMMs, where the default captures
    those of up to 64 tokens with cuBLASLt's; the library setting is restored once captured either way)."""
    from test_cuda_graph import assert_same, run_mixes

    torch.backends.cuda.matmul.allow_tf32 = False
    model_dir, adapters = graph_setup
    want, _ = run_mixes(LLM(model_dir, dtype="float32", enforce_eager=True, lora_backend="torch", **GRAPH_ARGS),
                        adapters, use_graphs=False)
    name, value = switch.split("=")
    monkeypatch.setenv(name, value)
    library = torch.backends.cuda.preferred_blas_library()
    llm = LLM(model_dir, dtype="float32", **GRAPH_ARGS)
    backend = llm.engine.pool.lora_model.modules[0].wrapper.backend
    if name == "LORAPLEX_LORA_OVERLAP":
        assert not backend.overlap
    assert torch.backends.cuda.preferred_blas_library() == library
    got, sizes = run_mixes(llm, adapters, use_graphs=True, capture=True)
    assert_same(got, want, sizes)


def test_enforce_eager_captures_nothing(graph_setup) -> None:
    model_dir, _ = graph_setup
    assert LLM(model_dir, dtype="bfloat16", enforce_eager=True, **GRAPH_ARGS).engine.runner.graphs is None


def test_capture_survives_an_engine_collected_during_it(graph_setup) -> None:
    """An engine dropped inside a reference cycle is garbage that only the cycle collector frees; if the
    collector ran during a later engine's graph capture, the dropped engine's graphs would be destroyed mid-
    capture, which CUDA forbids, and the capture fail (seen on an H200 when a test left its engine behind).
    The capture collects first and keeps the collector off until it is done."""
    import gc

    model_dir, _ = graph_setup
    old = LLM(model_dir, dtype="bfloat16", **GRAPH_ARGS)
    old.engine.cycle = old  # only the cycle collector can free it now
    del old
    saved = gc.get_threshold()
    gc.set_threshold(1)  # without the fix, a collection would start within the first capture
    try:
        new = LLM(model_dir, dtype="bfloat16", **GRAPH_ARGS)
    finally:
        gc.set_threshold(*saved)
    out = new.generate([{"prompt_token_ids": [5, 17, 33]}], SamplingParams(max_tokens=4, temperature=0.0),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4 and new.engine.runner.graphs.replays > 0


def test_decode_step_does_not_synchronise(graph_setup) -> None:
    """A decode step (graph replay with adapters, greedy and seeded top-p sampling, logprobs) makes no
    synchronising call but the wait on its one result copy."""
    model_dir, adapters = graph_setup
    llm = LLM(model_dir, dtype="bfloat16", **GRAPH_ARGS)
    eng = llm.engine
    for name, path in adapters.items():
        llm.add_lora(LoRARequest(name, path))
    names = [None, "a0", "a1", "a2", "a0"]
    for i, name in enumerate(names):
        params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2 if i % 2 else None,
                                **(dict(temperature=0.0) if i % 2 else dict(temperature=0.8, top_p=0.9, seed=i)))
        eng.add_request({"prompt_token_ids": [5 + i, 17, 33, 99, 120]}, params, name, f"r{i}")
    eng.step()  # prefill
    eng.step()  # a first decode step: pinned-memory pools and kernels warm
    replays = []
    inner = eng.runner.graphs.run
    eng.runner.graphs.run = lambda seqs, *args: replays.append(len(seqs)) or inner(seqs, *args)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [eng.step() for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert replays == [5, 5, 5] and all(len(o) == 5 for o in outs)


def test_eager_step_does_not_synchronise(graph_setup, monkeypatch) -> None:
    """A step too large for the step graphs (a 700-token prompt beside decodes with adapters; the largest mixed
    graph here 512 tokens) runs eagerly, and it too makes no synchronising call: its inputs reach the device
    through pinned memory (a pageable copy waits for the queued steps, which cost the 1,000-adapter load 50-130
    ms in every such step)."""
    from loraplex.engine import cuda_graph

    MAX_MIXED_TOKENS = 512
    monkeypatch.setattr(cuda_graph, "MAX_MIXED_TOKENS", MAX_MIXED_TOKENS)  # read when the graphs are sized
    model_dir, adapters = graph_setup
    llm = LLM(model_dir, dtype="bfloat16", **{**GRAPH_ARGS, "num_kv_blocks": 1024})
    eng = llm.engine
    for name, path in adapters.items():
        llm.add_lora(LoRARequest(name, path))
    params = SamplingParams(max_tokens=16, ignore_eos=True, temperature=0.0)
    for i, name in enumerate([None, "a0", "a1"]):
        eng.add_request({"prompt_token_ids": [5 + i, 17, 33, 99]}, params, name, f"d{i}")
    eng.step()
    eng.step()
    steps = []  # (tokens, eager?) of each step
    prepare = eng.runner.prepare

    def traced(seqs):
        batch = prepare(seqs)
        steps.append((sum(s.num_new_tokens for s in seqs), batch.graph_seqs is None))
        return batch

    eng.runner.prepare = traced
    long_prompt = [(7 * i) % 250 + 3 for i in range(MAX_MIXED_TOKENS + 188)]  # a step past the largest graph
    eng.add_request({"prompt_token_ids": long_prompt}, params, "a2", "warm")
    eng.step()  # the first eager step: pinned-memory blocks of its sizes are allocated
    eng.add_request({"prompt_token_ids": long_prompt[::-1]}, params, "a1", "long")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = eng.step()
        outs += eng.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert steps[1][0] > 512 and steps[1][1] and not steps[2][1]  # the long prompt's step eager, the next a graph
    assert {o.request_id for o in outs} >= {"d0", "d1", "d2", "long"}


def test_kv_cache_sized_from_a_profile_and_no_compile_after_start(graph_setup) -> None:
    """Without num_kv_blocks, the KV cache gets what a profiled step leaves of gpu_memory_utilization; and once
    the engine has started, steps of any shape (decodes, short and long prompt chunks, prompt logprobs, with
    and without adapters, changing batch sizes) compile no Triton kernel: none waits for the compiler."""
    from loraplex.kernels.common import CompileWatch

    model_dir, adapters = graph_setup
    args = {k: v for k, v in GRAPH_ARGS.items() if k != "num_kv_blocks"}
    llm = LLM(model_dir, dtype="bfloat16", gpu_memory_utilization=0.5, max_model_len=2048, **args)
    prof = llm.engine.memory_profile
    assert prof is not None and prof["activation_bytes"] > 0 and prof["graph_reserve_bytes"] > 0
    assert prof["num_kv_blocks"] == llm.engine.runner.num_blocks == llm.engine.allocator.num_blocks
    # the tiny model's full batch needs far less than half an H200: the cache is what max_num_seqs can use
    assert prof["num_kv_blocks"] == 8 * (2048 // 4) + 1
    for name, path in adapters.items():
        llm.add_lora(LoRARequest(name, path))
    before = CompileWatch.compiles
    g = torch.Generator().manual_seed(5)
    for n_prompts, length in [(1, 3), (3, 17), (8, 40), (2, 130), (5, 9)]:
        prompts = [{"prompt_token_ids": torch.randint(3, 200, (length + i,), generator=g).tolist()}
                   for i in range(n_prompts)]
        loras = [LoRARequest(f"a{i % 3}", adapters[f"a{i % 3}"]) if i % 2 else None for i in range(n_prompts)]
        params = SamplingParams(max_tokens=6, ignore_eos=True, prompt_logprobs=1 if length == 17 else None)
        llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    # an eager step (a 700-token prompt chunk, past the mixed graphs' 512) holding the decode of a request whose
    # context is long enough for the split-K decode kernel
    eng = llm.engine
    eng.add_request({"prompt_token_ids": torch.randint(3, 200, (900,), generator=g).tolist()},
                    SamplingParams(max_tokens=8, ignore_eos=True), "a1", "long")
    eng.step()
    eng.add_request({"prompt_token_ids": torch.randint(3, 200, (700,), generator=g).tolist()},
                    SamplingParams(max_tokens=2, ignore_eos=True), None, "chunk")
    while eng.has_unfinished_requests():
        eng.step()
    assert CompileWatch.compiles == before


# ---- tensor parallelism on 2 and 4 GPUs (NCCL) ------------------------------------------------------------

@pytest.mark.parametrize("tp", [2, 4], ids=["tp2", "tp4"])
@pytest.mark.parametrize("family", ["llama", "qwen2-tied"])
def test_tensor_parallel_on_gpus_equals_one(family, tp, tmp_path) -> None:
    """LLM(tensor_parallel_size=2 and 4, as the host's GPUs allow) over NCCL, decode steps replaying CUDA graphs
    that hold the all-reduces (4 ranks: more than the llama config's 2 kv heads, replicated): float32 prompt
    logprobs, greedy tokens and their logprobs of a mixed batch (all-linear, lm_head and embed_tokens adapters,
    LoRA bias and DoRA on row-parallel layers, whose expand kernel works on each rank's partial sums before
    the all-reduce, a base request) equal to one GPU."""
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} CUDA devices, this host has {torch.cuda.device_count()}")
    from helpers import make_adapter
    from test_peft_features import redraw_magnitudes

    torch.backends.cuda.matmul.allow_tf32 = False
    if family == "llama":
        model_dir = make_tiny_model(tmp_path / "model", family="llama", num_key_value_heads=2)
    else:
        model_dir = make_tiny_model(tmp_path / "model", family="qwen2", tie_word_embeddings=True)
    adapters = {
        "lin": make_adapter(model_dir, tmp_path / "lin", seed=1, r=8, target_modules="all-linear"),
        "head": make_adapter(model_dir, tmp_path / "head", seed=2, r=4, target_modules=["q_proj", "lm_head", "down_proj"]),
        "emb": make_adapter(model_dir, tmp_path / "emb", seed=3, r=4, target_modules=["embed_tokens", "v_proj"]),
        "bias": make_adapter(model_dir, tmp_path / "bias", seed=4, r=8, lora_bias=True,
                             target_modules=["o_proj", "down_proj", "gate_proj"]),
        "dora": make_adapter(model_dir, tmp_path / "dora", seed=5, r=8, lora_alpha=16, use_dora=True,
                             target_modules=["o_proj", "down_proj", "q_proj"]),
    }
    redraw_magnitudes(adapters["dora"], 7)
    prompts = [[5, 17, 33, 99, 120, 7, 8, 250], [3, 4, 5, 6], [100, 101, 102, 103, 104, 105], [42, 43, 44, 45, 46],
               [9, 8, 7, 6, 5], [60, 61, 62]]
    names = [None, "lin", "head", "emb", "bias", "dora"]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, prompt_logprobs=0, logprobs=0)

    def run(tp: int) -> list:
        llm = LLM(model_dir, dtype="float32", device="cuda", num_kv_blocks=64, block_size=4, max_loras=5,
                  max_lora_rank=16, seed=0, tensor_parallel_size=tp)
        try:
            loras = [LoRARequest(n, adapters[n]) if n else None for n in names]
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=loras,
                                use_tqdm=False)
            assert llm.engine.runner.graphs.replays > 0  # decode steps replay CUDA graphs, NCCL inside them
            return [(list(o.outputs[0].token_ids), [list(lp.values())[0] for lp in o.prompt_logprobs[1:]],
                     [list(lp.values())[0] for lp in o.outputs[0].logprobs]) for o in outs]
        finally:
            llm.engine.shutdown()

    want, got = run(1), run(tp)
    for (wt, wl, wd), (gt, gl, gd) in zip(want, got):
        assert gt == wt
        assert max(abs(a - b) for a, b in zip(gl, wl)) < 5e-5
        assert max(abs(a - b) for a, b in zip(gd, wd)) < 5e-5


@pytest.mark.parametrize("admit", ["0", "1", "next"], ids=["host-gate", "admit-loading", "admit-next-round"])
def test_adapter_upload_overlaps_running_steps(graph_setup, monkeypatch, admit) -> None:
    """An adapter copied into a slot while requests decode (item 8 of issue 9): the copy runs on a side stream
    from pinned memory (no synchronising call on the host), its request waits until the copy is done (by
    default on the host; with LORAPLEX_ADMIT_LOADING=1 it joins the step that starts the copy, which waits for
    it on the device; with =next the step after), the running requests go on; tokens equal a run where the
    adapter was in its slot from the start."""
    monkeypatch.setenv("LORAPLEX_ADMIT_LOADING", admit)
    torch.backends.cuda.matmul.allow_tf32 = False
    model_dir, adapters = graph_setup
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    prompts = [[5, 17, 33, 99, 120], [3, 4, 5, 6, 7, 8], [100, 101, 102]]
    names = [None, "a0", "a1"]

    def run(late: bool) -> dict:
        llm = LLM(model_dir, dtype="float32", **GRAPH_ARGS)
        eng = llm.engine
        for n in ("a0", "a1"):
            llm.add_lora(LoRARequest(n, adapters[n]))
        if not late:  # both adapters in their slots before any request
            for n in ("a0", "a1"):
                slot = None
                while slot is None:
                    slot = eng.pool.acquire(eng.pool.get(n))
                eng.pool.release(slot)
        for i in range(2):
            eng.add_request({"prompt_token_ids": prompts[i]}, params, names[i], f"r{i}")
        eng.step()
        eng.step()
        eng.add_request({"prompt_token_ids": prompts[2]}, params, names[2], "r2")  # a1 is in no slot yet
        loads = eng.pool.num_slot_loads
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            outs = list(eng.step())
            joined = "r2" in {r.request_id for r in eng.scheduler.running}
            outs += list(eng.step())
            joined_next = "r2" in {r.request_id for r in eng.scheduler.running}
            outs += list(eng.step())
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert {o.request_id for o in outs} >= {"r0", "r1"}  # the running requests went on
        if late and admit == "1":
            assert joined  # admitted by the step that started its copy
        if late and admit == "next":
            assert joined_next  # admitted by the step after it, whether or not the host saw the copy done
        if late:
            assert eng.pool.num_slot_loads == loads + 1
        done = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    done[o.request_id] = list(o.outputs[0].token_ids)
        return done

    assert run(late=True) == run(late=False)


def test_slot_reuse_while_steps_are_in_flight_equals_each_alone(graph_setup) -> None:
    """One slot of memory, three adapters taking turns under async scheduling: each upload into the slot
    waits only for the last step that read it (the pool's per-slot events), never for every step queued; a
    request's tokens equal its run alone, so no upload overwrote weights a step in flight still read."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model_dir, adapters = graph_setup
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [[5, 17, 33, 99, 120], [3, 4, 5, 6, 7, 8], [100, 101, 102], [42, 43, 44, 45], [9, 8, 7]]
    names = ["a0", "a1", "a2", "a0", "a1"]
    args = {**GRAPH_ARGS, "max_loras": 1, "max_lora_rank": 16}
    llm = LLM(model_dir, dtype="float32", **args)
    assert llm.engine.async_scheduling
    loras = [LoRARequest(n, adapters[n]) for n in names]
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                         lora_request=loras, use_tqdm=False)]
    # the slot changed hands while steps were queued: at least once per adapter (the scheduler may run the two
    # requests of a0, or of a1, together)
    assert llm.engine.pool.num_slot_loads >= 3
    alone = LLM(model_dir, dtype="float32", **{**args, "max_loras": 3})  # every adapter keeps its own slot
    for p, lora, tokens in zip(prompts, loras, got):
        want = alone.generate([{"prompt_token_ids": p}], params, lora_request=lora, use_tqdm=False)
        assert tokens == want[0].outputs[0].token_ids, lora.name
