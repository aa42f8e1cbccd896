"""Decode steps over the persistent buffers of CUDA graphs (loraplex.engine.cuda_graph), on CPU.

The graphs themselves need CUDA (tests/test_gpu.py replays them); here the forward a graph records runs
eagerly over the same buffers (``capture_graphs(capture=False)``), so the buffer layout, the padding rows,
the scratch block and the padded LoRA work lists are checked in CI against ordinary eager steps.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import make_adapter, make_tiny_model
from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.engine import cuda_graph
from loraplex.engine.cuda_graph import (TILE_ROWS, StepInputs, capture_sizes, is_decode_step, is_graph_step,
                                        mixed_sizes)
from loraplex.engine.request import Request

# The graph tests below run the Triton kernels on the CPU, in the interpreter; on a GPU host tests/test_gpu.py
# replays the real graphs instead.
in_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                    reason="runs Triton on the CPU (TRITON_INTERPRET=1); on a GPU see tests/test_gpu.py")


def test_capture_sizes() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    # the default (LORAPLEX_MIXED_GRAPH_TOKENS 2048, _STEP 64): powers of two to 2,048 and every multiple of 64
    # up to FINE_MIXED_TOKENS (512), so a step pads to the next multiple; above it only powers of two
    assert cuda_graph.MAX_MIXED_TOKENS == 2048 and mixed_sizes(2048) == mixed_sizes(2048, step=64)
    assert mixed_sizes(2048, step=64) == [16, 32, 64, 128, 192, 256, 320, 384, 448, 512, 1024, 2048]
    assert mixed_sizes(2048, step=0) == [16, 32, 64, 128, 256, 512, 1024, 2048]
    # never above max_num_batched_tokens (the argument)
    assert mixed_sizes(1500, step=64) == mixed_sizes(1024, step=64) == mixed_sizes(2048, step=64)[:-1]
    assert mixed_sizes(300, step=64) == [16, 32, 64, 128, 192, 256]
    assert mixed_sizes(100, step=0) == [16, 32, 64] and mixed_sizes(8) == [8]
    with pytest.MonkeyPatch.context() as mp:  # LORAPLEX_MIXED_GRAPH_TOKENS=512
        mp.setattr(cuda_graph, "MAX_MIXED_TOKENS", 512)
        assert mixed_sizes(2048, step=0) == [16, 32, 64, 128, 256, 512]
        assert mixed_sizes(2048, step=64) == [16, 32, 64, 128, 192, 256, 320, 384, 448, 512]
    with pytest.raises(ValueError, match="multiple of 16, got 40"):
        mixed_sizes(512, step=40)


def _request(rid: str, prompt: list[int], slot: int, blocks: list[int]) -> Request:
    req = Request(rid, None, prompt, SamplingParams(max_tokens=4), None, None, frozenset(), 4)
    req.slot = slot
    req.block_table = list(blocks)
    return req


def _seq(req: Request, start: int, n: int = 1, prompt_logprobs: bool = False) -> SimpleNamespace:
    return SimpleNamespace(req=req, start=start, num_new_tokens=n, prompt_logprobs=prompt_logprobs, slot=req.slot)


def test_block_table_array_follows_the_list() -> None:
    req = _request("r", [1, 2, 3], -1, [7, 3])
    assert req.block_table_array().tolist() == [7, 3]
    req.block_table.extend(range(40, 60))  # grows past the first capacity: only new blocks are converted
    assert req.block_table_array().tolist() == [7, 3, *range(40, 60)]
    req.block_table.clear()  # freed (preemption) ...
    assert req.block_table_array().tolist() == []
    req.block_table = [5, 6, 9]  # ... and re-admitted with a new list of the same length as an old prefix
    assert req.block_table_array().tolist() == [5, 6, 9]


def test_decode_inputs_layout_padding_and_tiles() -> None:
    bs, size = 4, 24
    inp = StepInputs(size, size, max_blocks=8, mrope=False, block_size=bs, scratch_block=50,
                     device=torch.device("cpu"), decode=True)
    # 19 sequences: 2 base, 17 of slot 1 (cut into tiles of TILE_ROWS rows), 0 of slot 3 ... sorted by slot
    slots = [-1, -1] + [1] * 17
    reqs, seqs = [], []
    for i, slot in enumerate(slots):
        prompt = list(range(10 + i, 15 + i))  # 5 prompt tokens
        req = _request(f"r{i}", prompt, slot, [i, 30 + i])  # positions 0..7
        req.output_token_ids = [100 + i, 200 + i]  # the decode token sits at position 6
        reqs.append(req)
        seqs.append(_seq(req, 6))
    assert is_decode_step(seqs)
    inp.fill(seqs, size)
    d = {k: v.clone() for k, v in inp.dev.items()}
    B = len(seqs)
    assert d["input_ids"][:B].tolist() == [200 + i for i in range(B)]
    assert d["positions"][:B].tolist() == [6] * B
    assert d["seq_lens"][:B].tolist() == [7] * B
    assert d["slot_mapping"][:B].tolist() == [(30 + i) * bs + 2 for i in range(B)]
    assert d["token_slots"][:B].tolist() == slots
    assert d["query_start_loc"].tolist() == list(range(size + 1))
    assert d["block_tables"][:B, :2].tolist() == [[i, 30 + i] for i in range(B)]
    # padding rows: a one-token sequence in the scratch block, base model
    assert d["input_ids"][B:].tolist() == [0] * (size - B)
    assert d["seq_lens"][B:].tolist() == [1] * (size - B)
    assert d["slot_mapping"][B:].tolist() == [50 * bs] * (size - B)
    assert d["block_tables"][B:, 0].tolist() == [50] * (size - B)
    assert d["token_slots"][B:].tolist() == [-1] * (size - B)
    want = [[2, 19, 1], [2 + TILE_ROWS, 19, 1]]  # row_end: the run's end (kernels mask past it)
    assert d["tiles"][:2].tolist() == want and d["tile_count"].tolist() == [2]  # base rows: no tile
    assert d["tiles"][2:].tolist() == [[0, 0, -1]] * (size - 2)  # padding rows are in no tile

    # the next step reuses the other host twin: a smaller batch leaves no stale rows behind
    inp.fill(seqs[:3], size)
    assert inp.dev["token_slots"].tolist() == [-1, -1, 1] + [-1] * (size - 3)
    assert inp.dev["tiles"][:1].tolist() == [[2, 3, 1]] and inp.dev["tile_count"].tolist() == [1]
    assert inp.dev["tiles"][1:].tolist() == [[0, 0, -1]] * (size - 1)
    assert inp.dev["seq_lens"][3:].tolist() == [1] * (size - 3)

    assert not is_decode_step([_seq(reqs[0], 3, n=2)]) and is_graph_step([_seq(reqs[0], 3, n=2)])
    assert not is_decode_step([_seq(reqs[0], 6, prompt_logprobs=True)])
    assert not is_graph_step([_seq(reqs[0], 3, n=2, prompt_logprobs=True)])


def test_mixed_inputs_layout_padding_sequences_and_logits_rows() -> None:
    bs, tokens, rows = 4, 16, 4
    inp = StepInputs(tokens, rows + tokens, max_blocks=8, mrope=False, block_size=bs, scratch_block=50,
                     device=torch.device("cpu"), decode=False, rows=rows)
    a = _request("a", [1, 2, 3, 4, 5], -1, [3, 4])  # decoding: token at position 6
    a.output_token_ids = [100, 101]
    b = _request("b", list(range(10, 30)), 2, [7, 8, 9, 10, 11])  # its chunk of 6 prompt tokens at 8..13
    c = _request("c", list(range(40, 60)), 2, [12])  # its first chunk: 3 tokens
    steps = [_seq(a, 6), _seq(b, 8, n=6), _seq(c, 0, n=3)]
    assert not is_decode_step(steps) and is_graph_step(steps)
    inp.fill(steps, tokens)
    d = {k: v.clone() for k, v in inp.dev.items()}
    T, pad = 10, 6
    assert d["input_ids"][:T].tolist() == [101, *range(18, 24), 40, 41, 42]
    assert d["positions"][:T].tolist() == [6, *range(8, 14), 0, 1, 2]
    want_slots = [4 * bs + 2] + [(9 if p < 12 else 10) * bs + p % bs for p in range(8, 14)] + [12 * bs + p for p in range(3)]
    assert d["slot_mapping"][:T].tolist() == want_slots
    # sequences: the three, then one one-token sequence per padding token at position 0 of the scratch block
    # (no padding position or block index beyond what one token needs), then empty ones
    assert d["query_start_loc"].tolist() == [0, 1, 7, 10, *range(11, 17), *[16] * (rows + tokens - 3 - pad)]
    assert d["seq_lens"].tolist() == [7, 14, 3, *[1] * pad, *[0] * (rows + tokens - 3 - pad)]
    assert d["block_tables"][3:3 + pad, 0].tolist() == [50] * pad
    assert d["positions"][T:].tolist() == [0] * pad
    assert d["slot_mapping"][T:].tolist() == [50 * bs] * pad
    assert d["token_slots"].tolist() == [-1] + [2] * 9 + [-1] * pad
    assert d["tiles"][:1].tolist() == [[1, 10, 2]] and d["tile_count"].tolist() == [1]
    assert d["tiles"][1:].tolist() == [[0, 0, -1]] * (tokens - 1)  # base and padding rows are in no tile
    # logits rows: each sequence's last token; padding rows read row 0 and have no adapter
    assert d["logits_indices"].tolist() == [0, 6, 9, 0]
    assert d["logits_slots"].tolist() == [-1, 2, 2, -1]
    assert d["logits_tiles"].tolist() == [[1, 3, 2], [0, 0, -1], [0, 0, -1], [0, 0, -1]]
    assert d["logits_tile_count"].tolist() == [1]
    inp.fill(steps, 12)  # the graph of 12 tokens: two padding sequences, then empty ones
    assert inp.dev["query_start_loc"][:7].tolist() == [0, 1, 7, 10, 11, 12, 12]
    assert inp.dev["seq_lens"][:6].tolist() == [7, 14, 3, 1, 1, 0]


def build_graph_case(root) -> tuple[str, dict[str, str]]:
    """A qwen2 model (q/k/v biases, 2,048 positions) and three adapters of other ranks and targets, with every feature that has
    per-slot terms: plain LoRA with trainable tokens in the embedding and the head; DoRA on
    every linear layer, the embedding and the head (magnitudes redrawn); LoRA bias with its own trained
    embedding and head tables (modules_to_save, perturbed)."""
    from test_peft_features import _perturb, redraw_magnitudes

    model = make_tiny_model(Path(root) / "model", family="qwen2", max_position_embeddings=2048)
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapters = {
        "a0": make_adapter(model, Path(root) / "plain", seed=20, r=4, target_modules=["q_proj", "v_proj"],
                           trainable_token_indices={"embed_tokens": [5, 17, 100, 101], "lm_head": [4, 8, 33]}),
        "a1": make_adapter(model, Path(root) / "dora", seed=21, r=8, lora_alpha=16, use_dora=True,
                           target_modules=every + ["embed_tokens", "lm_head"]),
        "a2": make_adapter(model, Path(root) / "bias", seed=22, r=12, lora_alpha=8, lora_bias=True,
                           target_modules=every, modules_to_save=["lm_head", "embed_tokens"]),
    }
    redraw_magnitudes(adapters["a1"], 7)
    _perturb(adapters["a2"], ("base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"), 8)
    return model, adapters


def run_mixes(llm: LLM, adapters: dict[str, str], use_graphs: bool, capture: bool = False,
              ) -> tuple[list, list[int]]:
    """Requests with changing adapter mixes and batch sizes (staggered lengths and arrivals); returns the
    outputs and the batch size of every graph step. ``use_graphs`` without ``capture``: set up the graphs'
    buffers and run their forward eagerly (CPU); with ``capture``: the engine's own captured graphs (CUDA)."""
    eng = llm.engine
    for name, path in adapters.items():
        llm.add_lora(LoRARequest(name, path))
    sizes: list[int] = []
    if use_graphs:
        if not capture:
            eng.runner.capture_graphs(lora=True, capture=False)
        inner = eng.runner.graphs.run

        def run(seqs, *args):
            sizes.append(len(seqs) if eng.runner.graphs.plan(seqs)[0] else -len(seqs))  # mixed: negative
            return inner(seqs, *args)

        eng.runner.graphs.run = run
    names = [None, "a0", "a1", None, "a2", "a0", "a1"]
    prompts = [[5, 17, 33, 99, 120, 7, 8, 250], [3, 4, 5, 6], [100, 101, 102, 103, 104, 105], [9, 8, 7, 6, 5, 4],
               [42, 43, 44], [60, 61, 62, 63, 64, 65, 66, 67], [200, 180, 160]]
    done = {}
    for i, (p, name) in enumerate(zip(prompts, names)):
        params = SamplingParams(max_tokens=3 + 2 * i, temperature=0.0, ignore_eos=True, logprobs=2)
        eng.add_request({"prompt_token_ids": p}, params, name, f"r{i}")
        for o in eng.step():  # a new request joins every step
            if o.finished:
                done[o.request_id] = o
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    return [done[f"r{i}"] for i in range(len(prompts))], sizes


