"""load_adapter against adapters written by real PEFT for a tiny Llama: tensors, scaling, targeting, errors."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import (copy_adapter, edit_config, edit_tensors, load_base_model, load_peft_model, make_adapter,
                     make_tiny_model)
from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.errors import AdapterError
from loraplex.lora.adapter import AdapterTargetSpec, LoRAAdapter, ModuleTarget, load_adapter

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
ATTN0 = "model.layers.0.self_attn"


# --------------------------------------------------------------------------------------------------- fixtures
def spec_from_model(model: torch.nn.Module, with_base: bool = True) -> AdapterTargetSpec:
    """Every nn.Linear under model.layers.* and lm_head as linear targets, model.embed_tokens as embedding."""
    modules: dict[str, ModuleTarget] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and (name.startswith("model.layers.") or name == "lm_head"):
            modules[name] = ModuleTarget(name, "linear", mod.in_features, mod.out_features)
    emb = model.get_input_embeddings()
    modules["model.embed_tokens"] = ModuleTarget("model.embed_tokens", "embedding", emb.num_embeddings,
                                                 emb.embedding_dim)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    params["lm_head.weight"] = model.get_output_embeddings().weight.detach().clone()
    return AdapterTargetSpec(
        modules=modules,
        packed_modules_mapping=PACKED,
        num_layers=model.config.num_hidden_layers,
        vocab_size=emb.num_embeddings,
        base_weight=((lambda n: (params[f"{n}.weight"], lambda t: t) if f"{n}.weight" in params else None)
                     if with_base else (lambda n: None)),
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", family="llama", seed=0)


@pytest.fixture(scope="module")
def spec(model_dir) -> AdapterTargetSpec:
    return spec_from_model(load_base_model(model_dir))


@pytest.fixture(scope="module")
def plain_adapter(model_dir, tmp_path_factory) -> str:
    return make_adapter(model_dir, tmp_path_factory.mktemp("plain") / "a", seed=1)


def load(path, spec, name="a", max_rank=64) -> LoRAAdapter:
    return load_adapter(name, str(path), spec, max_rank)


def peft_reference(model_dir, path, name="a") -> dict[str, tuple[int, float, torch.Tensor, torch.Tensor]]:
    """module name -> (r, scaling, A, B) exactly as PEFT's own loaded model holds them."""
    from peft.tuners.lora import LoraLayer

    pm = load_peft_model(model_dir, {name: path})
    out = {}
    for mod_name, mod in pm.base_model.model.named_modules():
        if not isinstance(mod, LoraLayer) or name not in mod.scaling:
            continue
        if name in mod.lora_A:
            A, B = mod.lora_A[name].weight, mod.lora_B[name].weight
        else:
            A, B = mod.lora_embedding_A[name], mod.lora_embedding_B[name]
        out[mod_name] = (mod.r[name], mod.scaling[name], A.detach().float(), B.detach().float())
    return out


