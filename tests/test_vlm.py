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

from helpers import load_peft_model, make_adapter, make_tiny_model
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


@pytest.fixture(scope="module", params=FAMILIES + ["qwen2_vl-tied"])
def vlm(request, tmp_path_factory):
    family, _, tied = request.param.partition("-")
    root = tmp_path_factory.mktemp(request.param)
    model_dir = make_tiny_vlm(root / "model", family=family, tie_word_embeddings=bool(tied))
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


def test_vision_adapter_touches_image_requests_only(vlm) -> None:
    """Guard against a parity test that passes because vision LoRA does nothing."""
    family, model_dir, paths = vlm
    llm = make_llm(model_dir)
    text = {"prompt": "The quick brown fox"}
    image = {"prompt": image_prompt(model_dir, "Look at {image} please"), "multi_modal_data": {"image": images_of(["b"])}}
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    vision = LoRARequest("vision", paths["vision"])
    outs = llm.generate([text, text, image, image], params, lora_request=[None, vision, None, vision], use_tqdm=False)
    assert outs[0].prompt_logprobs == outs[1].prompt_logprobs  # a text-only request never sees the tower
    base, adapted = outs[2].prompt_logprobs, outs[3].prompt_logprobs
    last = len(base) - 1
    assert base[last] != adapted[last]  # text after the image sees the adapted vision features


# ---- the embedding routine ------------------------------------------------------------------------------

def _embedding_setup(adapter_scale: float):
    from loraplex.engine.context import AttentionMetadata, ForwardContext
    from loraplex.layers.embedding import VocabParallelEmbedding
    from loraplex.lora.adapter import LoRAWeights
    from loraplex.lora.backends.base import get_backend
    from loraplex.lora.batch import LoRABatch
    from loraplex.lora.layers import wrapper_for

    torch.manual_seed(0)
    base = VocabParallelEmbedding(100, 16)
    base.weight.data.normal_()
    wrapper = wrapper_for(base)(base)
    wrapper.create_lora_weights(2, 4, get_backend("torch"))
    wrapper.set_lora(0, [LoRAWeights(torch.randn(4, 100) * adapter_scale, torch.randn(16, 4) * adapter_scale, 2.0)])
    # placeholders are ids >= max(1_000_000, num_embeddings) (processing.placeholder_id): two images here
    ids = torch.tensor([5, 99, 1_000_007, 1_000_007, 1_000_007, 3, 1_000_123, 1_000_123, 42])
    features = torch.randn(5, 16)
    z = torch.zeros(len(ids), dtype=torch.int64)
    attn = AttentionMetadata.build([1] * len(ids), [1] * len(ids), [[0]] * len(ids), 1, z.device)
    batch = LoRABatch.from_row_slots([0] * len(ids), torch.device("cpu"))
    ctx = ForwardContext(positions=z, attn=attn, lora=batch, lora_logits=batch)
    return base, wrapper, ids, features, ctx


def test_embedding_routine_same_with_zero_adapter_wrapper() -> None:
    from loraplex.engine.context import forward_context
    from loraplex.multimodal.embedding import embed_multimodal

    base, wrapper, ids, features, ctx = _embedding_setup(adapter_scale=0.0)
    with torch.no_grad(), forward_context(ctx):
        plain = embed_multimodal(base, ids, features)
        wrapped = embed_multimodal(wrapper, ids, features)
    assert torch.equal(plain, wrapped)
    image = ids >= 1_000_000
    assert torch.equal(plain[image], features)
    assert torch.equal(plain[~image], base.weight[ids[~image]])


def test_embedding_routine_text_rows_get_delta_image_rows_exact_features() -> None:
    from loraplex.engine.context import forward_context
    from loraplex.multimodal.embedding import embed_multimodal

    base, wrapper, ids, features, ctx = _embedding_setup(adapter_scale=1.0)
    with torch.no_grad(), forward_context(ctx):
        out = embed_multimodal(wrapper, ids, features)
    image = ids >= 1_000_000
    assert torch.equal(out[image], features)
    text_ids = ids[~image]
    a_t, b = wrapper.lora_a_t[0, :, :4], wrapper.lora_b[0, :, :4]
    want = base.weight[text_ids] + (a_t[text_ids] @ b.T) * 2.0
    torch.testing.assert_close(out[~image], want)
    assert not torch.allclose(out[~image], base.weight[text_ids])