@in_interpreter
def test_graph_steps_equal_eager_steps(tmp_path) -> None:
    """Graph steps (decode and mixed, the Triton backend: DoRA and LoRA bias applied in its expand kernel,
    trainable tokens and trained tables in the eager embedding and head around the adapter graphs) give what
    eager steps of the torch backend give (which apply all of them per segment on the host)."""
    model, adapters = build_graph_case(tmp_path)
    common = dict(dtype="float32", device="cpu", max_lora_rank=16, max_loras=3, num_kv_blocks=64, block_size=4,
                  seed=0, max_num_seqs=8, attention_backend="triton")
    want, _ = run_mixes(LLM(model, lora_backend="torch", **common), adapters, use_graphs=False)
    llm = LLM(model, lora_backend="triton", **common)
    got, sizes = run_mixes(llm, adapters, use_graphs=True)
    assert not any(m.wrapper.dora or m.wrapper.lora_bias for m in llm.engine.pool.lora_model.modules)
    assert_same(got, want, sizes)


@in_interpreter
def test_graph_steps_fold_deltas_as_eager_steps_add_them(tmp_path, monkeypatch) -> None:
    """LORAPLEX_LORA_FOLD_DELTA=1 in graph steps (padding rows of slot -1, DoRA, LoRA bias and the qkv bias folded by the
    layer kernels, here in the interpreter): what eager steps of the torch backend give."""
    from loraplex.kernels import layer_ops
    from loraplex.layers import activation, norm, rotary

    monkeypatch.setenv("LORAPLEX_LORA_FOLD_DELTA", "1")
    for mod in (norm, activation, rotary):
        monkeypatch.setattr(mod, "fused_ops", lambda x: layer_ops)
    model, adapters = build_graph_case(tmp_path)
    common = dict(dtype="float32", device="cpu", max_lora_rank=16, max_loras=3, num_kv_blocks=64, block_size=4,
                  seed=0, max_num_seqs=8, attention_backend="triton")
    want, _ = run_mixes(LLM(model, lora_backend="torch", **common), adapters, use_graphs=False)
    llm = LLM(model, lora_backend="triton", **common)
    assert sum(m.wrapper.fold_delta for m in llm.engine.pool.lora_model.modules) == 2 * 4  # 2 layers x 4
    got, sizes = run_mixes(llm, adapters, use_graphs=True)
    assert_same(got, want, sizes)


