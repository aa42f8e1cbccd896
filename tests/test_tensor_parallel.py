"""Tensor parallelism on CPU: ranks in a gloo group, each running the same engine on its shards.

Every rank schedules the same requests the same way (the scheduler is deterministic), so before the rank-0
scheduler and its broadcast exist (issue 10) the model's sharded layers and their LoRA can already be
compared with one rank: float32 prompt logprobs and greedy tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import pytest
import torch

from helpers import make_adapter, make_tiny_model
from tp_helpers import run_ranks

PROMPTS = [[5, 17, 33, 99, 120, 7, 8, 250], [3, 4, 5, 6], [100, 101, 102, 103, 104, 105], [42, 43, 44, 45, 46]]


def generate(rank: int, model_dir: str, adapters: dict[str, str], names: list, prompts: Optional[list] = None) -> tuple:
    from loraplex import LLM, LoRARequest, SamplingParams

    llm = LLM(model_dir, dtype="float32", device="cpu", num_kv_blocks=64, block_size=4, max_loras=3,
              max_lora_rank=16, seed=0)
    loras = {n: LoRARequest(n, p) for n, p in adapters.items()}
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, prompt_logprobs=0, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts or PROMPTS], params,
                        lora_request=[loras[n] if n else None for n in names], use_tqdm=False)
    from loraplex.distributed.parallel_state import get_tp_size

    model = llm.engine.model.model
    embed, head = model.embed_tokens, llm.engine.model.lm_head
    # (ranks, vocabulary rows of the base table, embedding LoRA A rows, lm_head LoRA B rows, kv heads), per rank
    shard = (get_tp_size(), embed.num_embeddings_per_partition, embed.lora_a_t.shape[1], head.lora_b[0].shape[1],
             model.layers[0].self_attn.num_kv_heads)
    return shard, [(list(o.outputs[0].token_ids),
                    [None if lp is None else list(lp.values())[0] for lp in o.prompt_logprobs]) for o in outs]


@pytest.fixture(scope="module", params=["llama", "qwen2-tied"])
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    if request.param == "llama":
        model_dir = make_tiny_model(root / "model", family="llama", num_key_value_heads=2)
    else:  # q/k/v bias, lm_head tied to the embedding
        model_dir = make_tiny_model(root / "model", family="qwen2", tie_word_embeddings=True)
    adapters = {
        "lin": make_adapter(model_dir, root / "lin", seed=1, r=8, target_modules="all-linear"),
        "head": make_adapter(model_dir, root / "head", seed=2, r=4, target_modules=["q_proj", "lm_head", "down_proj"]),
        "emb": make_adapter(model_dir, root / "emb", seed=3, r=4, target_modules=["embed_tokens", "v_proj"]),
    }
    return model_dir, adapters


@pytest.mark.parametrize("world", [2, 4])  # 4 ranks: more ranks than the model's 2 kv heads (replicated)
def test_sharded_engine_equals_one_rank(setup, world) -> None:
    model_dir, adapters = setup
    names = [None, "lin", "head", "emb"]
    ((_, vocab, _, _, kv_heads), want), = run_ranks(generate, 1, model_dir, adapters, names)
    got = run_ranks(generate, world, model_dir, adapters, names)
    for shard, rank_out in got:
        # each rank holds its share of the vocabulary, of the embedding's LoRA A and the lm_head's LoRA B rows
        # (1/N of them; A one zero row more), and of the kv heads (2 heads over 4 ranks: one each)
        tp, rows, emb_a, head_b, kv = shard
        assert tp == world and kv == max(1, kv_heads // world)
        assert rows * world >= vocab and rows * world - vocab < 64 * world  # padded to 64 rows a rank
        assert emb_a == rows + 1 and head_b == rows
        for (tokens, lps), (want_tokens, want_lps) in zip(rank_out, want):
            assert tokens == want_tokens
            # float32 partial sums of row-parallel layers add up in another order than one rank's matmul:
            # measured up to 2.3e-5 (Qwen2, 2 ranks) on logprobs of magnitude ~6; a wrong shard is off by >0.1
            diffs = [abs(a - b) for a, b in zip(lps, want_lps) if a is not None]
            assert all((a is None) == (b is None) for a, b in zip(lps, want_lps)) and max(diffs) < 5e-5, max(diffs)


def test_trainable_tokens_trained_tables_and_lora_bias_sharded_equal_one_rank(tmp_path) -> None:
    """Adapters with trainable tokens (embedding and head), their own trained embed_tokens / lm_head tables
    (modules_to_save) and LoRA bias, beside plain LoRA and a base request, on 2 ranks: the embedding applies
    tokens and tables to the reduced lookup, the head to this rank's vocabulary columns, column layers shard the
    bias with B; equal to one rank."""
    from test_peft_features import _perturb

    model_dir = make_tiny_model(tmp_path / "model", family="llama", num_key_value_heads=2)
    adapters = {
        "tok": make_adapter(model_dir, tmp_path / "tok", seed=1, r=4, target_modules=["q_proj", "o_proj"],
                            trainable_token_indices={"embed_tokens": [5, 17, 100, 101, 250],
                                                     "lm_head": [3, 8, 120, 200, 290]}),
        "saved": make_adapter(model_dir, tmp_path / "saved", seed=2, r=4, target_modules=["v_proj", "down_proj"],
                              modules_to_save=["lm_head", "embed_tokens"]),
        "bias": make_adapter(model_dir, tmp_path / "bias", seed=3, r=8, lora_bias=True, target_modules="all-linear"),
        "lin": make_adapter(model_dir, tmp_path / "lin", seed=4, r=8, target_modules="all-linear"),
    }
    _perturb(adapters["saved"], ("base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"), 5)
    names = ["tok", None, "saved", "bias"]
    ((_, _, _, _, _), want), = run_ranks(generate, 1, model_dir, adapters, names)
    ((_, _, _, _, _), plain), = run_ranks(generate, 1, model_dir, adapters, ["lin", None, "lin", "lin"])
    assert want[0][0] != plain[0][0] and want[2][0] != plain[2][0]  # the features change the tokens
    for _, rank_out in run_ranks(generate, 2, model_dir, adapters, names):
        for (tokens, lps), (want_tokens, want_lps) in zip(rank_out, want):
            assert tokens == want_tokens
            diffs = [abs(a - b) for a, b in zip(lps, want_lps) if a is not None]
            assert max(diffs) < 5e-5, max(diffs)


@pytest.mark.parametrize("world", [2, 4])
def test_dora_sharded_equals_one_rank(tmp_path, world) -> None:
    """DoRA on every linear layer, the embedding and the head, beside plain LoRA and a base request: column
    layers and the head compute their norms locally; row-parallel layers and the embedding sum partial squared
    norms over the ranks (one all-reduce at the start of the step after the load); equal to one rank."""
    from test_peft_features import redraw_magnitudes

    model_dir = make_tiny_model(tmp_path / "model", family="llama", num_key_value_heads=2)
    adapters = {
        "dora": make_adapter(model_dir, tmp_path / "dora", seed=1, r=8, lora_alpha=16, use_dora=True,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj", "embed_tokens", "lm_head"]),
        "lin": make_adapter(model_dir, tmp_path / "lin", seed=4, r=8, target_modules="all-linear"),
    }
    redraw_magnitudes(adapters["dora"], 7)
    names = ["dora", None, "lin", "dora"]
    ((_, _, _, _, _), want), = run_ranks(generate, 1, model_dir, adapters, names)
    for _, rank_out in run_ranks(generate, world, model_dir, adapters, names):
        for (tokens, lps), (want_tokens, want_lps) in zip(rank_out, want):
            assert tokens == want_tokens
            diffs = [abs(a - b) for a, b in zip(lps, want_lps) if a is not None]
            assert max(diffs) < 5e-5, max(diffs)


def test_added_tokens_sharded_equal_one_rank(tmp_path) -> None:
    """An adapter trained with added tokens (its embedding and head resized and saved whole) on 2 ranks: prompts
    holding its new ids read its embedding rows after the all-reduce, and its logits widen past the gathered
    vocabulary; equal to one rank (which test_peft_features checks against PEFT), base requests unaffected."""
    from test_peft_features import make_added_tokens_adapter

    model_dir = make_tiny_model(tmp_path / "model", family="llama", num_key_value_heads=2)
    adapters = {"added": make_added_tokens_adapter(model_dir, tmp_path / "added", seed=1, boost=3.0)}
    prompts = [[5, 17, 301, 99, 305, 7], [3, 4, 5, 6], [300, 301, 302, 100]]
    names = ["added", None, "added"]
    ((_, _, _, _, _), want), = run_ranks(generate, 1, model_dir, adapters, names, prompts)
    assert max(want[0][0] + want[2][0]) >= 300 and max(want[1][0]) < 300  # its own tokens; base never
    for _, rank_out in run_ranks(generate, 2, model_dir, adapters, names, prompts):
        for (tokens, lps), (want_tokens, want_lps) in zip(rank_out, want):
            assert tokens == want_tokens
            diffs = [abs(a - b) for a, b in zip(lps, want_lps) if a is not None]
            assert max(diffs) < 5e-5, max(diffs)


def generate_vlm(rank: int, model_dir: str, adapters: dict[str, str], requests: list) -> list:
    from loraplex import LLM, LoRARequest, SamplingParams
    from vlm_helpers import image_prompt, make_image

    llm = LLM(model_dir, dtype="float32", device="cpu", max_loras=3, max_lora_rank=8, seed=0, num_kv_blocks=256,
              block_size=4)
    images = {"a": make_image(1, 32, 32), "b": make_image(2, 24, 40)}
    prompts, loras = [], []
    for template, names, lora in requests:
        p: dict = {"prompt": image_prompt(model_dir, template)}
        if names:
            p["multi_modal_data"] = {"image": [images[n] for n in names]}
        prompts.append(p)
        loras.append(LoRARequest(lora, adapters[lora]) if lora else None)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), [None if lp is None else list(lp.values())[0] for lp in o.prompt_logprobs])
            for o in outs]


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_sharded_vlm_with_images_and_embedding_lora_equals_one_rank(family, tmp_path) -> None:
    from test_vlm import build_adapters
    from vlm_helpers import make_tiny_vlm

    model_dir = make_tiny_vlm(tmp_path / "model", family=family)
    adapters = build_adapters(model_dir, family, tmp_path)
    requests = [("{image}Describe the robot", ["a"], "emb"), ("Look at {image} please", ["b"], "vision"),
                ("The storm came from the west", [], None), ("{image}{image} two boats", ["a", "b"], "all")]
    (want,) = run_ranks(generate_vlm, 1, model_dir, adapters, requests)
    for rank_out in run_ranks(generate_vlm, 2, model_dir, adapters, requests):
        for (tokens, lps), (want_tokens, want_lps) in zip(rank_out, want):
            assert tokens == want_tokens
            diffs = [abs(a - b) for a, b in zip(lps, want_lps) if a is not None]
            assert all((a is None) == (b is None) for a, b in zip(lps, want_lps)) and max(diffs) < 5e-5, max(diffs)


# ---- the engine's own ranks: LLM(tensor_parallel_size=N) ------------------------------------------------

@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_llm_tensor_parallel_size_equals_one_rank(setup, async_scheduling) -> None:
    """The engine starts the other ranks itself and sends them each step's plan; adapters loaded on rank 0
    follow to every rank. With async scheduling a step is planned before the previous one's tokens reach the
    host: every rank reads them on the device, from rank 0's broadcast after its sampling."""
    from loraplex import LLM, LoRARequest, SamplingParams

    model_dir, adapters = setup
    names = [None, "lin", "head", "emb"]
    ((_, _, _, _, _), want), = run_ranks(generate, 1, model_dir, adapters, names)
    llm = LLM(model_dir, dtype="float32", device="cpu", num_kv_blocks=64, block_size=4, max_loras=3,
              max_lora_rank=16, seed=0, tensor_parallel_size=2, async_scheduling=async_scheduling)
    assert llm.engine.async_scheduling == async_scheduling
    try:
        loras = {n: LoRARequest(n, p) for n, p in adapters.items()}
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, prompt_logprobs=0, logprobs=0)
        for _ in range(2):  # twice: the second run reuses the ranks and the adapter slots
            outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params,
                                lora_request=[loras[n] if n else None for n in names], use_tqdm=False)
            for o, (want_tokens, want_lps) in zip(outs, want):
                assert list(o.outputs[0].token_ids) == want_tokens
                lps = [None if lp is None else list(lp.values())[0] for lp in o.prompt_logprobs]
                assert max(abs(a - b) for a, b in zip(lps[1:], want_lps[1:])) < 5e-5
        assert llm.engine.runner.model.model.embed_tokens.tp_size == 2
    finally:
        llm.engine.shutdown()