def assert_matches_peft(adapter: LoRAAdapter, model_dir, path) -> None:
    ref = peft_reference(model_dir, path)
    assert sorted(adapter.modules) == sorted(ref)
    for name, (r, scaling, A, B) in ref.items():
        w = adapter.modules[name]
        assert w.rank == r, name
        assert w.scaling == pytest.approx(scaling, rel=1e-12), name
        assert w.A.dtype == torch.float32 and w.B.dtype == torch.float32
        torch.testing.assert_close(w.A, A, rtol=0, atol=0)
        torch.testing.assert_close(w.B, B, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------- tensors
def test_plain_adapter_matches_peft(model_dir, spec, plain_adapter):
    adapter = load(plain_adapter, spec)
    expected = {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    assert set(adapter.modules) == expected
    saved = load_file(os.path.join(plain_adapter, WEIGHTS))
    q = adapter.modules[f"{ATTN0}.q_proj"]
    assert torch.equal(q.A, saved[f"{PREFIX}{ATTN0}.q_proj.lora_A.weight"])
    assert torch.equal(q.B, saved[f"{PREFIX}{ATTN0}.q_proj.lora_B.weight"])
    assert q.B.abs().sum() > 0 and q.scaling == 16 / 8
    assert adapter.modules[f"{ATTN0}.v_proj"].B.shape == (32, 8)  # GQA: 2 kv heads x 16
    assert adapter.config["peft_type"] == "LORA" and adapter.name == "a" and adapter.ignored_keys == ()
    assert adapter.max_rank == 8
    assert_matches_peft(adapter, model_dir, plain_adapter)
    assert load(plain_adapter, spec).uid != adapter.uid


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(use_rslora=True, r=16, lora_alpha=8),
        dict(rank_pattern={"v_proj": 4}),
        dict(alpha_pattern={r"layers\.1\.self_attn\.q_proj": 64}),
        # first matching key wins: layer 0's q_proj gets r=2 (its key comes first), the other q_proj r=4
        dict(rank_pattern={r"model\.layers\.0\.self_attn\.q_proj": 2, "q_proj": 4}, alpha_pattern={"q_proj": 3}),
        dict(use_rslora=True, rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 5}),
    ],
    ids=["rslora", "rank_pattern", "alpha_pattern_regex", "first_key_wins", "rslora_patterns"],
)
def test_scaling_matches_peft(model_dir, spec, tmp_path, kwargs):
    path = make_adapter(model_dir, tmp_path / "a", seed=2, **kwargs)
    adapter = load(path, spec)
    assert_matches_peft(adapter, model_dir, path)
    # and against the formula, so a shared misreading of PEFT would still show
    for name, w in adapter.modules.items():
        r = w.rank
        alpha = kwargs.get("lora_alpha", 16)
        for key, value in kwargs.get("alpha_pattern", {}).items():
            if re.match(rf"(.*\.)?({key})$", name):
                alpha = value
                break
        expected = alpha / math.sqrt(r) if kwargs.get("use_rslora") else alpha / r
        assert w.scaling == pytest.approx(expected), name


def test_embedding_and_lm_head_lora(model_dir, spec, tmp_path):
    path = make_adapter(model_dir, tmp_path / "a", seed=3, target_modules=["embed_tokens", "lm_head", "q_proj"])
    saved = load_file(os.path.join(path, WEIGHTS))
    # PEFT 0.21 saves full base copies beside embedding / head LoRA
    assert f"{PREFIX}model.embed_tokens.base_layer.weight" in saved
    assert f"{PREFIX}lm_head.base_layer.weight" in saved
    adapter = load(path, spec)
    emb = adapter.modules["model.embed_tokens"]
    assert emb.A.shape == (8, spec.vocab_size) and emb.B.shape == (64, 8)
    assert torch.equal(emb.A, saved[f"{PREFIX}model.embed_tokens.lora_embedding_A"])
    assert adapter.modules["lm_head"].B.shape == (spec.vocab_size, 8)
    assert_matches_peft(adapter, model_dir, path)
    # without base weights to compare against, the copies are accepted unchecked
    no_base = spec_from_model(load_base_model(model_dir), with_base=False)
    assert set(load(path, no_base).modules) == set(adapter.modules)


@pytest.mark.parametrize("key", ["model.embed_tokens.base_layer.weight", "lm_head.base_layer.weight"])
def test_modified_base_copy_rejected(model_dir, spec, tmp_path, key):
    path = make_adapter(model_dir, tmp_path / "a", seed=3, target_modules=["embed_tokens", "lm_head"])

    def bump(t):
        t[PREFIX + key][5, 3] += 1e-3

    edit_tensors(path, bump)
    with pytest.raises(AdapterError, match=rf"{re.escape(key)}.*modified copy of the base weights"):
        load(path, spec)


def test_adapter_name_segment_in_keys_tolerated(spec, plain_adapter, tmp_path):
    path = copy_adapter(plain_adapter, tmp_path / "named")
    edit_tensors(path, lambda t: t.update({k.replace(".weight", ".default.weight"): t.pop(k) for k in list(t)}))
    assert set(load(path, spec).modules) == set(load(plain_adapter, spec).modules)


