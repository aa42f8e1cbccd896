"""Qwen2-VL: a ViT over dynamic-resolution patch grids (2-D rotary, per-image attention), a patch
merger (``spatial_merge_size**2`` patches -> one token), and a Qwen2 language model with M-RoPE.

Module names are transformers 5's: ``model.visual.{patch_embed, blocks.N.{norm1, norm2, attn.qkv,
attn.proj, mlp.fc1, mlp.fc2}, merger.{ln_q, mlp.0, mlp.2}}``, ``model.language_model.*``, ``lm_head``.
The vision layers are replicated (the tower is small next to the language model); every one of them is
a loraplex linear layer, so adapters that target the tower or the merger apply per image.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.engine.context import lora_rows
from loraplex.layers.activation import Activation
from loraplex.layers.embedding import ParallelLMHead
from loraplex.layers.linear import ReplicatedLinear
from loraplex.models.llama import LlamaModel
from loraplex.models.vlm import VisionLanguageModel
from loraplex.multimodal.batch import MultiModalBatch
from loraplex.multimodal.processing import ImageInput


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Qwen2VisionRotary(nn.Module):
    """2-D rotary angles of patches: a quarter of the head dim rotates with the patch row, a quarter with
    its column (then both halves alike, as rotate-half RoPE expects)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        spatial = head_dim // 2
        inv = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.int64).float() / spatial))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # hw: (patches, 2) row/column -> cos, sin (patches, head_dim) float32
        freqs = (hw.unsqueeze(-1).float() * self.inv_freq).flatten(1)  # (patches, head_dim / 2)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


class Qwen2VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = ReplicatedLinear(dim, 3 * dim, bias=True)
        self.proj = ReplicatedLinear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv(x).view(T, 3, self.num_heads, self.head_dim).unbind(1)  # (T, heads, dim) each
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (T, 1, dim)
        # Rotation in float32, as the reference does.
        q = (q.float() * cos + _rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + _rotate_half(k.float()) * sin).to(v.dtype)
        outs = []
        for qi, ki, vi in zip(q.split(seqlens), k.split(seqlens), v.split(seqlens)):
            q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (qi, ki, vi))  # (1, heads, n, dim)
            o = F.scaled_dot_product_attention(q4, k4, v4)
            outs.append(o[0].transpose(0, 1).reshape(qi.shape[0], -1))  # (n, heads * dim)
        return self.proj(torch.cat(outs))


