"""PEFT features beyond plain LoRA, against transformers + PEFT, inside mixed batches: DoRA (``use_dora``),
LoRA bias (``lora_bias``) and trainable tokens (``trainable_token_indices``).

A DoRA adapter on every linear layer, the input embedding and the output head (magnitudes redrawn, so each
channel's rescaling is far from 1), an all-linear DoRA adapter with rsLoRA, and a LoRA-bias adapter on every
linear layer and the head share the batch with a plain LoRA adapter and base requests. PEFT runs DoRA with
one adapter at a time (it refuses ``adapter_names`` with DoRA), so each request's reference is that adapter
alone: float32 prompt logprobs within 1e-4 and greedy tokens identical for 16 new tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import copy_adapter, edit_config, edit_tensors, load_base_model, make_adapter, make_tiny_model
from loraplex import LLM, AdapterError, LoRARequest, SamplingParams

PROMPTS = [[5, 17, 33, 99, 120, 7, 8, 250], [3, 4, 5, 6], [100, 101, 102, 103, 104, 105], [42, 43, 44, 45, 46],
           [9, 8, 7, 6, 5, 4, 3, 2, 1, 11], [60, 61, 62, 63, 64], [200, 180, 160, 140]]
NAMES = ["dora", None, "plain", "dora", "dora_lin", "biased", "biased"]
NEW_TOKENS = 16
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def redraw_magnitudes(path: str, seed: int) -> None:
    """Scale every DoRA magnitude by a random factor in [0.5, 1.5): the rescaling then matters."""
    g = torch.Generator().manual_seed(seed)

    def redraw(tensors: dict) -> None:
        for key, t in tensors.items():
            if "lora_magnitude_vector" in key:
                tensors[key] = t * (0.5 + torch.rand(t.shape, generator=g))

    edit_tensors(path, redraw)


def generate_and_compare(model_dir: str, paths: dict, names: list, prompts: list, device: str,
                         max_loras: int) -> tuple[LLM, dict]:
    """One mixed batch through loraplex (float32, greedy, 16 tokens, prompt logprobs); each request's
    reference is PEFT with that adapter alone (or the base model): prompt logprobs within 1e-4 and the same
    greedy tokens. Returns the engine and the references."""
    from peft import PeftModel

    torch.backends.cuda.matmul.allow_tf32 = False
    llm = LLM(model_dir, dtype="float32", device=device, max_loras=max_loras, max_lora_rank=16, seed=0,
              num_kv_blocks=64, block_size=4)
    params = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0.0, prompt_logprobs=1)
    loras = [LoRARequest(n, paths[n]) if n else None for n in names]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=loras, use_tqdm=False)
    refs = {None: load_base_model(model_dir).eval()}
    for name in {n for n in names if n}:
        refs[name] = PeftModel.from_pretrained(load_base_model(model_dir), paths[name]).to(torch.float32).eval()
    with torch.no_grad():
        for prompt, name, out in zip(prompts, names, outs):
            ids = torch.tensor([prompt])
            mask = torch.ones_like(ids)
            logp = refs[name](input_ids=ids, attention_mask=mask).logits[0].log_softmax(-1)
            for i in range(1, len(prompt)):
                assert out.prompt_logprobs[i][prompt[i]] == pytest.approx(logp[i - 1, prompt[i]].item(), abs=1e-4), \
                    (name, i)
            want = refs[name].generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS,
                                       min_new_tokens=NEW_TOKENS)[0, len(prompt):].tolist()
            assert out.outputs[0].token_ids == want, name
    return llm, refs


def build(model_dir: str, root: Path) -> dict[str, str]:
    paths = {
        "dora": make_adapter(model_dir, root / "dora", seed=1, r=8, lora_alpha=16, use_dora=True,
                             target_modules=ALL + ["embed_tokens", "lm_head"]),
        "dora_lin": make_adapter(model_dir, root / "dora_lin", seed=4, r=4, lora_alpha=8, use_dora=True,
                                 use_rslora=True, target_modules="all-linear"),
        "plain": make_adapter(model_dir, root / "plain", seed=2, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "biased": make_adapter(model_dir, root / "biased", seed=5, r=4, lora_alpha=8, lora_bias=True,
                               target_modules=ALL + ["lm_head"]),
    }
    redraw_magnitudes(paths["dora"], 7)
    redraw_magnitudes(paths["dora_lin"], 8)
    return paths


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases (DoRA rescales without the bias)
def test_dora_and_lora_bias_in_a_mixed_batch_match_peft(tmp_path, family: str, device: str) -> None:
    """On CUDA (the Triton backend) the steps holding DoRA or LoRA-bias requests replay CUDA graphs, the expand
    kernel applying both; the DoRA scales are computed on the upload stream. On CPU (the torch backend) they are
    applied per segment."""
    model_dir = make_tiny_model(tmp_path / "model", family=family)
    generate_and_compare(model_dir, build(model_dir, tmp_path), NAMES, PROMPTS, device, max_loras=4)


def test_dora_changes_what_plain_lora_computes(tmp_path) -> None:
    """Guard: the same adapter read without its magnitudes (plain LoRA) gives other outputs, so the parity
    above tests the rescaling itself."""
    model_dir = make_tiny_model(tmp_path / "model", family="llama")
    paths = build(model_dir, tmp_path)
    plain = copy_adapter(paths["dora"], tmp_path / "as_plain")
    edit_tensors(plain, lambda t: [t.pop(k) for k in list(t) if "lora_magnitude_vector" in k])
    edit_config(plain, use_dora=False)
    llm = LLM(model_dir, dtype="float32", device="cpu", max_loras=2, max_lora_rank=16, num_kv_blocks=64,
              block_size=4)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    a, b = llm.generate([{"prompt_token_ids": PROMPTS[0]}] * 2, params, use_tqdm=False,
                        lora_request=[LoRARequest("dora", paths["dora"]), LoRARequest("as_plain", plain)])
    diffs = [abs(list(x.values())[0] - list(y.values())[0]) for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:])]
    assert max(diffs) > 1e-2


def assert_refused(model_dir: str, path: str, edits: list) -> None:
    """Each (edit, pattern): the adapter's tensors, edited from the original, are refused on registration
    with an AdapterError matching ``pattern``."""
    from safetensors.torch import load_file

    good = load_file(str(Path(path) / "adapter_model.safetensors"))
    llm = LLM(model_dir, dtype="float32", device="cpu", max_loras=1, max_lora_rank=16, num_kv_blocks=16,
              block_size=4)
    for i, (edit, pattern) in enumerate(edits):
        edit_tensors(path, lambda t: (t.clear(), t.update(good), edit(t)))
        with pytest.raises(AdapterError, match=pattern):
            llm.add_lora(LoRARequest(f"bad{i}", path))


def test_dora_errors_name_the_tensor(tmp_path) -> None:
    model_dir = make_tiny_model(tmp_path / "model", family="llama")
    path = make_adapter(model_dir, tmp_path / "d", seed=1, r=4, use_dora=True, target_modules=["q_proj"])
    key = next(k for k in load_file_keys(path) if "lora_magnitude_vector" in k)
    assert_refused(model_dir, path, [
        (lambda t: t.update({key: t[key][:-1].clone()}), r"lora_magnitude_vector.*has shape \(\d+,\), expected \(\d+,\)"),
        (lambda t: t.pop(key), "sets use_dora, but module .* has no lora_magnitude_vector"),
        (lambda t: t.update({key: -t[key]}), "DoRA magnitudes must be positive"),
    ])


def test_lora_bias_errors_name_the_tensor(tmp_path) -> None:
    model_dir = make_tiny_model(tmp_path / "model", family="llama")
    path = make_adapter(model_dir, tmp_path / "b", seed=1, r=4, lora_bias=True, target_modules=["q_proj"])
    key = next(k for k in load_file_keys(path) if k.endswith("lora_B.bias"))
    assert_refused(model_dir, path, [
        (lambda t: t.update({key: t[key][:-2].clone()}), r"lora_B\.bias.*has shape \(\d+,\), expected \(\d+,\): the LoRA bias"),
        (lambda t: t.pop(key), r"sets lora_bias, but module .*q_proj.* has no lora_B\.bias tensor"),
    ])


def load_file_keys(path: str) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(Path(path) / "adapter_model.safetensors"), framework="pt") as f:
        return list(f.keys())


# ---- trainable tokens ---------------------------------------------------------------------------------------

TT_PROMPTS = [[5, 1, 2, 99, 3, 7, 8], [3, 4, 5, 6], [1, 2, 3, 4, 5, 6], [42, 3, 44, 1], [9, 8, 7, 2, 5]]
TT_NAMES = ["tt", None, "plain", "tt", "tt_dict"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("tied", [False, True])
def test_trainable_tokens_in_a_mixed_batch_match_peft(tmp_path, tied: bool, device: str) -> None:
    """Trainable tokens (with LoRA on other modules) beside plain LoRA and base requests: the replaced rows of
    the embedding (and, with tied embeddings, of the head) hold only for that adapter's requests."""
    family = "qwen2" if tied else "llama"
    model_dir = make_tiny_model(tmp_path / "model", family=family, tie_word_embeddings=tied)
    paths = {
        "tt": make_adapter(model_dir, tmp_path / "tt", seed=1, r=4, target_modules=["q_proj", "v_proj"],
                           trainable_token_indices=[1, 2, 3]),
        "plain": make_adapter(model_dir, tmp_path / "plain", seed=2, r=4, target_modules=["q_proj", "v_proj"]),
    }
    names = [n for n in TT_NAMES if n != "tt_dict" or not tied]
    prompts = TT_PROMPTS[:len(names)]
    if not tied:  # separate ids for the embedding and the head
        paths["tt_dict"] = make_adapter(model_dir, tmp_path / "tt_dict", seed=3, r=4, target_modules=["o_proj"],
                                        trainable_token_indices={"embed_tokens": [2, 5], "lm_head": [3, 4, 6]})
    llm, refs = generate_and_compare(model_dir, paths, names, prompts, device, max_loras=3)
    # the tokens matter: the adapter's rows differ from the base ones (the parity above is not vacuous)
    base_emb = refs[None].get_input_embeddings().weight
    rows = llm.engine.pool.get("tt").tokens["model.embed_tokens"][1].float().cpu()
    assert (rows - base_emb[[1, 2, 3]]).abs().max() > 0.1