def test_bf16_tensors_keep_their_dtype_until_a_slot_takes_them(spec, plain_adapter, tmp_path, model_dir):
    """A bf16 adapter is held in bf16 (no float32 copy); a float32 model's slot converts it: the outputs equal
    those of a float32 file holding the same bf16-rounded values."""
    path = copy_adapter(plain_adapter, tmp_path / "bf16")
    edit_tensors(path, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    rounded = copy_adapter(plain_adapter, tmp_path / "rounded")
    edit_tensors(rounded, lambda t: t.update({k: v.to(torch.bfloat16).float() for k, v in t.items()}))
    w = load(path, spec).modules[f"{ATTN0}.q_proj"]
    ref = load(plain_adapter, spec).modules[f"{ATTN0}.q_proj"]
    assert w.A.dtype == torch.bfloat16 and torch.equal(w.A, ref.A.to(torch.bfloat16))
    llm = LLM(model_dir, dtype="float32", device="cpu", max_loras=2, max_lora_rank=16, num_kv_blocks=32,
              block_size=4, seed=0)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    a, b = llm.generate([{"prompt_token_ids": [5, 17, 33, 99, 120]}] * 2, params, use_tqdm=False,
                        lora_request=[LoRARequest("bf16", path), LoRARequest("rounded", rounded)])
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    # two slots in one batch: the same values, summed in tiles of other shapes (float32 rounding only)
    diffs = [abs(list(x.values())[0] - list(y.values())[0]) for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:])]
    assert max(diffs) < 1e-5


# --------------------------------------------------------------------------------------------------- targeting
def test_all_linear_with_exclude_modules(model_dir, spec, tmp_path):
    excluded = "model.layers.0.mlp.down_proj"
    path = make_adapter(model_dir, tmp_path / "a", seed=4, target_modules="all-linear", exclude_modules=[excluded])
    cfg = json.loads(Path(path, CONFIG).read_text())
    assert excluded in cfg["target_modules"]  # PEFT expands all-linear without applying the exclusion
    adapter = load(path, spec)
    assert len(adapter.modules) == 13 and excluded not in adapter.modules and "lm_head" not in adapter.modules
    assert_matches_peft(adapter, model_dir, path)

    # tensors for the excluded module are ignored, as PEFT (which never wrapped it) ignores them
    def inject(t):
        src = f"{PREFIX}model.layers.1.mlp.down_proj"
        t[f"{PREFIX}{excluded}.lora_A.weight"] = t[f"{src}.lora_A.weight"].clone()
        t[f"{PREFIX}{excluded}.lora_B.weight"] = t[f"{src}.lora_B.weight"].clone()

    edit_tensors(path, inject)
    adapter = load(path, spec)
    assert excluded not in adapter.modules
    assert f"{PREFIX}{excluded}.lora_A.weight" in adapter.ignored_keys
    assert_matches_peft(adapter, model_dir, path)

    # the literal shorthand (hand-written configs) means every linear but the output head
    edit_config(path, target_modules="ALL-LINEAR", exclude_modules=None)

    def add_head(t):
        t[f"{PREFIX}lm_head.lora_A.weight"] = torch.randn(8, 64)
        t[f"{PREFIX}lm_head.lora_B.weight"] = torch.randn(spec.vocab_size, 8)

    edit_tensors(path, add_head)
    adapter = load(path, spec)
    assert len(adapter.modules) == 14 and "lm_head" not in adapter.modules
    assert f"{PREFIX}lm_head.lora_A.weight" in adapter.ignored_keys


def test_exclude_modules_regex(model_dir, spec, tmp_path):
    path = make_adapter(model_dir, tmp_path / "a", seed=4, target_modules=["q_proj", "k_proj", "v_proj"],
                        exclude_modules=r".*layers\.1\.self_attn\.(q|k)_proj")
    adapter = load(path, spec)
    assert set(adapter.modules) == {f"{ATTN0}.q_proj", f"{ATTN0}.k_proj", f"{ATTN0}.v_proj",
                                    "model.layers.1.self_attn.v_proj"}
    assert_matches_peft(adapter, model_dir, path)


