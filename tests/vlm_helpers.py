"""Tiny random vision-language models saved as real Hugging Face folders: weights, a tokenizer with the
family's image tokens, the image processor (``preprocessor_config.json``) and the processor, all built
locally (no downloads). PEFT adapters for them come from ``helpers.make_adapter`` as for text models.

    model_dir = make_tiny_vlm(tmp_path / "m", family="qwen2_vl")
    proc = load_processor(model_dir)             # transformers' own processor: the reference expansion
    prompt = image_prompt(model_dir, "Describe {image} in words")
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from helpers import INIT_STD, PathLike, _cache_root, _randomize, make_tokenizer

# Image tokens each family's processor and chat template use.
IMAGE_TOKENS = {"qwen2_vl": "<|image_pad|>", "llava": "<image>"}
_SPECIAL = {"qwen2_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
            "llava": ["<image>"]}
# How one image appears in a prompt.
IMAGE_SNIPPET = {"qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>", "llava": "<image>"}

TEXT_CONFIG: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
# Qwen2-VL: patch 4, merge 2 -> one token per 8x8 pixels; images are resized to at most 48x48 pixels.
QWEN2_VL_VISION = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                       spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu")
QWEN2_VL_PIXELS = dict(min_pixels=8 * 8 * 4, max_pixels=48 * 48)
# LLaVA: CLIP on 16x16 crops with 4x4 patches -> 16 features per image (class token dropped).
LLAVA_VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=2, image_size=16, patch_size=4, projection_dim=32, hidden_act="quick_gelu")

_vlm_cache: dict[str, str] = {}


def make_vlm_tokenizer(family: str):
    tok = make_tokenizer()
    tok.add_tokens(_SPECIAL[family], special_tokens=True)
    return tok


def _config(family: str, tok, tie_word_embeddings: bool):
    import transformers as tf

    ids = {t: tok.convert_tokens_to_ids(t) for t in _SPECIAL[family]}
    text = dict(TEXT_CONFIG, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    if family == "qwen2_vl":
        text["rope_parameters"] = {"rope_type": "mrope", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
        return tf.Qwen2VLConfig(text_config=text, vision_config=dict(QWEN2_VL_VISION),
                                image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                                tie_word_embeddings=tie_word_embeddings)
    if family == "llava":
        return tf.LlavaConfig(text_config=dict(text, model_type="llama", head_dim=16), vision_config=dict(LLAVA_VISION),
                              image_token_index=ids["<image>"], projector_hidden_act="gelu", vision_feature_layer=-2,
                              vision_feature_select_strategy="default", tie_word_embeddings=tie_word_embeddings)
    raise ValueError(f"unknown tiny VLM family {family!r}; use qwen2_vl or llava")


def _image_processor(family: str):
    import transformers as tf

    if family == "qwen2_vl":
        return tf.Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2, **QWEN2_VL_PIXELS)
    return tf.CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})


def load_processor(model_dir: PathLike):
    """transformers' own processor for the folder (tokenizer + image processor): the reference for
    placeholder expansion and model inputs."""
    import transformers as tf

    d = str(model_dir)
    tok = tf.AutoTokenizer.from_pretrained(d)
    ip = tf.AutoImageProcessor.from_pretrained(d)
    if family_of(d) == "qwen2_vl":
        return _Qwen2VLImageOnlyProcessor(image_processor=ip, tokenizer=tok, video_processor=None)
    config = tf.AutoConfig.from_pretrained(d)
    return tf.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=config.vision_config.patch_size,
                             vision_feature_select_strategy=config.vision_feature_select_strategy,
                             num_additional_image_tokens=1)


def _qwen2_vl_processor_class():
    import transformers as tf

    class Qwen2VLImageOnlyProcessor(tf.Qwen2VLProcessor):
        """Qwen2VLProcessor without a video processor: transformers cannot type-check a missing video
        processor when torchvision is not installed; images and text go through the real code."""

        def check_argument_for_proper_class(self, argument_name, argument):
            return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)

    return Qwen2VLImageOnlyProcessor


def _Qwen2VLImageOnlyProcessor(**kwargs):
    return _qwen2_vl_processor_class()(**kwargs)


@torch.no_grad()
def _randomize_vlm(model: torch.nn.Module, seed: int) -> None:
    """helpers._randomize (every Linear/Embedding) plus convolutions, class embeddings and norms, so that a
    weight the engine failed to load shows up in the numbers."""
    _randomize(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if "patch_embed" in name or "class_embedding" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * INIT_STD)
        elif "norm" in name or "ln_q" in name:
            base = 1.0 if name.endswith("weight") else 0.0
            p.copy_(base + torch.randn(p.shape, generator=gen) * 0.1)


def make_tiny_vlm(out_dir: PathLike, family: str = "qwen2_vl", tie_word_embeddings: bool = False,
                  seed: int = 0) -> str:
    """Build a tiny random Qwen2-VL or LLaVA (CLIP + Llama) and save it with tokenizer, image processor and
    processor as a real folder; return it. Same arguments -> same weights (cached per test session)."""
    from transformers import AutoModelForImageTextToText

    out_dir = Path(out_dir)
    key = json.dumps([family, tie_word_embeddings, seed])
    cached = _vlm_cache.get(key)
    if cached is not None and Path(cached, "config.json").is_file():
        shutil.copytree(cached, out_dir, dirs_exist_ok=True)
        return str(out_dir)
    tok = make_vlm_tokenizer(family)
    config = _config(family, tok, tie_word_embeddings)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).to(torch.float32).eval()
    _randomize_vlm(model, seed)
    if tie_word_embeddings:
        model.tie_weights()
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, k, getattr(tok, k))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    _image_processor(family).save_pretrained(str(out_dir))  # preprocessor_config.json
    cache_dir = _cache_root() / f"vlm-{len(_vlm_cache)}"
    shutil.copytree(out_dir, cache_dir, dirs_exist_ok=True)
    _vlm_cache[key] = str(cache_dir)
    return str(out_dir)


def family_of(model_dir: PathLike) -> str:
    return json.loads(Path(model_dir, "config.json").read_text())["model_type"]


def image_prompt(model_dir: PathLike, template: str) -> str:
    """``template`` with every ``{image}`` replaced by the family's image snippet."""
    return template.replace("{image}", IMAGE_SNIPPET[family_of(model_dir)])