def test_trainable_tokens_errors(tmp_path) -> None:
    model_dir = make_tiny_model(tmp_path / "model", family="llama")
    path = make_adapter(model_dir, tmp_path / "tt", seed=1, r=4, target_modules=["q_proj"],
                        trainable_token_indices=[1, 2, 3])
    llm = LLM(model_dir, dtype="float32", device="cpu", max_loras=1, max_lora_rank=16, num_kv_blocks=16,
              block_size=4)
    for indices, pattern in [([1, 2], r"has shape \(3, \d+\), expected \(2, \d+\): one row per trainable token"),
                             ([1, 2, 100000], r"distinct token ids below the vocabulary size"),
                             ({"q_proj": [1, 2, 3]}, r"names 'q_proj', which is not the model's input embedding"),
                             (None, r"holds trainable tokens, but adapter_config.json has no trainable_token_indices"),
                             ("x", r"trainable_token_indices must be a non-empty list")]:
        edit_config(path, trainable_token_indices=indices)
        with pytest.raises(AdapterError, match=pattern):
            llm.add_lora(LoRARequest(f"bad{len(str(indices))}", path))


# ---- modules_to_save: an adapter's own embedding and head ---------------------------------------------------

def _perturb(path: str, keys: tuple[str, ...], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    edit_tensors(path, lambda t: t.update({k: t[k] + 0.5 * torch.randn(t[k].shape, generator=g) for k in keys}))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_modules_to_save_tables_in_a_mixed_batch_match_peft(tmp_path, device: str) -> None:
    """Adapters with their own trained lm_head and/or embed_tokens (modules_to_save) beside plain LoRA and base
    requests: each request reads its adapter's tables, the others the base ones."""
    model_dir = make_tiny_model(tmp_path / "model", family="llama")
    paths = {
        "both": make_adapter(model_dir, tmp_path / "both", seed=1, r=4, target_modules=["q_proj", "v_proj"],
                             modules_to_save=["lm_head", "embed_tokens"]),
        "head": make_adapter(model_dir, tmp_path / "head", seed=2, r=4, target_modules=["o_proj"],
                             modules_to_save=["lm_head"]),
        "plain": make_adapter(model_dir, tmp_path / "plain", seed=3, r=4, target_modules=["q_proj", "v_proj"]),
    }
    _perturb(paths["both"], ("base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"), 1)
    _perturb(paths["head"], ("base_model.model.lm_head.weight",), 2)
    names = ["both", None, "plain", "head", "both"]
    llm, _ = generate_and_compare(model_dir, paths, names, PROMPTS[:len(names)], device, max_loras=3)
    assert set(llm.engine.pool.get("both").saved) == {"lm_head", "model.embed_tokens"}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_modules_to_save_tables_on_tied_embeddings_match_peft(tmp_path, device: str) -> None:
    """A model with tied embeddings: an adapter's trained embed_tokens table is its embedding only (PEFT leaves
    the tied head on the base weight); with ensure_weight_tying PEFT saves the trained table under the head's
    name too, and the adapter's requests read it there as well; beside plain LoRA and base requests."""
    tied_dir = make_tiny_model(tmp_path / "tied", family="qwen2", tie_word_embeddings=True)
    paths = {
        "emb": make_adapter(tied_dir, tmp_path / "emb", seed=1, r=4, target_modules=["q_proj"],
                            modules_to_save=["embed_tokens"]),
        "both": make_adapter(tied_dir, tmp_path / "both", seed=2, r=4, target_modules=["v_proj"],
                             modules_to_save=["embed_tokens"], ensure_weight_tying=True),
        "plain": make_adapter(tied_dir, tmp_path / "plain", seed=3, r=4, target_modules=["q_proj", "v_proj"]),
    }
    _perturb(paths["emb"], ("base_model.model.model.embed_tokens.weight",), 3)
    # trained tied: PEFT saves the one trained table under both names
    _perturb(paths["both"], ("base_model.model.model.embed_tokens.weight",), 4)
    edit_tensors(paths["both"], lambda t: t.update({"base_model.model.lm_head.weight":
                                                    t["base_model.model.model.embed_tokens.weight"].clone()}))
    names = ["emb", None, "both", "plain", "emb"]
    llm, _ = generate_and_compare(tied_dir, paths, names, PROMPTS[:len(names)], device, max_loras=3)
    assert set(llm.engine.pool.get("emb").saved) == {"model.embed_tokens"}
    assert set(llm.engine.pool.get("both").saved) == {"model.embed_tokens", "lm_head"}


# ---- through the server ---------------------------------------------------------------------------------------

def test_every_feature_through_the_server(tmp_path) -> None:
    """One adapter per feature (DoRA, LoRA bias, trainable tokens, a trained head), loaded at start-up and at
    runtime, served by the OpenAI-compatible server: completions equal offline generation."""
    import httpx

    from server_harness import ENGINE_KW, PROMPT, Server

    model_dir = make_tiny_model(tmp_path / "model", family="llama")
    paths = {
        "dora": make_adapter(model_dir, tmp_path / "dora", seed=1, r=4, use_dora=True,
                             target_modules=ALL + ["lm_head", "embed_tokens"]),
        "bias": make_adapter(model_dir, tmp_path / "bias", seed=2, r=4, lora_bias=True, target_modules=ALL),
        "tokens": make_adapter(model_dir, tmp_path / "tokens", seed=3, r=4, target_modules=["q_proj"],
                               trainable_token_indices=list(range(40, 120))),
        "head": make_adapter(model_dir, tmp_path / "head", seed=4, r=4, target_modules=["v_proj"],
                             modules_to_save=["lm_head"]),
    }
    redraw_magnitudes(paths["dora"], 9)
    _perturb(paths["head"], ("base_model.model.lm_head.weight",), 4)
    kw = {**ENGINE_KW, "max_loras": 4}
    llm = LLM(model_dir, **kw)
    params = SamplingParams(max_tokens=12, temperature=0.0)
    want = {n: llm.generate(PROMPT, params, lora_request=LoRARequest(n, p), use_tqdm=False)[0].outputs[0].text
            for n, p in paths.items()}
    base = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].text
    assert all(w != base for w in want.values())  # each feature changes the output
    s = Server(model_dir, {"dora": paths["dora"], "bias": paths["bias"]}, engine_kw=kw,
               allow_runtime_lora_updates=True, lora_root=str(tmp_path))
    try:
        for name in ("tokens", "head"):  # runtime loads
            r = httpx.post(s.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name})
            assert r.status_code == 200, r.text
        c = s.client()
        for name in paths:
            got = c.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
            assert got == want[name], name
    finally:
        s.stop()


