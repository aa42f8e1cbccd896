"""Vision-language models with LoRA: loraplex vs transformers + PEFT on tiny random Qwen2-VL and LLaVA
folders, the multimodal embedding routine with and without a LoRA-wrapped embedding, and request errors.

The parity batch mixes text-only, one-image and two-image requests (images of different sizes) with the
base model and three adapters: embed_tokens + lm_head (+ q/v), the vision tower and projector only, and
all-linear rsLoRA (language model, vision tower and projector).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
import torch

from helpers import load_base_model, load_peft_model, make_adapter, make_tiny_model
from loraplex import LLM, InvalidRequestError, LoRARequest, SamplingParams
from vlm_helpers import image_prompt, load_processor, make_image, make_tiny_vlm

FAMILIES = ["qwen2_vl", "llava"]
NEW_TOKENS = 16

# Vision tower + projector modules only (PEFT suffix matching: none of these names occur in the language model).
VISION_TARGETS = {
    "qwen2_vl": ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "merger.mlp.0", "merger.mlp.2"],
    "llava": ["self_attn.out_proj", "mlp.fc1", "mlp.fc2", "linear_1", "linear_2"],
}
IMAGES = {"a": (1, 32, 32), "b": (2, 24, 40), "c": (3, 40, 16)}  # seed, width, height: different sizes
# (prompt template, images, adapter)
REQUESTS = [
    ("The quick brown fox", [], None),
    ("Once upon a time there was", [], "emb"),
    ("{image}Describe the robot", ["a"], "emb"),
    ("Look at {image} please", ["b"], "vision"),
    ("Compare {image} and {image} now", ["a", "c"], "all"),
    ("{image}{image} two boats", ["b", "c"], None),
    ("The storm came from the west", [], "vision"),
    ("A picture: {image}", ["c"], None),
    ("{image} and {image}", ["c", "a"], "vision"),
]


def build_adapters(model_dir: str, family: str, root: Path) -> dict[str, str]:
    return {
        "emb": make_adapter(model_dir, root / "emb", seed=1, r=8, lora_alpha=16,
                            target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"]),
        "vision": make_adapter(model_dir, root / "vision", seed=2, r=4, lora_alpha=8,
                               target_modules=VISION_TARGETS[family]),
        "all": make_adapter(model_dir, root / "all", seed=3, r=4, lora_alpha=8, target_modules="all-linear",
                            use_rslora=True),
    }


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    model_dir = make_tiny_vlm(root / "model", family=family)
    return family, model_dir, build_adapters(model_dir, family, root)


def make_llm(model_dir: str, **kw) -> LLM:
    args = dict(dtype="float32", device="cpu", max_loras=4, max_lora_rank=8, seed=0, num_kv_blocks=256, block_size=4)
    args.update(kw)
    return LLM(model_dir, **args)


def images_of(names: list[str]):
    return [make_image(*IMAGES[n]) for n in names]


def with_adapter(ref, adapter, fn):
    """Run ``fn`` on the PEFT model with one adapter active (or none). PEFT's per-row ``adapter_names``
    cannot express vision-tower LoRA (its rows are patches, not batch items), so the reference runs one
    request at a time with that request's adapter set."""
    if adapter is None:
        with ref.disable_adapter():
            return fn()
    ref.set_adapter(adapter)
    return fn()


def test_mixed_batch_matches_peft(vlm) -> None:
    family, model_dir, paths = vlm
    llm = make_llm(model_dir)
    prompts = []
    for template, names, _ in REQUESTS:
        p: dict = {"prompt": image_prompt(model_dir, template)}
        if names:
            p["multi_modal_data"] = {"image": images_of(names) if len(names) > 1 else images_of(names)[0]}
        prompts.append(p)
    params = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0.0, prompt_logprobs=2,
                            logprobs=1)
    loras = [LoRARequest(a, paths[a]) if a else None for _, _, a in REQUESTS]
    outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)

    proc = load_processor(model_dir)
    ref = load_peft_model(model_dir, paths)
    with torch.no_grad():
        for (template, names, adapter), out in zip(REQUESTS, outs):
            tag = adapter or "__base__"
            inputs = proc(text=[image_prompt(model_dir, template)], images=images_of(names) or None,
                          return_tensors="pt")
            ids = inputs["input_ids"][0].tolist()
            # transformers' processor expands image tokens exactly as loraplex does
            assert out.prompt_token_ids == ids, tag
            logp = with_adapter(ref, adapter, lambda: ref(**inputs).logits[0].log_softmax(-1))
            assert out.prompt_logprobs[0] is None
            for i in range(1, len(ids)):
                got = out.prompt_logprobs[i]
                assert got[ids[i]] == pytest.approx(logp[i - 1, ids[i]].item(), abs=1e-4), (tag, template, i)
                top = logp[i - 1].topk(2)
                for tok, val in zip(top.indices.tolist(), top.values.tolist()):
                    assert got[tok] == pytest.approx(val, abs=1e-4), (tag, template, i, tok)
            gen = with_adapter(ref, adapter, lambda: ref.generate(
                **inputs, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, output_logits=True,
                return_dict_in_generate=True))
            want = gen.sequences[0, len(ids):].tolist()
            assert out.outputs[0].token_ids == want, (tag, template)
            for step, (tok, lp) in enumerate(zip(want, out.outputs[0].logprobs)):
                ref_lp = gen.logits[step][0].float().log_softmax(-1)[tok].item()
                assert lp[tok] == pytest.approx(ref_lp, abs=1e-4), (tag, template, step)