def _graph_run(model_dir: str, adapters: dict[str, str], names: list, tp: int, graphs: bool) -> tuple[list, int]:
    """Greedy tokens and decode logprobs of PROMPTS (no prompt logprobs: prompt chunks may take mixed graphs),
    and how many graph steps rank 0 ran. ``graphs``: the Triton backends with graph steps emulated on the CPU
    (their buffers and forward, eagerly) in every rank's process; else eager steps of the torch backends."""
    import os

    from loraplex import LLM, LoRARequest, SamplingParams

    os.environ["LORAPLEX_EMULATE_CUDA_GRAPHS"] = "1" if graphs else "0"  # read by every rank's engine
    backend = "triton" if graphs else "torch"
    llm = LLM(model_dir, dtype="float32", device="cpu", num_kv_blocks=64, block_size=4, max_loras=4,
              max_lora_rank=16, seed=0, max_num_seqs=8, tensor_parallel_size=tp, lora_backend=backend,
              attention_backend=backend)
    try:
        loras = {n: LoRARequest(n, p) for n, p in adapters.items()}
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS * 2], params,
                            lora_request=[loras[n] if n else None for n in names], use_tqdm=False)
        graphs_run = llm.engine.runner.graphs.replays if llm.engine.runner.graphs is not None else 0
        return [(list(o.outputs[0].token_ids), [list(lp.values())[0] for lp in o.outputs[0].logprobs])
                for o in outs], graphs_run
    finally:
        llm.engine.shutdown()
        os.environ.pop("LORAPLEX_EMULATE_CUDA_GRAPHS", None)