class _Recorder:
    """Stands in for a module and records every attribute read and call made on it."""

    def __init__(self, target) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "reads", [])

    def __getattr__(self, name: str):
        self.reads.append(name)
        return getattr(self._target, name)

    def __call__(self, *args, **kwargs):
        self.reads.append("__call__")
        return self._target(*args, **kwargs)


def test_embedding_routine_reads_every_attribute_through_the_wrapper() -> None:
    from loraplex.engine.context import forward_context
    from loraplex.lora.layers import BaseLayerWithLoRA
    from loraplex.multimodal.embedding import embed_multimodal

    base, wrapper, ids, features, ctx = _embedding_setup(adapter_scale=0.0)
    spy_base, spy_wrapper = _Recorder(base), _Recorder(wrapper)
    with torch.no_grad(), forward_context(ctx):
        embed_multimodal(spy_base, ids, features)
        embed_multimodal(spy_wrapper, ids, features)
    assert spy_wrapper.reads == spy_base.reads  # the routine does the same on a wrapped and a plain layer
    attrs = [r for r in spy_wrapper.reads if r != "__call__"]
    assert "num_embeddings" in attrs and "base_layer" not in attrs
    for name in attrs:
        # not the wrapper's own attribute: served by forwarding, and equal to the base layer's
        assert name not in vars(wrapper) and not hasattr(BaseLayerWithLoRA, name), name
        assert getattr(wrapper, name) == getattr(base, name), name


# ---- inputs and errors ----------------------------------------------------------------------------------

def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _data_url(img) -> str:
    return "data:image/png;base64," + base64.b64encode(_png_bytes(img)).decode()


def test_load_image_sources_and_refusals() -> None:
    from loraplex.multimodal.inputs import load_image

    img = make_image(7, 20, 12)
    for src in (img, _png_bytes(img), _data_url(img)):
        got = load_image(src)
        assert got.size == (20, 12) and got.convert("RGB").tobytes() == img.tobytes()
    cases = [
        (b"definitely not an image", "cannot decode image bytes"),
        ("data:image/png;base64,@@@", "invalid base64"),
        ("data:text/plain;base64,aGVsbG8=", "media type 'text/plain'"),
        ("data:image/png;base64," + base64.b64encode(_png_bytes(img)[:40]).decode(), "cannot decode"),
        ("https://example.com/cat.png", "remote images are disabled"),
        ("/etc/passwd", "local paths are never read"),
        ("file:///etc/passwd", "not a data: URL"),
        (12345, "got int"),
    ]
    for src, msg in cases:
        with pytest.raises(InvalidRequestError, match=msg):
            load_image(src)
    with pytest.raises(InvalidRequestError, match=r"20x12 = 240 pixels, above the limit max_image_pixels=239"):
        load_image(_data_url(img), max_pixels=239)
    assert load_image(_data_url(img), max_pixels=240).size == (20, 12)


def test_load_image_remote_only_when_allowed() -> None:
    import http.server
    import threading

    from loraplex.multimodal.inputs import load_image

    payload = _png_bytes(make_image(8, 9, 7))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/img.png"
        with pytest.raises(InvalidRequestError, match="refused"):
            load_image(url)
        assert load_image(url, allow_remote=True).size == (9, 7)
        with pytest.raises(InvalidRequestError, match="larger than 10 bytes"):
            load_image(url, allow_remote=True, max_remote_bytes=10)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> str:
    return make_tiny_vlm(tmp_path_factory.mktemp("qwen") / "model", family="qwen2_vl")