# ---- added tokens: an adapter's own tokenizer and vocabulary -------------------------------------------------

ADDED = [f"<tool{i}>" for i in range(25)]  # 300 base tokens + 25: past the head's padded 320 columns


def make_added_tokens_adapter(model_dir: str, out: Path, seed: int, boost: float, added: list[str] = ADDED) -> str:
    """A PEFT adapter trained with tokens ``added`` to the tokenizer: the base resized, LoRA on q/v, the
    embedding and head saved whole (their new rows random; ``boost`` scales the head's new rows, so they get
    sampled)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.add_tokens(added)
    model = load_base_model(model_dir)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        n = len(added)
        hidden = model.get_input_embeddings().weight.shape[1]  # (vision-language configs nest theirs)
        model.get_input_embeddings().weight[-n:] = torch.randn(n, hidden, generator=g)
        model.get_output_embeddings().weight[-n:] = boost * torch.randn(n, hidden, generator=g)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                  modules_to_save=["embed_tokens", "lm_head"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return str(out)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_added_tokens_served_with_the_adapters_tokenizer(tmp_path, device: str) -> None:
    """The adapter's requests are tokenized with its tokenizer (its added tokens are single ids past the base
    vocabulary), read its embedding rows, can produce its tokens, and match PEFT on the resized model; base
    requests in the same batch never see them. On CUDA the decode steps replay the adapter graphs, the
    adapter's widened head applied around them."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    torch.backends.cuda.matmul.allow_tf32 = False
    model_dir = make_tiny_model(tmp_path / "model", family="llama")
    path = make_added_tokens_adapter(model_dir, tmp_path / "added", seed=1, boost=3.0)
    llm = LLM(model_dir, dtype="float32", device=device, max_loras=2, max_lora_rank=16, seed=0, num_kv_blocks=64,
              block_size=4)
    llm.add_lora(LoRARequest("added", path))
    text = "hello <tool3> world <tool20>"
    params = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0.0, prompt_logprobs=1,
                            logprobs=1)
    outs = llm.generate([text, text, text], params, use_tqdm=False,
                        lora_request=[LoRARequest("added", path), None, LoRARequest("added", path)])
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(text)["input_ids"]
    assert outs[0].prompt_token_ids == ids and max(ids) >= 300  # the added tokens, as single ids
    assert max(outs[1].prompt_token_ids) < 300  # the base tokenizer splits them
    base = load_base_model(model_dir)
    base.resize_token_embeddings(len(tok), mean_resizing=False)
    ref = PeftModel.from_pretrained(base, path).to(torch.float32).eval()
    with torch.no_grad():
        x = torch.tensor([ids])
        logp = ref(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].log_softmax(-1)
        for i in range(1, len(ids)):
            assert outs[0].prompt_logprobs[i][ids[i]] == pytest.approx(logp[i - 1, ids[i]].item(), abs=1e-4)
        want = ref.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                            max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)[0, len(ids):].tolist()
    got = outs[0].outputs[0].token_ids
    assert got == want and outs[2].outputs[0].token_ids == want
    assert max(got) >= 300  # it produced its own tokens
    assert any(t in outs[0].outputs[0].text for t in ADDED)  # detokenized with its tokenizer
    assert max(outs[1].outputs[0].token_ids) < 300  # the base request never sees them