def test_graph_steps_under_tensor_parallelism_equal_one_rank(tmp_path) -> None:
    """Graph steps on 2 ranks (decode and mixed; on a CPU their buffers and forward run eagerly, on GPUs they
    replay captures): every rank fills the same buffers from rank 0's plan (worker ranks learn which slots hold
    trained tables from the slot changes) and meets the same collectives; greedy tokens and decode logprobs equal
    one rank's eager steps, for plain LoRA, embedding / lm_head LoRA, trained tables, LoRA bias and DoRA (which
    the expand kernel applies to each rank's partial sums of a row-parallel layer before its all-reduce), and
    base requests."""
    from test_peft_features import _perturb, redraw_magnitudes

    model_dir = make_tiny_model(tmp_path / "model", family="llama", num_key_value_heads=2)
    adapters = {
        "lin": make_adapter(model_dir, tmp_path / "lin", seed=1, r=8, target_modules="all-linear"),
        "head": make_adapter(model_dir, tmp_path / "head", seed=2, r=4,
                             target_modules=["q_proj", "lm_head", "embed_tokens"]),
        "saved": make_adapter(model_dir, tmp_path / "saved", seed=3, r=4, target_modules=["v_proj", "down_proj"],
                              modules_to_save=["lm_head", "embed_tokens"]),
    }
    adapters["bias"] = make_adapter(model_dir, tmp_path / "bias", seed=4, r=8, lora_bias=True,
                                    target_modules=["o_proj", "down_proj", "gate_proj"])
    adapters["dora"] = make_adapter(model_dir, tmp_path / "dora", seed=5, r=8, lora_alpha=16, use_dora=True,
                                    target_modules=["o_proj", "down_proj", "q_proj"])
    redraw_magnitudes(adapters["dora"], 7)
    _perturb(adapters["saved"], ("base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"), 5)
    names = [None, "lin", "head", "saved", "bias", "dora", "lin", "bias"]  # one per prompt of PROMPTS * 2
    want, eager_graphs = _graph_run(model_dir, adapters, names, 1, graphs=False)
    got, graph_steps = _graph_run(model_dir, adapters, names, 2, graphs=True)
    assert eager_graphs == 0 and graph_steps >= 6  # every step of the run but none took a graph otherwise
    for (gt, gl), (wt, wl) in zip(got, want):
        assert gt == wt
        assert max(abs(a - b) for a, b in zip(gl, wl)) < 5e-5


