"""Test fixtures: tiny random Hugging Face models and real PEFT LoRA adapters.

Everything is built locally with transformers / tokenizers / peft (no hub access) and is deterministic for a
given seed, so tests can compare loraplex against transformers + PEFT on the very same weights.

    model_dir = make_tiny_model(tmp_path / "m", family="qwen2")
    a = make_adapter(model_dir, tmp_path / "a", seed=1, target_modules=["q_proj", "v_proj"])
    ref = load_peft_model(model_dir, {"a": a})          # ref(ids, adapter_names=["a", "__base__"])
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub from a test
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

PathLike = Union[str, os.PathLike]

# Fixed training text for the tokenizer: a few plain English paragraphs (deterministic, no downloads).
TOKENIZER_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model reads a short story and writes the next word.
Once upon a time there was a little robot who lived in a quiet town by the sea. Every morning the robot
walked to the harbour, counted the boats, and said hello to the fishermen. The fishermen liked the robot,
because it always remembered their names and never forgot to ask about their children.

One day a storm came from the west. The wind was strong and the waves were high. The boats could not go
out, and the town was very quiet. The robot sat by the window and watched the rain. It wondered what the
fishermen would do without their work, and it decided to help them repair their nets.

Numbers and letters are tokens too: 0 1 2 3 4 5 6 7 8 9, and the alphabet goes a b c d e f g h i j k l m n
o p q r s t u v w x y z. Questions end with a question mark? Answers end with a full stop. Lists use
commas, like apples, pears, plums and cherries. Servers answer many requests at once, and each request
may ask for a different adapter, so the engine must keep every batch correct.
"""

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
TOKENIZER_VOCAB_SIZE = 300  # target for BPE training; the result is deliberately not a multiple of 64

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# The tiny shape every family shares: GQA (4 query heads, 2 kv heads), head_dim 16.
TINY_CONFIG: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)

INIT_STD = 0.2  # larger than HF's 0.02 so logits are peaked and greedy decoding reacts to LoRA

_model_cache: dict[str, str] = {}  # cache key -> first folder built with those arguments (one pytest session)


def _cache_root() -> Path:
    root = Path(tempfile.gettempdir()) / f"loraplex-test-models-{os.getpid()}"
    if not root.exists():
        root.mkdir(parents=True)
        atexit.register(shutil.rmtree, root, True)
    return root


def make_tokenizer(out_dir: Optional[PathLike] = None):
    """Train a small byte-level BPE on ``TOKENIZER_TEXT`` and wrap it in ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=[BOS_TOKEN, EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_TEXT.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    fast.chat_template = CHAT_TEMPLATE
    if len(fast) % 64 == 0:  # keep the "vocab is not a multiple of 64" property tests rely on
        fast.add_tokens(["<extra_0>"])
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def _model_classes(family: str):
    import transformers as tf

    family = family.lower()
    if family == "llama":
        return tf.LlamaConfig, tf.LlamaForCausalLM, {}
    if family == "qwen2":
        return tf.Qwen2Config, tf.Qwen2ForCausalLM, {"use_sliding_window": False}
    if family == "qwen3":
        return tf.Qwen3Config, tf.Qwen3ForCausalLM, {"use_sliding_window": False}
    if family == "mistral":
        return tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": None}
    raise ValueError(f"unknown tiny model family {family!r}; use llama, qwen2, qwen3 or mistral")


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Normal(0, INIT_STD) for every Linear/Embedding weight and every bias; norms stay at one."""
    gen = torch.Generator().manual_seed(seed)
    for _, module in sorted(model.named_modules(), key=lambda kv: kv[0]):
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * INIT_STD)
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * INIT_STD)


def make_tiny_model(
    out_dir: PathLike,
    family: str = "llama",
    tie_word_embeddings: bool = False,
    seed: int = 0,
    vocab_size: Optional[int] = None,
    **config_overrides: Any,
) -> str:
    """Build a tiny random causal LM plus tokenizer and save it as a real HF folder; return the folder.

    Shape: hidden 64, intermediate 128, 2 layers, 4 heads, 2 kv heads, head_dim 16, 256 positions, float32.
    ``config.vocab_size == len(tokenizer)`` (about 300, not a multiple of 64) unless ``vocab_size`` is given.
    Qwen2 keeps its q/k/v bias, Qwen3 its q/k norm. Same arguments -> same weights.
    """
    out_dir = Path(out_dir)
    key = json.dumps(
        [family.lower(), tie_word_embeddings, seed, vocab_size, sorted(config_overrides.items())], default=str
    )
    cached = _model_cache.get(key)
    if cached is not None and Path(cached, "config.json").is_file():
        if Path(cached).resolve() != out_dir.resolve():
            shutil.copytree(cached, out_dir, dirs_exist_ok=True)
        return str(out_dir)

    config_cls, model_cls, family_defaults = _model_classes(family)
    tokenizer = make_tokenizer()
    n_tok = len(tokenizer)
    if vocab_size is not None and vocab_size < n_tok:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({n_tok} tokens)")
    kwargs: dict[str, Any] = dict(TINY_CONFIG)
    kwargs.update(family_defaults)
    kwargs.update(
        vocab_size=vocab_size or n_tok,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    kwargs.update(config_overrides)
    config = config_cls(**kwargs)

    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    _randomize(model, seed)
    if tie_word_embeddings:
        model.tie_weights()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))

    cache_dir = _cache_root() / f"model-{len(_model_cache)}"
    shutil.copytree(out_dir, cache_dir, dirs_exist_ok=True)
    _model_cache[key] = str(cache_dir)
    return str(out_dir)