class Qwen2VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = ReplicatedLinear(dim, hidden, bias=True)
        self.act = Activation(act)
        self.fc2 = ReplicatedLinear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Qwen2VisionBlock(nn.Module):
    def __init__(self, vc: Any) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(vc.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(vc.embed_dim, eps=1e-6)
        self.attn = Qwen2VisionAttention(vc.embed_dim, vc.num_heads)
        self.mlp = Qwen2VisionMLP(vc.embed_dim, int(vc.embed_dim * vc.mlp_ratio), vc.hidden_act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, seqlens)
        return x + self.mlp(self.norm2(x))


class Qwen2VisionPatchEmbed(nn.Module):
    """A Conv3d whose kernel equals its stride, applied to pre-cut patches."""

    def __init__(self, vc: Any) -> None:
        super().__init__()
        p, t = vc.patch_size, vc.temporal_patch_size
        self.shape = (vc.in_channels, t, p, p)
        self.embed_dim = vc.embed_dim
        self.proj = nn.Conv3d(vc.in_channels, vc.embed_dim, kernel_size=(t, p, p), stride=(t, p, p), bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # (patches, C * t * p * p) -> (patches, embed_dim)
        return self.proj(patches.view(-1, *self.shape)).view(-1, self.embed_dim)


class Qwen2PatchMerger(nn.Module):
    def __init__(self, vc: Any) -> None:
        super().__init__()
        self.merged = vc.embed_dim * vc.spatial_merge_size ** 2
        self.ln_q = nn.LayerNorm(vc.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(ReplicatedLinear(self.merged, self.merged, bias=True), Activation("gelu"),
                                 ReplicatedLinear(self.merged, vc.hidden_size, bias=True))


class Qwen2VisionTransformer(nn.Module):
    def __init__(self, vc: Any) -> None:
        super().__init__()
        self.merge = vc.spatial_merge_size
        self.patch_embed = Qwen2VisionPatchEmbed(vc)
        theta = float((getattr(vc, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
        self.rotary_pos_emb = Qwen2VisionRotary(vc.embed_dim // vc.num_heads, theta)
        self.blocks = nn.ModuleList(Qwen2VisionBlock(vc) for _ in range(vc.depth))
        self.merger = Qwen2PatchMerger(vc)

    def patch_positions(self, grids: list[list[int]], device: torch.device) -> torch.Tensor:
        """(patches, 2) row/column of every patch, in the processor's order: merge windows of
        ``merge x merge`` patches are contiguous."""
        m = self.merge
        out = []
        for t, h, w in grids:
            rows = torch.arange(h, device=device).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
            cols = torch.arange(w, device=device).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
            hw = torch.stack([rows.transpose(1, 2).flatten(), cols.transpose(1, 2).flatten()], dim=-1)
            out.append(hw.repeat(t, 1))
        return torch.cat(out)


class Qwen2VLModel(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.visual = Qwen2VisionTransformer(config.vision_config)
        self.language_model = LlamaModel(config.get_text_config(), qkv_bias=True, qk_norm=False)


class Qwen2VLForConditionalGeneration(VisionLanguageModel):
    """Serves ``Qwen2VLForConditionalGeneration`` folders."""

    uses_mrope = True
    checkpoint_key_mapping = [
        (r"^visual\.", "model.visual."),
        (r"^model\.(?!language_model\.|visual\.)", "model.language_model."),
    ]

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        tc = self.text_config
        self.merge = int(config.vision_config.spatial_merge_size)
        self.model = Qwen2VLModel(config)
        self.lm_head = ParallelLMHead(tc.vocab_size, tc.hidden_size)
        if self.tied_embeddings:
            self.lm_head.tie_to(self.model.language_model.embed_tokens)

    def image_prompt_token_ids(self) -> list[int]:
        c = self.config
        return [int(c.vision_start_token_id), self.image_token_id, int(c.vision_end_token_id)]

    @staticmethod
    def _grid(data: dict[str, torch.Tensor]) -> list[int]:
        return [int(v) for v in data["image_grid_thw"].reshape(-1, 3)[0]]

    def num_image_features(self, data: dict[str, torch.Tensor]) -> int:
        t, h, w = self._grid(data)
        if h % self.merge or w % self.merge or data["pixel_values"].shape[0] != t * h * w:
            raise ValueError(f"image processor output does not fit the vision tower: grid {t}x{h}x{w}, "
                             f"{tuple(data['pixel_values'].shape)} pixel rows, spatial_merge_size {self.merge}")
        return t * h * w // self.merge ** 2

    def mrope_positions(self, num_tokens: int, images: list[ImageInput]) -> tuple[torch.Tensor, int]:
        """3-D positions of a prompt: text runs count up by one in all rows; an image of ``t x h x w``
        merged tokens takes (start + t_idx, start + h_idx, start + w_idx), and the text after it starts
        at ``start + max(h, w)``. Returns the (3, num_tokens) positions and ``max + 1 - num_tokens``,
        the offset of every later position."""
        pos = torch.empty(3, num_tokens, dtype=torch.int64)
        cur = prev = 0
        for img in images:
            n = img.offset - prev
            pos[:, prev:img.offset] = torch.arange(cur, cur + n)
            cur += n
            t, h, w = self._grid(img.data)
            lh, lw = h // self.merge, w // self.merge
            grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(lh), torch.arange(lw), indexing="ij"))
            pos[:, img.offset:img.offset + img.length] = grid.reshape(3, -1) + cur  # (3, t * lh * lw)
            cur += max(lh, lw)
            prev = img.offset + img.length
        pos[:, prev:] = torch.arange(cur, cur + num_tokens - prev)
        return pos, int(pos.max()) + 1 - num_tokens

    def embed_images(self, mm: MultiModalBatch) -> torch.Tensor:
        dtype, device = self._dtype_device()
        visual = self.model.visual
        grids = [self._grid(img.data) for img in mm.images]
        pixels = torch.cat([img.data["pixel_values"] for img in mm.images]).to(device=device, dtype=dtype)
        patches = [t * h * w for t, h, w in grids]
        seqlens = [h * w for t, h, w in grids for _ in range(t)]  # attention runs within each frame
        with lora_rows(mm.lora_rows(patches, device)):
            x = visual.patch_embed(pixels)  # (patches, embed_dim)
            cos, sin = visual.rotary_pos_emb(visual.patch_positions(grids, device))
            for block in visual.blocks:
                x = block(x, cos, sin, seqlens)
            x = visual.merger.ln_q(x).view(-1, visual.merger.merged)  # (tokens, embed_dim * merge**2)
        with lora_rows(mm.lora_rows([n // self.merge ** 2 for n in patches], device)):
            return visual.merger.mlp(x)  # (tokens, hidden)