def test_request_errors_name_the_problem_and_leave_others_unaffected(qwen_dir, tmp_path) -> None:
    llm = make_llm(qwen_dir, max_image_pixels=48 * 48)
    one = image_prompt(qwen_dir, "Look at {image} please")
    img = make_image(1, 32, 32)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    good = {"prompt": one, "multi_modal_data": {"image": img}}
    want = llm.generate(good, params, use_tqdm=False)[0].outputs[0].token_ids
    n = llm.engine.vocab_size
    bad_requests = [
        ({"prompt": one, "multi_modal_data": {"image": b"\x89PNG broken"}}, "image 0: cannot decode image bytes"),
        ({"prompt": one, "multi_modal_data": {"image": [img, img]}}, "1 image token.* but 2 image"),
        ({"prompt": image_prompt(qwen_dir, "{image}{image}"), "multi_modal_data": {"image": img}},
         "2 image token.* but 1 image"),
        ({"prompt": one}, "1 image token.* but 0 image"),
        ({"prompt": one, "multi_modal_data": {"image": make_image(2, 64, 64)}},
         "64x64 = 4096 pixels, above the limit max_image_pixels=2304"),
        ({"prompt": one, "multi_modal_data": {"video": img}}, "unsupported multi_modal_data modality 'video'"),
        ({"prompt": one, "multi_modal_data": {"image": "https://example.com/x.png"}}, "remote images are disabled"),
        ({"prompt_token_ids": [5, 6, 1_000_007]}, r"outside the vocabulary \[0, %d\)" % n),
    ]
    for prompt, msg in bad_requests:
        with pytest.raises(InvalidRequestError, match=msg):
            llm.generate([good, prompt], params, use_tqdm=False)
        assert not llm.engine.has_unfinished_requests()
    outs = llm.generate([good, {"prompt": "The quick brown fox"}], params, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == want

    text_model = make_tiny_model(tmp_path / "llama", family="llama")
    with pytest.raises(InvalidRequestError, match="LlamaForCausalLM is text-only"):
        make_llm(text_model).generate({"prompt": "Hi", "multi_modal_data": {"image": img}}, params, use_tqdm=False)


def test_placeholder_ids_identify_images(qwen_dir) -> None:
    from loraplex.multimodal.processing import PLACEHOLDER_BASE

    llm = make_llm(qwen_dir)
    engine = llm.engine
    prompt = image_prompt(qwen_dir, "{image} {image} {image}")
    a, b = make_image(1, 32, 32), make_image(2, 24, 40)
    rid = engine.add_request({"prompt": prompt, "multi_modal_data": {"image": [a, b, _png_bytes(a)]}},
                             SamplingParams(max_tokens=1))
    req = engine.requests[rid]
    ids = [img.placeholder_id for img in req.mm.images]
    assert ids[0] == ids[2] != ids[1]  # same pixels (PIL or PNG bytes) -> same id; other image -> other id
    assert min(ids) >= max(PLACEHOLDER_BASE, engine.model.get_input_embeddings().num_embeddings)
    for img in req.mm.images:
        assert req.prompt_token_ids[img.offset:img.offset + img.length] == [img.placeholder_id] * img.length
    image_token = engine.hf_config.image_token_id
    assert req.visible_prompt_token_ids.count(image_token) == sum(img.length for img in req.mm.images)
    engine.abort_request(rid)


def test_preempted_image_requests_recompute_exactly(vlm) -> None:
    """Preemption recomputes prompt + generated tokens: images are re-encoded, M-RoPE offsets carry on."""
    family, model_dir, paths = vlm
    prompts = [{"prompt": image_prompt(model_dir, t), "multi_modal_data": {"image": images_of(n)}}
               for t, n in [("{image} and {image}", ["a", "b"]), ("Look at {image} please", ["c"]),
                            ("{image}Describe the robot", ["b"])]]
    loras = [LoRARequest("all", paths["all"]), LoRARequest("vision", paths["vision"]), None]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in make_llm(model_dir).generate(prompts, params, lora_request=loras,
                                                                          use_tqdm=False)]
    small = make_llm(model_dir, num_kv_blocks=26)  # 104 token slots for three sequences of 40-60 tokens
    outs = small.generate(prompts, params, lora_request=loras, use_tqdm=False)
    assert sum(o.metrics["num_preemptions"] for o in outs) > 0
    assert [o.outputs[0].token_ids for o in outs] == want