def _fail_a_rank(model_dir: str, timeout: float, fail: Callable[[Any], None], match: str) -> Any:
    """A 2-rank engine (``distributed_timeout=timeout``) that has served one request; ``fail(worker process)``;
    the next request must raise TensorParallelError matching ``match`` within the timeout and 15 s of teardown
    (the collective may notice a dead peer at once or only at the timeout). Returns the worker process."""
    import time

    from loraplex import LLM, SamplingParams, TensorParallelError

    llm = LLM(model_dir, dtype="float32", device="cpu", num_kv_blocks=64, block_size=4, seed=0,
              tensor_parallel_size=2, distributed_timeout=timeout)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    assert len(llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)) == 1
    worker = llm.engine._tp.procs[0]
    fail(worker)
    t0 = time.monotonic()
    with pytest.raises(TensorParallelError, match=match):
        llm.generate([{"prompt_token_ids": PROMPTS[1]}], params, use_tqdm=False)
    assert time.monotonic() - t0 < timeout + 15
    return worker


def test_a_rank_that_dies_fails_the_engine_with_a_clear_error(setup) -> None:
    def kill(worker: Any) -> None:
        worker.kill()
        worker.join(timeout=10)

    # a timeout of 10 s: gloo often sees the peer gone at once, but at times only when the collective times out
    _fail_a_rank(setup[0], 10, kill, r"rank 1 \(exit code -9\)")