def load_base_model(model_dir: PathLike):
    """The saved tiny model through transformers, float32, eval mode (vision-language folders too)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    multimodal = hasattr(AutoConfig.from_pretrained(str(model_dir)), "vision_config")
    auto = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    return auto.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def make_adapter(
    model_dir: PathLike,
    out_dir: PathLike,
    seed: int = 0,
    r: int = 8,
    lora_alpha: int = 16,
    target_modules: Any = ("q_proj", "v_proj"),
    init_scale: float = 0.3,
    **lora_config_kwargs: Any,
) -> str:
    """Create a LoRA adapter with real PEFT for ``model_dir`` and save it to ``out_dir``; return ``out_dir``.

    Every LoRA tensor (``lora_A/B``, ``lora_embedding_A/B``, LoRA bias, trainable-token deltas) is redrawn as
    ``randn * init_scale`` from a generator seeded with ``seed``, so B is not zero and the adapter changes outputs.
    ``target_modules`` may be a list/tuple, a regex string or ``"all-linear"``; other ``LoraConfig`` fields
    (use_rslora, rank_pattern, alpha_pattern, layers_to_transform, exclude_modules, ...) pass through.
    """
    from peft import LoraConfig, get_peft_model

    if isinstance(target_modules, tuple):
        target_modules = list(target_modules)
    model = load_base_model(model_dir)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules, **lora_config_kwargs)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in sorted(peft_model.named_parameters(), key=lambda kv: kv[0]):
            is_lora = "lora_" in pname and "lora_magnitude_vector" not in pname  # DoRA magnitudes keep PEFT's init
            if is_lora or "trainable_tokens_delta" in pname:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * init_scale)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir))
    return str(out_dir)


def random_lora_stack(dtype, num_slots: int, max_rank: int, K: int, slices, slot_ranks: dict, device,
                      b_over_sqrt_rank: bool):
    """A LoRAStack with random A (K inputs) and B for each ``slot_ranks[slot]`` = ranks per slice (0: slice not
    targeted), scale 0.5 + 0.25 * slice + 0.1 * slot; B divided by sqrt(rank) when ``b_over_sqrt_rank``."""
    from loraplex.lora.backends.base import LoRAStack

    g = torch.Generator().manual_seed(1)
    w = LoRAStack.zeros(len(slices), num_slots, max_rank, max_rank, K, slices, dtype, device)
    for slot, ranks in slot_ranks.items():
        for i, r in enumerate(ranks):
            if r:
                w.a[i, slot, :r] = (torch.randn(r, K, generator=g) / K ** 0.5).to(dtype)
                b = torch.randn(slices[i], r, generator=g)
                w.b_slices[i][slot, :, :r] = (b / r ** 0.5 if b_over_sqrt_rank else b).to(dtype)
                w.set(slot, i, r, 0.5 + 0.25 * i + 0.1 * slot)
    return w


def edit_config(path: PathLike, **changes: Any) -> None:
    """Update fields of an adapter folder's adapter_config.json."""
    file = Path(path, "adapter_config.json")
    cfg = json.loads(file.read_text())
    cfg.update(changes)
    file.write_text(json.dumps(cfg))


def edit_tensors(path: PathLike, fn: Any) -> None:
    """``fn(tensors)`` edits the dict of an adapter folder's adapter_model.safetensors in place; saved back."""
    from safetensors.torch import load_file, save_file

    file = Path(path, "adapter_model.safetensors")
    tensors = load_file(str(file))
    fn(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(file))