def test_checkpoint_names_map_to_transformers5_modules() -> None:
    from loraplex.models.llava import LlavaForConditionalGeneration as L
    from loraplex.models.qwen2_vl import Qwen2VLForConditionalGeneration as Q

    cases = [
        (Q, "model.layers.0.self_attn.q_proj.weight", "model.language_model.layers.0.self_attn.q_proj.weight"),
        (Q, "visual.blocks.0.attn.qkv.weight", "model.visual.blocks.0.attn.qkv.weight"),
        (Q, "model.language_model.norm.weight", "model.language_model.norm.weight"),
        (Q, "model.visual.merger.mlp.0.bias", "model.visual.merger.mlp.0.bias"),
        (Q, "lm_head.weight", "lm_head.weight"),
        (L, "language_model.model.embed_tokens.weight", "model.language_model.embed_tokens.weight"),
        (L, "language_model.lm_head.weight", "lm_head.weight"),
        (L, "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
         "model.vision_tower.encoder.layers.0.mlp.fc1.weight"),
        (L, "vision_tower.pre_layrnorm.weight", "model.vision_tower.pre_layrnorm.weight"),
        (L, "multi_modal_projector.linear_1.bias", "model.multi_modal_projector.linear_1.bias"),
        (L, "model.vision_tower.embeddings.class_embedding", "model.vision_tower.embeddings.class_embedding"),
    ]
    for cls, name, want in cases:
        assert cls.rename_checkpoint_key(name) == want, (cls.__name__, name)


def test_chat_with_image_parts(qwen_dir) -> None:
    llm = make_llm(qwen_dir)
    a, b = make_image(1, 32, 32), make_image(2, 24, 40)
    conv = [{"role": "user", "content": [
        {"type": "text", "text": "Compare "}, {"type": "image_url", "image_url": {"url": _data_url(a)}},
        {"type": "text", "text": " with "}, {"type": "image", "image": b}]}]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    got = llm.chat(conv, params, use_tqdm=False)[0]
    assert llm.engine.mm_processor.image_placeholder(llm.get_tokenizer()) == "<|vision_start|><|image_pad|><|vision_end|>"
    prompt = image_prompt(qwen_dir, "<s><|user|>Compare {image} with {image}</s><|assistant|>")
    want = llm.generate({"prompt": prompt, "multi_modal_data": {"image": [a, b]}}, params, use_tqdm=False)[0]
    assert got.prompt_token_ids == want.prompt_token_ids
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    with pytest.raises(InvalidRequestError, match="unsupported content part 'audio'"):
        llm.chat([{"role": "user", "content": [{"type": "audio"}]}], params, use_tqdm=False)