def test_layers_to_transform(model_dir, spec, tmp_path):
    path = make_adapter(model_dir, tmp_path / "a", seed=5, target_modules=["q_proj", "down_proj"],
                        layers_to_transform=[1], layers_pattern="layers")
    adapter = load(path, spec)
    assert set(adapter.modules) == {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    assert_matches_peft(adapter, model_dir, path)

    def inject(t):  # layer-0 tensors PEFT would not load
        for ab in ("lora_A", "lora_B"):
            t[f"{PREFIX}{ATTN0}.q_proj.{ab}.weight"] = t[f"{PREFIX}model.layers.1.self_attn.q_proj.{ab}.weight"].clone()

    edit_tensors(path, inject)
    adapter = load(path, spec)
    assert f"{ATTN0}.q_proj" not in adapter.modules and len(adapter.ignored_keys) == 2
    assert_matches_peft(adapter, model_dir, path)


def test_regex_target_modules(model_dir, spec, tmp_path):
    path = make_adapter(model_dir, tmp_path / "a", seed=6, target_modules=r".*\.layers\.1\.self_attn\.(q|o)_proj")
    adapter = load(path, spec)
    assert set(adapter.modules) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj"}
    assert_matches_peft(adapter, model_dir, path)


def test_targets_without_tensors_accepted(spec, plain_adapter, tmp_path):
    path = copy_adapter(plain_adapter, tmp_path / "partial")
    edit_tensors(path, lambda t: [t.pop(k) for k in list(t) if "layers.1" in k])
    edit_config(path, target_modules=["q_proj", "v_proj", "k_proj"])  # k_proj: targeted, no tensors
    assert set(load(path, spec).modules) == {f"{ATTN0}.q_proj", f"{ATTN0}.v_proj"}


def write_fused_adapter(path, r=4, q_out=64, kv_out=32, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        f"{PREFIX}{ATTN0}.qkv_proj.lora_A.weight": torch.randn(r, 64, generator=g),
        f"{PREFIX}{ATTN0}.qkv_proj.lora_B.weight": torch.randn(q_out + 2 * kv_out, r, generator=g),
        f"{PREFIX}model.layers.1.mlp.gate_up_proj.lora_A.weight": torch.randn(r, 64, generator=g),
        f"{PREFIX}model.layers.1.mlp.gate_up_proj.lora_B.weight": torch.randn(256, r, generator=g),
    }
    os.makedirs(path)
    save_file(tensors, os.path.join(path, WEIGHTS))
    Path(path, CONFIG).write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": ["qkv_proj", "gate_up_proj"]}))
    return tensors


def test_fused_modules_are_split(spec, tmp_path):
    path = str(tmp_path / "fused")
    tensors = write_fused_adapter(path)
    adapter = load(path, spec)
    assert set(adapter.modules) == {f"{ATTN0}.{p}" for p in ("q_proj", "k_proj", "v_proj")} | {
        f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj")}
    A = tensors[f"{PREFIX}{ATTN0}.qkv_proj.lora_A.weight"]
    B = tensors[f"{PREFIX}{ATTN0}.qkv_proj.lora_B.weight"]
    x = torch.randn(3, 64)
    parts = [adapter.modules[f"{ATTN0}.{p}"] for p in ("q_proj", "k_proj", "v_proj")]
    assert [w.B.shape[0] for w in parts] == [64, 32, 32]
    assert all(torch.equal(w.A, A) for w in parts) and parts[0].A.data_ptr() != parts[1].A.data_ptr()
    split = torch.cat([x @ w.A.T @ w.B.T * w.scaling for w in parts], dim=1)
    torch.testing.assert_close(split, x @ A.T @ B.T * 2.0)


def test_fused_wrong_total_rejected(spec, tmp_path):
    path = str(tmp_path / "fused")
    write_fused_adapter(path, q_out=64, kv_out=16)
    with pytest.raises(AdapterError, match=r"qkv_proj\.lora_B\.weight.*\(96, 4\).*\(128, 4\)"):
        load(path, spec)


# --------------------------------------------------------------------------------------------------- errors
def test_error_is_a_value_error(spec, tmp_path):
    with pytest.raises(ValueError) as info:
        load(tmp_path / "nowhere", spec, name="ghost")
    assert isinstance(info.value, AdapterError)
    assert "ghost" in str(info.value) and "nowhere" in str(info.value) and "does not exist" in str(info.value)


def test_missing_and_broken_files(spec, plain_adapter, tmp_path):
    path = copy_adapter(plain_adapter, tmp_path / "x")
    os.remove(os.path.join(path, CONFIG))
    with pytest.raises(AdapterError, match=rf"'a'.*missing {CONFIG}"):
        load(path, spec)
    path = copy_adapter(plain_adapter, tmp_path / "y")
    Path(path, CONFIG).write_text("{not json")
    with pytest.raises(AdapterError, match=rf"{CONFIG} is not valid JSON"):
        load(path, spec)
    path = copy_adapter(plain_adapter, tmp_path / "z")
    os.remove(os.path.join(path, WEIGHTS))
    with pytest.raises(AdapterError, match=rf"missing {WEIGHTS}"):
        load(path, spec)
    path = copy_adapter(plain_adapter, tmp_path / "w")
    Path(path, WEIGHTS).write_bytes(b"\x10\x00garbage")
    with pytest.raises(AdapterError, match=rf"{WEIGHTS}: cannot read"):
        load(path, spec)


def test_pickled_weights_refused_never_unpickled(spec, plain_adapter, tmp_path, monkeypatch):
    path = copy_adapter(plain_adapter, tmp_path / "pickled")
    os.remove(os.path.join(path, WEIGHTS))
    Path(path, "adapter_model.bin").write_bytes(b"not really a pickle")

    def boom(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", boom)
    with pytest.raises(AdapterError, match=r"adapter_model\.bin.*pickled weights are refused and never unpickled"):
        load(path, spec)


@pytest.mark.parametrize(
    "changes, pattern",
    [
        (dict(peft_type="IA3"), r"peft_type is 'IA3'"),
        (dict(use_dora=True), r"sets use_dora, but module .* has no lora_magnitude_vector tensor"),
        (dict(lora_bias=True), r"sets lora_bias, but module .* has no lora_B\.bias tensor"),
        (dict(lora_bias=True, use_dora=True), r"use_dora and lora_bias together"),
        (dict(use_qalora=True), r"QALoRA"),
        (dict(target_parameters=["mlp.experts.gate_up_proj"]), r"target_parameters"),
        (dict(trainable_token_indices=[1, 2]), r"gives trainable tokens for .*embed_tokens.* but there is no"),
        (dict(alora_invocation_tokens=[5, 6]), r"alora_invocation_tokens"),
        (dict(layer_replication=[[0, 2], [1, 2]]), r"layer_replication"),
        (dict(init_lora_weights="pissa"), r"init_lora_weights='pissa'.*modifies the base weights"),
        (dict(bias="all"), r"bias='all'"),
        (dict(r=0), r"r must be a positive integer"),
        (dict(target_modules=None), r"target_modules must be"),
    ],
)
def test_unsupported_config_features(spec, plain_adapter, tmp_path, changes, pattern):
    path = copy_adapter(plain_adapter, tmp_path / "cfg")
    edit_config(path, **changes)
    with pytest.raises(AdapterError, match=rf"'a'.*{CONFIG}.*{pattern}"):
        load(path, spec)


def test_dora_adapter_loads_with_its_magnitudes(model_dir, spec, tmp_path):
    path = make_adapter(model_dir, tmp_path / "dora", seed=7, use_dora=True)
    adapter = load(path, spec)
    assert adapter.has_dora
    q = adapter.modules["model.layers.0.self_attn.q_proj"]
    assert q.magnitude is not None and q.magnitude.shape == (q.B.shape[0],)
    edit_config(path, use_dora=False)  # magnitudes without use_dora: refused, naming the tensor
    with pytest.raises(AdapterError, match=r"q_proj\.lora_magnitude_vector.*DoRA magnitude.*use_dora"):
        load(path, spec)


def test_lora_bias_adapter_loads_with_its_biases(model_dir, spec, tmp_path):
    path = make_adapter(model_dir, tmp_path / "lb", seed=7, lora_bias=True)
    adapter = load(path, spec)
    q = adapter.modules["model.layers.0.self_attn.q_proj"]
    assert q.bias is not None and q.bias.shape == (q.B.shape[0],) and not adapter.has_dora
    edit_config(path, lora_bias=False)  # biases without lora_bias: refused, naming the tensor
    with pytest.raises(AdapterError, match=r"lora_B\.bias.*is a LoRA bias, but .* does not set lora_bias"):
        load(path, spec)


def test_trainable_tokens_load(model_dir, spec, tmp_path):
    path = make_adapter(model_dir, tmp_path / "tt", seed=7, trainable_token_indices=[1, 2, 3])
    adapter = load(path, spec)
    ids, rows = adapter.tokens["model.embed_tokens"]
    assert ids.tolist() == [1, 2, 3] and rows.shape[0] == 3
    edit_config(path, trainable_token_indices=None)  # the tensor without the config: refused, naming it
    with pytest.raises(AdapterError, match=r"embed_tokens\.token_adapter\.trainable_tokens_delta.*trainable tokens"):
        load(path, spec)


def test_modules_to_save(model_dir, spec, tmp_path):
    path = make_adapter(model_dir, tmp_path / "mts", seed=8, modules_to_save=["lm_head"])
    assert f"{PREFIX}lm_head.weight" in load_file(os.path.join(path, WEIGHTS))
    adapter = load(path, spec)  # an untouched copy is harmless
    assert "lm_head" not in adapter.modules and len(adapter.modules) == 4

    def train(t):
        t[f"{PREFIX}lm_head.weight"] = t[f"{PREFIX}lm_head.weight"] * 1.01

    # PEFT never puts LoRA on a module it saves whole: LoRA tensors for it are ignored
    path_lora = copy_adapter(path, tmp_path / "mts_lora")
    edit_config(path_lora, target_modules=["q_proj", "v_proj", "lm_head"])

    def add_head(t):
        t[f"{PREFIX}lm_head.lora_A.weight"] = torch.randn(8, 64)
        t[f"{PREFIX}lm_head.lora_B.weight"] = torch.randn(spec.vocab_size, 8)

    edit_tensors(path_lora, add_head)
    adapter = load(path_lora, spec)
    assert "lm_head" not in adapter.modules and len(adapter.ignored_keys) == 2

    edit_tensors(path, train)  # a trained copy of the head: the adapter's own table
    adapter = load(path, spec)
    base_head = spec.base_weight("lm_head")[0]
    assert torch.allclose(adapter.saved["lm_head"], base_head.float() * 1.01)
    no_base = spec_from_model(load_base_model(model_dir), with_base=False)
    with pytest.raises(AdapterError, match=r"modules_to_save.*not available"):
        load(path, no_base)


@pytest.mark.parametrize("targeted", [False, True])
def test_resized_vocabulary_without_tokenizer_refused(model_dir, spec, tmp_path, targeted):
    from peft import LoraConfig, get_peft_model

    model = load_base_model(model_dir)
    model.resize_token_embeddings(spec.vocab_size + 7, mean_resizing=False)
    targets = ["q_proj", "embed_tokens"] if targeted else ["q_proj"]
    get_peft_model(model, LoraConfig(r=4, target_modules=targets)).save_pretrained(str(tmp_path / "rs"))
    # PEFT saves the resized base tables too (embed_tokens/lm_head ``.weight``, or ``.base_layer.weight``)
    saved = load_file(str(tmp_path / "rs" / WEIGHTS))
    copies = [k for k in saved if k.endswith("embed_tokens.base_layer.weight" if targeted else "lm_head.weight")]
    assert copies and saved[copies[0]].shape[0] == spec.vocab_size + 7
    # (tables extended without the tokenizer that adds the tokens, or LoRA on an extended embedding: refused)
    want = (rf"resized \(model.embed_tokens: {spec.vocab_size + 7} rows.*must save both embed_tokens and lm_head"
            if targeted else rf"resized to {spec.vocab_size + 7} tokens, but the folder holds no tokenizer")
    with pytest.raises(AdapterError, match=want):
        load(tmp_path / "rs", spec)
    if targeted:  # the LoRA tensor alone gives it away as well
        edit_tensors(tmp_path / "rs", lambda t: t.pop(copies[0]))
        with pytest.raises(AdapterError, match=rf"lora_embedding_A.*\(4, {spec.vocab_size + 7}\).*resized vocab"):
            load(tmp_path / "rs", spec)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_other_families_match_peft(tmp_path, family):
    model_dir = make_tiny_model(tmp_path / family, family=family, seed=1)
    fam_spec = spec_from_model(load_base_model(model_dir))
    path = make_adapter(model_dir, tmp_path / "a", seed=9, target_modules=["embed_tokens", "lm_head", "q_proj",
                                                                        "k_proj", "gate_proj"])
    adapter = load(path, fam_spec)
    assert len(adapter.modules) == 2 + 3 * 2
    assert_matches_peft(adapter, model_dir, path)


def test_tied_embeddings_with_ensure_weight_tying(tmp_path):
    model_dir = make_tiny_model(tmp_path / "tied", tie_word_embeddings=True, seed=2)
    tied_spec = spec_from_model(load_base_model(model_dir))
    path = make_adapter(model_dir, tmp_path / "a", seed=10, target_modules=["embed_tokens", "q_proj"],
                        ensure_weight_tying=True)
    assert "lm_head" not in json.loads(Path(path, CONFIG).read_text())["target_modules"]
    adapter = load(path, tied_spec)
    assert {"model.embed_tokens", "lm_head"} <= set(adapter.modules)  # PEFT ties the head's LoRA to the embedding
    assert_matches_peft(adapter, model_dir, path)


def test_shape_mismatch_names_key_and_shapes(spec, plain_adapter, tmp_path):
    path = copy_adapter(plain_adapter, tmp_path / "shape")
    key = f"{PREFIX}{ATTN0}.v_proj.lora_B.weight"
    edit_tensors(path, lambda t: t.update({key: torch.zeros(48, 8)}))
    with pytest.raises(AdapterError, match=rf"'a'.*{WEIGHTS}.*{re.escape(key)}.*\(48, 8\).*expected \(32, 8\)"):
        load(path, spec)


def test_rank_disagrees_with_config(spec, plain_adapter, tmp_path):
    path = copy_adapter(plain_adapter, tmp_path / "rank")
    edit_config(path, rank_pattern={"v_proj": 4})
    with pytest.raises(AdapterError, match=r"v_proj\.lora_A\.weight.*rank 8.*r=4"):
        load(path, spec)


def test_a_and_b_ranks_disagree(spec, plain_adapter, tmp_path):
    path = copy_adapter(plain_adapter, tmp_path / "ab")
    key = f"{PREFIX}{ATTN0}.q_proj.lora_B.weight"
    edit_tensors(path, lambda t: t.update({key: torch.zeros(64, 4)}))
    with pytest.raises(AdapterError, match=rf"q_proj\.lora_A\.weight.*\(8, 64\).*{re.escape(key)}.*\(64, 4\).*rank"):
        load(path, spec)


def test_rank_above_limit(spec, plain_adapter):
    with pytest.raises(AdapterError, match=r"'a'.*q_proj.*rank 8.*max_lora_rank=4"):
        load(plain_adapter, spec, max_rank=4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values(spec, plain_adapter, tmp_path, bad):
    path = copy_adapter(plain_adapter, tmp_path / "nan")
    key = f"{PREFIX}model.layers.1.self_attn.q_proj.lora_B.weight"

    def poison(t):
        t[key][3, 1] = bad

    edit_tensors(path, poison)
    with pytest.raises(AdapterError, match=rf"{re.escape(key)}.*NaN or Inf"):
        load(path, spec)


def test_target_not_in_model(spec, plain_adapter, tmp_path):
    path = copy_adapter(plain_adapter, tmp_path / "foo")
    edit_config(path, target_modules=["q_proj", "foo_proj"])
    with pytest.raises(AdapterError, match=r"target module 'foo_proj' not found in model; model has: .*q_proj"):
        load(path, spec)
    edit_config(path, target_modules=r".*\.nothing_here")
    with pytest.raises(AdapterError, match=r"nothing_here' not found in model"):
        load(path, spec)


def test_key_for_missing_module(spec, plain_adapter, tmp_path):
    path = copy_adapter(plain_adapter, tmp_path / "extra")
    key = f"{PREFIX}model.layers.5.self_attn.q_proj.lora_A.weight"

    def add(t):
        t[key] = torch.zeros(8, 64)
        t[key.replace("lora_A", "lora_B")] = torch.zeros(64, 8)

    edit_tensors(path, add)
    with pytest.raises(AdapterError, match=rf"{re.escape(key)}.*model\.layers\.5\.self_attn\.q_proj.*does not have"):
        load(path, spec)


def test_unpaired_tensor(spec, plain_adapter, tmp_path):
    path = copy_adapter(plain_adapter, tmp_path / "half")
    key = f"{PREFIX}{ATTN0}.q_proj.lora_B.weight"
    edit_tensors(path, lambda t: t.pop(key))
    with pytest.raises(AdapterError, match=r"q_proj\.lora_A\.weight.*no matching lora_B"):
        load(path, spec)