def test_server_with_two_ranks_serves_adapters_like_one(setup) -> None:
    """``loraplex serve --tensor-parallel-size 2``: the engine process starts its second rank; completions
    of an adapter and of the base model equal one rank's greedy tokens."""
    from server_harness import ENGINE_KW, Server

    model_dir, adapters = setup
    prompt = "Once upon a time"
    tokens = {}
    for tp in (1, 2):
        srv = Server(model_dir, {"lin": adapters["lin"]}, engine_kw={**ENGINE_KW, "tensor_parallel_size": tp})
        try:
            client = srv.client()
            tokens[tp] = [client.completions.create(model=m, prompt=prompt, max_tokens=6, temperature=0.0,
                                                    logprobs=1).choices[0].logprobs.tokens for m in ("tiny", "lin")]
        finally:
            srv.stop()
            srv.engine.shutdown()
    assert tokens[2] == tokens[1] and tokens[1][0] != tokens[1][1]


def elements_read(rank: int, model_dir: str) -> tuple[int, int]:
    import torch

    from loraplex.models.loader import CheckpointSlice, iter_weights, load_hf_config, load_model

    cfg = load_hf_config(model_dir)
    CheckpointSlice.elements_read = 0
    load_model(model_dir, cfg, torch.float32, torch.device("cpu"))
    total = sum(t.numel() for _, t in iter_weights(model_dir))
    return CheckpointSlice.elements_read, total


def test_each_rank_reads_only_its_shard_of_the_checkpoint(setup) -> None:
    """Sliced safetensors reads: a rank of 2 reads about half the checkpoint (norms are read whole)."""
    model_dir, _ = setup
    for read, total in run_ranks(elements_read, 2, model_dir):
        assert 0.45 * total < read < 0.6 * total, (read, total)