def make_image(seed: int, width: int, height: int):
    """A deterministic random RGB PIL image."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _main() -> None:
    """``python tests/vlm_helpers.py OUT_DIR``: a tiny random vision-language folder, two PEFT adapters (one on
    the vision tower and projector, one on embed_tokens + lm_head) and two PNG images, for trying the vision API
    without downloading a model (the text it generates is noise: the weights are random)."""
    import argparse

    from helpers import make_adapter

    parser = argparse.ArgumentParser(description=_main.__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--family", default="qwen2_vl", choices=sorted(IMAGE_TOKENS))
    args = parser.parse_args()
    out = Path(args.out_dir)
    model_dir = make_tiny_vlm(out / "model", family=args.family)
    vision = {"qwen2_vl": ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "merger.mlp.0", "merger.mlp.2"],
              "llava": ["self_attn.out_proj", "mlp.fc1", "mlp.fc2", "linear_1", "linear_2"]}[args.family]
    make_adapter(model_dir, out / "adapter-vision", seed=1, r=4, target_modules=vision)
    make_adapter(model_dir, out / "adapter-emb", seed=2, r=8, target_modules=["embed_tokens", "lm_head", "q_proj"])
    make_image(1, 32, 32).save(out / "cat.png")
    make_image(2, 40, 24).save(out / "dog.png")
    print(f"model: {model_dir}\nadapters: {out / 'adapter-vision'} {out / 'adapter-emb'}\n"
          f"images: {out / 'cat.png'} {out / 'dog.png'}\nimage token: {IMAGE_SNIPPET[args.family]}")


if __name__ == "__main__":
    _main()