def test_one_adapter_never_samples_another_adapters_added_tokens(tmp_path) -> None:
    """Two adapters that add 25 and 5 tokens (ids 300.. in both), their head rows boosted so that they win,
    in one batch with a base request: the 5-token adapter's requests only ever produce ids below 305 (never the
    other's 305..324, whose logits columns the batch holds), the base request only ids below 300, and each
    adapter's tokens equal its run alone."""
    model_dir = make_tiny_model(tmp_path / "model", family="llama")
    many = make_added_tokens_adapter(model_dir, tmp_path / "many", seed=1, boost=4.0)
    few = make_added_tokens_adapter(model_dir, tmp_path / "few", seed=2, boost=4.0, added=[f"<f{i}>" for i in range(5)])
    llm = LLM(model_dir, dtype="float32", device="cpu", max_loras=3, max_lora_rank=16, seed=0, num_kv_blocks=128,
              block_size=4)
    loras = [LoRARequest("many", many), LoRARequest("few", few), None, LoRARequest("few", few)]
    params = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0.0)
    prompts = [{"prompt_token_ids": p} for p in ([5, 17, 33, 99], [5, 17, 33, 99], [5, 17, 33, 99], [8, 9, 10])]
    outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    toks = [o.outputs[0].token_ids for o in outs]
    assert max(toks[0]) >= 305  # the 25-token adapter produces tokens the 5-token one does not have
    assert max(toks[1]) >= 300 and max(toks[1]) < 305 and max(toks[3]) < 305  # its own, never the other's
    assert max(toks[2]) < 300
    for i in (0, 1):
        alone = llm.generate([prompts[i]], params, lora_request=loras[i], use_tqdm=False)[0].outputs[0].token_ids
        assert alone == toks[i]