def test_prefix_and_encoder_caches_with_images(vlm) -> None:
    """Repeated images: the second time, the KV blocks of an identical image prompt are reused and a repeated
    image in a new prompt skips the vision tower (per adapter: a vision adapter's features are not the base
    model's); an image of other pixels never reuses them. Outputs equal runs with both caches off."""
    family, model_dir, paths = vlm
    prompts = [{"prompt": image_prompt(model_dir, t), "multi_modal_data": {"image": images_of(n)}}
               for t, n in [("{image} and {image} shown", ["a", "b"]), ("Look at {image} please", ["a"]),
                            ("Look at {image} please", ["c"]), ("{image} and {image} shown", ["a", "b"])]]
    loras = [None, LoRARequest("vision", paths["vision"]), LoRARequest("vision", paths["vision"]), None]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    off = make_llm(model_dir, enable_prefix_caching=False, encoder_cache_size=0)
    want = [o.outputs[0].token_ids for o in off.generate(prompts, params, lora_request=loras, use_tqdm=False)]
    llm = make_llm(model_dir)
    first = llm.generate(prompts[:1], params, lora_request=loras[:1], use_tqdm=False)
    assert first[0].outputs[0].token_ids == want[0]
    m0 = llm.get_metrics()
    got = llm.generate(prompts[1:], params, lora_request=loras[1:], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == want[1:]
    m = llm.get_metrics()
    assert m["prefix_cache_hit_tokens"] > m0["prefix_cache_hit_tokens"]  # prompt 4 = prompt 1
    # prompt 2: image "a" under the vision adapter is not the base model's "a"; prompt 3: "c" is new;
    # prompt 4: its blocks come from prompt 1's, the vision tower does not run for them
    assert m["encoder_cache_queries"] - m0["encoder_cache_queries"] == 2
    assert m["encoder_cache_hits"] == m0["encoder_cache_hits"] == 0
    # image "a" again under the base model, in a new context: no block to reuse, but its features are cached
    other = {"prompt": image_prompt(model_dir, "Here is {image}"), "multi_modal_data": {"image": images_of(["a"])}}
    want_other = off.generate([other], params, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.generate([other], params, use_tqdm=False)[0].outputs[0].token_ids == want_other
    assert llm.get_metrics()["encoder_cache_hits"] == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_added_tokens_on_a_vlm_match_peft(family, tmp_path) -> None:
    """An adapter that adds tokens, on a vision-language model: its requests (with an image, and text only) are
    tokenized with its tokenizer, its added ids (past the embedding's rows) are text, not image placeholders,
    and read its own embedding and head; image request tokens and logprobs equal PEFT on the resized model; a
    base request with the same image in the batch never sees the added tokens."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from helpers import load_base_model
    from test_peft_features import ADDED, make_added_tokens_adapter

    model_dir = make_tiny_vlm(tmp_path / "model", family=family)
    path = make_added_tokens_adapter(model_dir, tmp_path / "added", seed=1, boost=3.0)
    llm = make_llm(model_dir)
    vocab = llm.engine.vocab_size
    text = image_prompt(model_dir, "{image}Describe <tool3> the robot <tool20>")
    image = images_of(["a"])[0]
    params = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0.0, prompt_logprobs=1,
                            logprobs=1)
    added = LoRARequest("added", path)
    outs = llm.generate([{"prompt": text, "multi_modal_data": {"image": image}}] * 2 + ["<tool7> plain text"], params,
                        lora_request=[added, None, added], use_tqdm=False)

    tok = AutoTokenizer.from_pretrained(path)
    proc = load_processor(model_dir)
    proc.tokenizer = tok  # the adapter's tokenizer, the model's image processor
    inputs = proc(text=[text], images=[image], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert outs[0].prompt_token_ids == ids and sum(t >= vocab for t in ids) == 2  # <tool3>, <tool20>: single ids
    assert outs[2].prompt_token_ids[0] == tok.convert_tokens_to_ids("<tool7>")
    base = load_base_model(model_dir)
    base.resize_token_embeddings(len(tok), mean_resizing=False)
    ref = PeftModel.from_pretrained(base, path).to(torch.float32).eval()
    with torch.no_grad():
        logp = ref(**inputs).logits[0].log_softmax(-1)
        for i in range(1, len(ids)):
            assert outs[0].prompt_logprobs[i][ids[i]] == pytest.approx(logp[i - 1, ids[i]].item(), abs=1e-4), i
        want = ref.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS,
                            min_new_tokens=NEW_TOKENS)[0, len(ids):].tolist()
    got = outs[0].outputs[0].token_ids
    assert got == want
    assert max(got) >= vocab and any(t in outs[0].outputs[0].text for t in ADDED)  # its own tokens, detokenized
    assert max(outs[1].prompt_token_ids) < vocab or outs[1].prompt_token_ids != ids  # the base tokenizer splits them
    assert max(outs[1].outputs[0].token_ids) < vocab  # the base request never sees them