def test_torchrun_style_launch_runs_the_same_program_on_every_rank(setup) -> None:
    """Processes started by a launcher (torchrun's RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT): every
    rank runs ``loraplex generate``; rank 0 prints one rank's text, the other serves steps and exits 0."""
    import os
    import subprocess
    import sys

    from tp_helpers import _free_port

    model_dir, adapters = setup
    cmd = [sys.executable, "-m", "loraplex.cli", "generate", "--model", model_dir, "--lora", f"lin={adapters['lin']}",
           "--prompt", "Once upon a time", "--max-tokens", "6", "--device", "cpu", "--num-kv-blocks", "64"]
    one = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    port = str(_free_port())
    procs = [subprocess.Popen(cmd + ["--tensor-parallel-size", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert outs[0][0] == one.stdout and "[lin]" in one.stdout  # base and adapter texts, as on one rank
    assert outs[1][0] == ""


def test_a_rank_that_hangs_fails_the_engine_within_the_timeout(setup) -> None:
    import contextlib
    import os
    import signal

    stopped = []

    def stop(worker: Any) -> None:  # alive, but answers nothing
        os.kill(worker.pid, signal.SIGSTOP)
        stopped.append(worker)

    try:
        worker = _fail_a_rank(setup[0], 5, stop, "timed out after 5")
    finally:
        for w in stopped:
            with contextlib.suppress(ProcessLookupError):  # the engine has killed it already when it failed
                os.kill(w.pid, signal.SIGCONT)
    assert not worker.is_alive()  # the engine stopped the hung rank


def test_server_runtime_adapter_loads_reach_every_rank(setup, tmp_path) -> None:
    """POST /v1/load_lora_adapter under 2 ranks: the adapter loads on rank 0 and its slot follows to rank 1,
    so its completions equal one rank's."""
    import shutil

    import httpx

    from server_harness import ENGINE_KW, Server

    model_dir, adapters = setup
    root = tmp_path / "loras"
    shutil.copytree(adapters["lin"], root / "lin")
    texts = {}
    for tp in (1, 2):
        srv = Server(model_dir, {}, engine_kw={**ENGINE_KW, "tensor_parallel_size": tp},
                     allow_runtime_lora_updates=True, lora_root=str(root))
        try:
            r = httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "rt", "lora_path": "lin"}, timeout=60)
            assert r.status_code == 200, r.text
            texts[tp] = srv.client().completions.create(model="rt", prompt="Once upon a time", max_tokens=6,
                                                         temperature=0.0, logprobs=1).choices[0].logprobs.tokens
        finally:
            srv.stop()
            srv.engine.shutdown()
    assert texts[2] == texts[1]


def test_adapters_reach_the_other_ranks_packed(tmp_path) -> None:
    """An adapter entering a slot travels to the other ranks as a small pickled description in the step plan
    plus one flat byte buffer (a collective broadcast: NCCL on GPUs), not as pickled tensors; unpacked, every
    tensor (LoRA A/B, DoRA magnitudes, LoRA biases, trainable-token ids and rows, trained tables) is bit-equal
    to rank 0's, and the config, uid and version come along."""
    from loraplex import LLM, LoRARequest
    from test_peft_features import _perturb

    model_dir = make_tiny_model(tmp_path / "model", family="llama", num_key_value_heads=2)
    dora = make_adapter(model_dir, tmp_path / "dora", seed=1, r=8, target_modules="all-linear", use_dora=True,
                        modules_to_save=["lm_head"], trainable_token_indices={"embed_tokens": [5, 17, 100]})
    _perturb(dora, ("base_model.model.lm_head.weight",), 2)
    bias = make_adapter(model_dir, tmp_path / "bias", seed=2, r=4, target_modules=["q_proj", "down_proj"],
                        lora_bias=True)
    llm = LLM(model_dir, dtype="float32", device="cpu", num_kv_blocks=16, block_size=4, max_loras=1,
              max_lora_rank=16)
    for name, path in (("dora", dora), ("bias", bias)):
        llm.add_lora(LoRARequest(name, path))
        staged = llm.engine.pool.get(name)
        assert staged.packed is not None  # registration staged it: its tensors are views of one buffer
        assert staged.modules[next(iter(staged.modules))].A.untyped_storage().data_ptr() == \
            staged.packed[1].untyped_storage().data_ptr()
        _check_packing(staged)  # sends the staged buffer as it is
        _check_packing(dataclasses.replace(staged, packed=None))  # packs anew


def _check_packing(adapter) -> None:
    import pickle

    import torch

    from loraplex.lora.packing import pack_adapter, unpack_adapter

    meta, flat = pack_adapter(adapter)
    tensors = [t for w in adapter.modules.values() for t in (w.A, w.B, w.magnitude, w.bias) if t is not None]
    tensors += [t for pair in adapter.tokens.values() for t in pair] + list(adapter.saved.values())
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    held = [t for w in meta.modules.values() for t in (w.A, w.B, w.magnitude, w.bias)]
    held += [t for pair in meta.tokens.values() for t in pair] + list(meta.saved.values())
    assert not any(isinstance(t, torch.Tensor) for t in held)  # the plan carries no weights ...
    assert flat.numel() >= nbytes and len(pickle.dumps(meta)) < 8192  # ... but their places in the buffer
    got = unpack_adapter(pickle.loads(pickle.dumps(meta)), flat)
    assert (got.uid, got.version, got.config, got.vocab_size) == (adapter.uid, adapter.version, adapter.config,
                                                                  adapter.vocab_size)
    assert got.modules.keys() == adapter.modules.keys()
    assert any(w.magnitude is not None or w.bias is not None for w in got.modules.values())
    for k, w in adapter.modules.items():
        g = got.modules[k]
        assert g.scaling == w.scaling
        for a, b in ((w.A, g.A), (w.B, g.B), (w.magnitude, g.magnitude), (w.bias, g.bias)):
            assert (a is None) == (b is None) and (a is None or (a.dtype == b.dtype and torch.equal(a, b)))
    for k, (ids, rows) in adapter.tokens.items():
        assert torch.equal(got.tokens[k][0], ids) and torch.equal(got.tokens[k][1], rows)
    assert got.saved.keys() == adapter.saved.keys() and all(torch.equal(got.saved[k], t) for k, t in adapter.saved.items())


def test_chunked_prefill_under_tensor_parallelism_equals_one_rank(tmp_path) -> None:
    """Prompts split into chunks of a few tokens (max_num_batched_tokens=6) that share steps with decodes, on 2
    ranks: prompt logprobs gathered over the chunks and greedy tokens equal one rank's unchunked run."""
    from loraplex import LLM, LoRARequest, SamplingParams

    model_dir = make_tiny_model(tmp_path / "model", family="llama", num_key_value_heads=2)
    adapters = {"lin": make_adapter(model_dir, tmp_path / "lin", seed=1, r=8, target_modules="all-linear"),
                "emb": make_adapter(model_dir, tmp_path / "emb", seed=3, r=4, target_modules=["embed_tokens", "lm_head"])}
    names = [None, "lin", "emb", "lin"]
    ((_, _, _, _, _), want), = run_ranks(generate, 1, model_dir, adapters, names)
    llm = LLM(model_dir, dtype="float32", device="cpu", num_kv_blocks=64, block_size=4, max_loras=3,
              max_lora_rank=16, seed=0, tensor_parallel_size=2, max_num_batched_tokens=6, max_num_seqs=4)
    try:
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, prompt_logprobs=0, logprobs=0)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False,
                            lora_request=[LoRARequest(n, adapters[n]) if n else None for n in names])
        for o, (want_tokens, want_lps) in zip(outs, want):
            assert list(o.outputs[0].token_ids) == want_tokens
            lps = [None if lp is None else list(lp.values())[0] for lp in o.prompt_logprobs]
            assert max(abs(a - b) for a, b in zip(lps[1:], want_lps[1:])) < 5e-5
        assert max(len(p) for p in PROMPTS) > 6  # some prompt took several steps
    finally:
        llm.engine.shutdown()


