"""loraplex vs transformers + PEFT on the same tiny random weights.

One mixed batch per model family: three adapters of different ranks and targets
(embed_tokens + lm_head; all-linear with rsLoRA; rank_pattern/alpha_pattern)
plus base-model requests. Prompt logprobs must agree within 1e-4 with PEFT's
``adapter_names`` forward, and greedy tokens must equal PEFT's generation.
"""

from __future__ import annotations

import pytest
import torch

from helpers import load_peft_model, make_adapter, make_tiny_model
from loraplex import LLM, LoRARequest, SamplingParams

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}
CASES = [
    ("llama", False, {}),
    ("llama", True, {}),
    ("llama", False, {"rope_scaling": LLAMA3_ROPE}),
    ("mistral", False, {"sliding_window": 8}),
    ("qwen2", True, {}),
    ("qwen2", False, {}),
    ("qwen3", False, {}),
    ("qwen3", True, {}),
]
CASE_IDS = [f"{f}-{'tied' if t else 'untied'}{'-' + '-'.join(o) if o else ''}" for f, t, o in CASES]

PROMPTS = [
    [5, 17, 33, 99, 120, 7, 8, 250],
    [3, 4, 5, 6],
    [100, 101, 102, 103, 104, 105],
    [9, 8, 7, 6, 5, 4, 3, 2, 1, 11],
    [42, 43],
    [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71],
    [200, 180, 160],
    [11, 22, 33, 44, 55],
]
ADAPTERS = ["emb", "rs", "pattern", None, "emb", None, "pattern", "rs"]
NEW_TOKENS = 16


def build_adapters(model_dir: str, root) -> dict[str, str]:
    return {
        # embedding + output head LoRA (with PEFT's saved base copies), rank 8
        "emb": make_adapter(model_dir, root / "emb", seed=1, r=8, lora_alpha=16,
                            target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"]),
        # every linear layer with rsLoRA scaling, rank 4
        "rs": make_adapter(model_dir, root / "rs", seed=2, r=4, lora_alpha=8,
                           target_modules="all-linear", use_rslora=True),
        # rank 16 with per-module rank and alpha overrides
        "pattern": make_adapter(model_dir, root / "pattern", seed=3, r=16, lora_alpha=16,
                                target_modules=["k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                rank_pattern={"down_proj": 4, "layers.1.self_attn.k_proj": 2},
                                alpha_pattern={"o_proj": 64}),
    }


@pytest.mark.parametrize("family,tied,overrides", CASES, ids=CASE_IDS)
def test_mixed_batch_matches_peft(tmp_path, family: str, tied: bool, overrides: dict) -> None:
    model_dir = make_tiny_model(tmp_path / "model", family=family, tie_word_embeddings=tied, **overrides)
    paths = build_adapters(model_dir, tmp_path)

    llm = LLM(model_dir, dtype="float32", device="cpu", max_loras=4, max_lora_rank=16, seed=0,
              num_kv_blocks=64, block_size=4)
    loras = [LoRARequest(a, paths[a]) if a else None for a in ADAPTERS]
    # min_tokens masks EOS as min_new_tokens does in transformers, so both run 16 tokens.
    params = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0.0, prompt_logprobs=2,
                            logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, lora_request=loras, use_tqdm=False)

    ref = load_peft_model(model_dir, paths)
    with torch.no_grad():
        for prompt, name, out in zip(PROMPTS, ADAPTERS, outs):
            tag = name or "__base__"
            ids = torch.tensor([prompt])
            mask = torch.ones_like(ids)
            logp = ref(input_ids=ids, attention_mask=mask, adapter_names=[tag]).logits[0].log_softmax(-1)
            assert out.prompt_logprobs[0] is None
            for i in range(1, len(prompt)):
                got = out.prompt_logprobs[i]
                assert got[prompt[i]] == pytest.approx(logp[i - 1, prompt[i]].item(), abs=1e-4), (tag, i)
                top = logp[i - 1].topk(2)
                for tok, val in zip(top.indices.tolist(), top.values.tolist()):
                    assert got[tok] == pytest.approx(val, abs=1e-4), (tag, i, tok)
            gen = ref.generate(input_ids=ids, attention_mask=mask, adapter_names=[tag], do_sample=False,
                               max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, output_logits=True,
                               return_dict_in_generate=True)
            want = gen.sequences[0, len(prompt):].tolist()
            assert out.outputs[0].token_ids == want, tag
            # logprobs of generated tokens (raw logits, lm_head LoRA included) match PEFT's step logits
            for step, (tok, lp) in enumerate(zip(want, out.outputs[0].logprobs)):
                ref_lp = gen.logits[step][0].float().log_softmax(-1)[tok].item()
                assert lp[tok] == pytest.approx(ref_lp, abs=1e-4), (tag, step)
            assert out.outputs[0].finish_reason == "length"


def test_adapters_change_outputs(tmp_path) -> None:
    """Guard against a parity test that passes because LoRA does nothing."""
    model_dir = make_tiny_model(tmp_path / "model", family="llama")
    paths = build_adapters(model_dir, tmp_path)
    llm = LLM(model_dir, dtype="float32", device="cpu", max_loras=4, max_lora_rank=16, num_kv_blocks=64,
              block_size=4)
    prompt = {"prompt_token_ids": PROMPTS[0]}
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    names = [None, "emb", "rs", "pattern"]
    outs = llm.generate([prompt] * 4, params, use_tqdm=False,
                        lora_request=[LoRARequest(n, paths[n]) if n else None for n in names])
    seqs = [tuple(o.outputs[0].token_ids) for o in outs]
    assert len(set(seqs)) == 4, seqs