def test_added_tokens_errors(tmp_path) -> None:
    import os

    model_dir = make_tiny_model(tmp_path / "model", family="llama")
    path = make_added_tokens_adapter(model_dir, tmp_path / "added", seed=1, boost=1.0)
    llm = LLM(model_dir, dtype="float32", device="cpu", max_loras=1, max_lora_rank=16, num_kv_blocks=16,
              block_size=4)
    for f in os.listdir(path):
        if f.startswith(("tokenizer", "special_tokens", "added_tokens", "vocab", "merges", "chat_template")):
            os.remove(os.path.join(path, f))
    with pytest.raises(AdapterError, match="resized to 325 tokens, but the folder holds no tokenizer"):
        llm.add_lora(LoRARequest("no_tok", path))
    with pytest.raises(Exception, match=r"outside the vocabulary \[0, 300\)"):
        llm.generate([{"prompt_token_ids": [5, 310]}], SamplingParams(max_tokens=2), use_tqdm=False)


def test_added_tokens_through_the_server(tmp_path) -> None:
    """The server tokenizes an adding adapter's prompts with its tokenizer, renders its logprobs with it, and
    lists its vocabulary in /v1/models; completions equal offline generation."""
    from server_harness import ENGINE_KW, Server

    model_dir = make_tiny_model(tmp_path / "model", family="llama")
    path = make_added_tokens_adapter(model_dir, tmp_path / "added", seed=1, boost=3.0)
    text = "hello <tool3> world <tool20>"
    llm = LLM(model_dir, **ENGINE_KW)
    want = llm.generate(text, SamplingParams(max_tokens=8, temperature=0.0), lora_request=LoRARequest("added", path),
                        use_tqdm=False)[0].outputs[0]
    assert max(want.token_ids) >= 300
    s = Server(model_dir, {"added": path})
    try:
        c = s.client()
        cards = {m.id: m for m in c.models.list().data}
        assert cards["added"].vocab_size == 300 + len(ADDED) and cards["tiny"].vocab_size == 300
        r = c.completions.create(model="added", prompt=text, max_tokens=8, temperature=0, logprobs=1)
        assert r.choices[0].text == want.text and r.usage.prompt_tokens == len(llm.engine.pool.get("added")
                                                                               .tokenizer(text)["input_ids"])
        assert any(t in ADDED for t in r.choices[0].logprobs.tokens)  # its tokens, by its tokenizer
        base = c.completions.create(model="tiny", prompt=text, max_tokens=8, temperature=0)
        assert base.usage.prompt_tokens > r.usage.prompt_tokens  # the base tokenizer splits the added tokens
    finally:
        s.stop()


def test_chat_with_an_adding_adapter_uses_its_tokenizer(tmp_path) -> None:
    """LLM.chat renders a conversation for an adapter that adds tokens with that adapter's tokenizer (its added
    tokens single ids, as the server does), and with the model's for other requests."""
    from transformers import AutoTokenizer

    model_dir = make_tiny_model(tmp_path / "model", family="llama")
    path = make_added_tokens_adapter(model_dir, tmp_path / "added", seed=1, boost=1.0)
    llm = LLM(model_dir, dtype="float32", device="cpu", max_loras=2, max_lora_rank=16, seed=0, num_kv_blocks=64,
              block_size=4)
    conv = [{"role": "user", "content": "call <tool3> now"}]
    params = SamplingParams(max_tokens=2, temperature=0.0)
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    outs = llm.chat([conv, conv], params, lora_request=[LoRARequest("added", path), None], use_tqdm=False,
                    chat_template=template)
    tool3 = AutoTokenizer.from_pretrained(path).convert_tokens_to_ids("<tool3>")
    assert tool3 >= 300 and tool3 in outs[0].prompt_token_ids
    assert max(outs[1].prompt_token_ids) < 300