def test_exit_handler_holds_the_engine_weakly(tmp_path) -> None:
    """The interpreter-exit handler that stops the worker ranks holds the engine weakly: an engine the program
    dropped is freed with its model (GPU memory), not kept until exit."""
    import gc
    import weakref

    from loraplex import LLM

    model_dir = make_tiny_model(tmp_path / "model", family="llama", num_key_value_heads=2)
    llm = LLM(model_dir, dtype="float32", device="cpu", num_kv_blocks=16, block_size=4, tensor_parallel_size=2)
    ref = weakref.ref(llm.engine)
    llm.engine.shutdown()
    del llm
    gc.collect()
    assert ref() is None


def test_collectives_captured_in_graphs_use_the_graph_group(monkeypatch) -> None:
    """Under NCCL, collectives launched while a CUDA graph is being captured go over the graph group and every
    other one over the default group: one communicator is only ever replayed in graphs, the other only ever
    launched eagerly (what lets the engine turn off NCCL's graph mixing support, whose replays block the
    host)."""
    import torch.distributed as dist

    from loraplex.distributed import parallel_state as ps

    graph_group = object()
    seen: list[tuple[str, object]] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "all_reduce", lambda x, group=None: seen.append(("all_reduce", group)))
    monkeypatch.setattr(dist, "broadcast", lambda x, src, group=None: seen.append(("broadcast", group)))
    monkeypatch.setattr(dist, "all_gather", lambda parts, x, group=None: seen.append(("all_gather", group)))
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    ps.init_tensor_parallel(0, 2, graph_group)
    try:
        x = torch.zeros(2, 3)
        for capturing[0] in (False, True):
            ps.all_reduce(x)
            ps.broadcast_from_first(x)
            ps.all_gather_last_dim(x)
    finally:
        ps.init_tensor_parallel(0, 1)
    assert seen == [("all_reduce", None), ("broadcast", None), ("all_gather", None),
                    ("all_reduce", graph_group), ("broadcast", graph_group), ("all_gather", graph_group)]
    assert ps._GRAPH_GROUP is None  # one rank again: no graph group