def copy_adapter(src: PathLike, dst: PathLike) -> str:
    """A copy of an adapter folder's config and weights."""
    dst = Path(dst)
    dst.mkdir(parents=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (dst / f).write_bytes(Path(src, f).read_bytes())
    return str(dst)


def load_peft_model(model_dir: PathLike, adapters: dict[str, PathLike]):
    """Base model with every adapter loaded under its name (eval, float32): the parity reference.

    Call as ``model(input_ids, adapter_names=[...])`` with one name (or ``"__base__"``) per sequence.
    """
    from peft import PeftModel

    if not adapters:
        raise ValueError("load_peft_model needs at least one adapter")
    base = load_base_model(model_dir)
    items = list(adapters.items())
    first_name, first_path = items[0]
    peft_model = PeftModel.from_pretrained(base, str(first_path), adapter_name=first_name)
    for name, path in items[1:]:
        peft_model.load_adapter(str(path), adapter_name=name)
    return peft_model.to(torch.float32).eval()


# ---- Triton kernel variants launched under the interpreter ------------------------------------------------

def run_compile_script(script: str, *args: str, timeout: float = 300):
    """``python scripts/<script> args`` in a process without Triton's interpreter (the scripts compile kernels
    for an NVIDIA target, which the interpreter would not); skips the calling test when this Triton cannot
    compile for CUDA (no ptxas: a Triton without the NVIDIA backend). Returns the CompletedProcess."""
    import subprocess
    import sys

    import pytest

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = Path(__file__).resolve().parent.parent / "scripts" / script
    run = subprocess.run([sys.executable, str(path), *args], env=env, capture_output=True, text=True,
                         timeout=timeout)
    if run.returncode != 0 and "ptxas" in run.stderr:
        pytest.skip(f"this Triton cannot compile for CUDA here: {run.stderr.strip()[-200:]}")
    return run


# Every distinct (kernel, argument types, constexprs, options) the test session launched in Triton's
# interpreter, as scripts/compile_kernels.py takes them; filled once record_kernel_launches() is installed
# (tests/conftest.py, on machines without CUDA), checked by tests/test_kernel_compile.py.
KERNEL_VARIANTS: dict[str, dict] = {}

_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
                  torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


@functools.lru_cache(maxsize=None)
def _kernel_params(fn: Any) -> Any:
    """The kernel's parameters (every interpreted launch asks)."""
    import inspect

    return inspect.signature(fn).parameters


def _kernel_variant(fn: Any, arg_names: list[str], args: tuple, kwargs: dict) -> Optional[dict]:
    """The variant of one launch, or None if a value has no Triton type or JSON form."""
    import inspect

    params = _kernel_params(fn)
    values = {**{p.name: p.default for p in params.values() if p.default is not inspect.Parameter.empty},
              **dict(zip(arg_names, args)), **{k: v for k, v in kwargs.items() if k in params}}
    options = {k: v for k, v in kwargs.items() if k not in params}
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    for name, param in params.items():
        v = values.get(name)
        if "constexpr" in str(param.annotation) or v is None:
            if not isinstance(v, (int, float, str, bool, type(None))):
                return None
            signature[name] = "constexpr"
            constexprs[name] = v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + _TRITON_DTYPES[v.dtype]
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            signature[name] = "i32" if -(2 ** 31) <= v < 2 ** 31 else "i64"
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            return None
    if not all(isinstance(v, (int, float, str, bool, type(None))) for v in options.values()):
        return None
    if "UPCAST" in constexprs:  # the interpreter's stand-in for bf16 dots (kernels/common.py); a GPU compiles False
        constexprs["UPCAST"] = False
    return {"module": fn.__module__, "kernel": fn.__name__, "signature": signature, "constexprs": constexprs,
            "options": options}


def record_kernel_launches() -> None:
    """Wrap the interpreter's kernel launch so that each launch's variant lands in KERNEL_VARIANTS."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # a Triton without the interpreter (or none): nothing to record
        return

    run = InterpretedFunction.run
    if getattr(run, "records_variants", False):
        return

    def recording_run(self, *args, grid, warmup, **kwargs):
        variant = _kernel_variant(self.fn, self.arg_names, args, kwargs)
        if variant is not None:
            KERNEL_VARIANTS.setdefault(json.dumps(variant, sort_keys=True), variant)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    recording_run.records_variants = True
    InterpretedFunction.run = recording_run


def _main() -> None:
    """``python tests/helpers.py OUT_DIR``: a tiny random Llama folder and two PEFT adapters, for trying
    the CLI without downloading a model (the text it generates is noise: the weights are random)."""
    import argparse

    parser = argparse.ArgumentParser(description=_main.__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--family", default="llama", choices=["llama", "mistral", "qwen2", "qwen3"])
    args = parser.parse_args()
    out = Path(args.out_dir)
    model_dir = make_tiny_model(out / "model", family=args.family)
    make_adapter(model_dir, out / "adapter-qv", seed=1, r=8, target_modules=["q_proj", "v_proj"])
    make_adapter(model_dir, out / "adapter-emb", seed=2, r=4, target_modules=["embed_tokens", "lm_head", "o_proj"])
    print(f"model: {model_dir}\nadapters: {out / 'adapter-qv'} {out / 'adapter-emb'}")


if __name__ == "__main__":
    _main()
