"""LLaVA: a CLIP vision tower, a two-layer projector and a Llama-family language model.

Module names are transformers 5's: ``model.vision_tower.{embeddings, pre_layrnorm, encoder.layers.N.
{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2, layer_norm2}, post_layernorm}``,
``model.multi_modal_projector.{linear_1, linear_2}``, ``model.language_model.*``, ``lm_head``. The
tower's q/k/v are fused into ``qkv_proj`` like the language model's (same ``packed_modules_mapping``),
so checkpoints and adapters that name ``q_proj`` / ``k_proj`` / ``v_proj`` map onto its slices.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.engine.context import lora_rows
from loraplex.layers.activation import get_act_fn
from loraplex.layers.embedding import ParallelLMHead
from loraplex.layers.linear import ColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from loraplex.models.llama import LlamaModel
from loraplex.models.vlm import VisionLanguageModel
from loraplex.multimodal.batch import MultiModalBatch


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, vc: Any) -> None:
        super().__init__()
        self.image_size = vc.image_size
        self.patch_size = vc.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(vc.hidden_size), requires_grad=False)
        self.patch_embedding = nn.Conv2d(vc.num_channels, vc.hidden_size, kernel_size=vc.patch_size,
                                         stride=vc.patch_size, bias=False)
        self.num_positions = (vc.image_size // vc.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(self.num_positions, vc.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # (images, C, H, W) -> (images, 1 + patches, hidden): class token first
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPAttention(nn.Module):
    def __init__(self, vc: Any) -> None:
        super().__init__()
        hd = vc.hidden_size // vc.num_attention_heads
        self.qkv_proj = QKVParallelLinear(vc.hidden_size, hd, vc.num_attention_heads, vc.num_attention_heads, bias=True)
        self.out_proj = RowParallelLinear(vc.hidden_size, vc.hidden_size, bias=True)
        self.num_heads = self.qkv_proj.num_heads  # this rank's heads
        self.head_dim = hd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, S, _ = x.shape
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        q, k, v = (t.view(n, S, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (n, heads, S, dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(n, S, -1))


class CLIPMLP(nn.Module):
    def __init__(self, vc: Any) -> None:
        super().__init__()
        self.fc1 = ColumnParallelLinear(vc.hidden_size, vc.intermediate_size, bias=True)
        self.act = get_act_fn(vc.hidden_act)
        self.fc2 = RowParallelLinear(vc.intermediate_size, vc.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, vc: Any) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(vc)
        self.layer_norm1 = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.mlp = CLIPMLP(vc)
        self.layer_norm2 = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, vc: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(vc) for _ in range(vc.num_hidden_layers))


class CLIPVisionTower(nn.Module):
    def __init__(self, vc: Any) -> None:
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(vc)
        self.pre_layrnorm = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.encoder = CLIPEncoder(vc)
        self.post_layernorm = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)  # loaded; LLaVA does not use it

    def hidden_states(self, pixels: torch.Tensor, wanted: list[int]) -> list[torch.Tensor]:
        """Hidden states by Hugging Face's ``hidden_states`` index (0: the embeddings after
        ``pre_layrnorm``, i: the output of layer i; negative counts from the end), running only the
        layers the deepest wanted index needs."""
        L = len(self.encoder.layers)
        idx = [i + L + 1 if i < 0 else i for i in wanted]
        states = [self.pre_layrnorm(self.embeddings(pixels))]
        for layer in self.encoder.layers[:max(idx)]:
            states.append(layer(states[-1]))
        return [states[i] for i in idx]


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, config: Any, num_feature_layers: int) -> None:
        super().__init__()
        hidden = config.get_text_config().hidden_size
        bias = bool(getattr(config, "multimodal_projector_bias", True))
        self.linear_1 = ReplicatedLinear(config.vision_config.hidden_size * num_feature_layers, hidden, bias=bias)
        self.act = get_act_fn(config.projector_hidden_act)
        self.linear_2 = ReplicatedLinear(hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaModel(nn.Module):
    def __init__(self, config: Any, num_feature_layers: int) -> None:
        super().__init__()
        self.vision_tower = CLIPVisionTower(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config, num_feature_layers)
        tc = config.get_text_config()
        self.language_model = LlamaModel(tc, qkv_bias=bool(getattr(tc, "attention_bias", False)), qk_norm=False)


class LlavaForConditionalGeneration(VisionLanguageModel):
    """Serves ``LlavaForConditionalGeneration`` folders with a CLIP vision tower."""

    checkpoint_key_mapping = [
        (r"^language_model\.lm_head\.", "lm_head."),
        (r"^language_model\.model\.", "model.language_model."),
        (r"^(model\.)?vision_tower\.vision_model\.", "model.vision_tower."),
        (r"^vision_tower\.", "model.vision_tower."),
        (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    ]

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        vc = config.vision_config
        if getattr(vc, "model_type", "clip_vision_model") != "clip_vision_model":
            raise ValueError(f"LLaVA with a {vc.model_type!r} vision tower is not supported; supported: CLIP")
        layer = config.vision_feature_layer
        self.feature_layers = [layer] if isinstance(layer, int) else list(layer)
        self.select = config.vision_feature_select_strategy  # "default" drops the class token
        tc = self.text_config
        self.model = LlavaModel(config, len(self.feature_layers))
        self.lm_head = ParallelLMHead(tc.vocab_size, tc.hidden_size)
        if self.tied_embeddings:
            self.lm_head.tie_to(self.model.language_model.embed_tokens)

    def num_image_features(self, data: dict[str, torch.Tensor]) -> int:
        emb = self.model.vision_tower.embeddings
        shape = tuple(data["pixel_values"].shape)
        if len(shape) != 4 or shape[0] != 1 or shape[2:] != (emb.image_size, emb.image_size):
            raise ValueError(f"image processor output {shape} does not fit the vision tower "
                             f"(1, C, {emb.image_size}, {emb.image_size})")
        return emb.num_positions - (1 if self.select == "default" else 0)

    def embed_images(self, mm: MultiModalBatch) -> torch.Tensor:
        dtype, device = self._dtype_device()
        pixels = torch.cat([img.data["pixel_values"] for img in mm.images]).to(device=device, dtype=dtype)
        n = pixels.shape[0]
        tower = self.model.vision_tower
        with lora_rows(mm.lora_rows([tower.embeddings.num_positions] * n, device)):
            states = tower.hidden_states(pixels, self.feature_layers)  # each (images, 1 + patches, vision hidden)
        if self.select == "default":
            states = [s[:, 1:] for s in states]
        feats = torch.cat(states, dim=-1)
        with lora_rows(mm.lora_rows([feats.shape[1]] * n, device)):
            out = self.model.multi_modal_projector(feats)  # (images, features, hidden)
        return out.reshape(-1, out.shape[-1])