@in_interpreter
def test_mixed_graph_step_pads_to_its_multiples(tmp_path, monkeypatch) -> None:
    """With ``LORAPLEX_MIXED_GRAPH_STEP`` a step of 40 prompt tokens replays the 48-token graph instead of the
    64-token one, and gives what eager steps give."""
    monkeypatch.setattr(cuda_graph, "MIXED_GRAPH_STEP", 16)
    model, adapters = build_graph_case(tmp_path)
    common = dict(dtype="float32", device="cpu", max_lora_rank=16, max_loras=3, num_kv_blocks=64, block_size=4,
                  seed=0, max_num_seqs=8, attention_backend="triton")
    prompts = [{"prompt_token_ids": [(11 * i + 3 * j) % 200 + 3 for j in range(20)]} for i in range(2)]
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=2, ignore_eos=True)
    lora = [LoRARequest("a0", adapters["a0"]), LoRARequest("a2", adapters["a2"])]
    want = LLM(model, lora_backend="torch", **common).generate(prompts, params, lora, use_tqdm=False)
    llm = LLM(model, lora_backend="triton", **common)
    llm.engine.runner.capture_graphs(lora=True, capture=False)
    graphs = llm.engine.runner.graphs
    assert 48 in graphs.mixed_sizes
    planned = []
    inner = graphs.run
    graphs.run = lambda seqs, *args: planned.append(graphs.plan(seqs)) or inner(seqs, *args)
    got = llm.generate(prompts, params, lora, use_tqdm=False)
    assert planned[0] == (False, 48) and all(p[0] for p in planned[1:])  # the prefill, then decode graphs
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for lg, lw in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert lg.keys() == lw.keys() and all(abs(lg[t] - lw[t]) < 1e-4 for t in lg)


def assert_same(got: list, want: list, sizes: list[int]) -> None:
    # many batch sizes and adapter mixes went through decode graphs, and steps with prompt chunks through
    # mixed graphs
    assert len({n for n in sizes if n > 0}) >= 4 and max(sizes) >= 5 and sum(n < 0 for n in sizes) >= 5
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids, g.request_id
        for lg, lw in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert lg.keys() == lw.keys()
            for tok in lg:
                assert abs(lg[tok] - lw[tok]) < 1e-4
    assert np.isfinite([lp for o in got for pos in o.outputs[0].logprobs for lp in pos.values()]).all()


def test_no_adapter_graphs_means_eager_adapter_steps() -> None:
    """Without adapter graphs (a LoRA backend other than Triton), a step with an adapter runs eagerly: the base
    graph would silently drop the adapter."""
    req = _request("r", [1, 2, 3, 4], 0, [1])
    req.adapter = SimpleNamespace(name="a")
    assert is_graph_step([_seq(req, 3)], lora=True) and not is_graph_step([_seq(req, 3)], lora=False)
    base = _request("b", [1, 2, 3, 4], -1, [2])
    assert is_graph_step([_seq(base, 3)], lora=False)
