"""Rotary position embeddings (default, linear, llama3 scaling), half-rotation
layout as in Hugging Face Llama/Qwen. cos/sin are precomputed in float32."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from loraplex.layers.fused import fused_ops


def rope_parameters(config: Any) -> dict:
    """The rope settings of a HF config, for transformers 4 (``rope_theta`` +
    ``rope_scaling``) and 5 (``rope_parameters``) alike."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    for k, v in scaling.items():
        params.setdefault(k, v)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def _inv_freq(dim: int, params: dict) -> torch.Tensor:
    base = float(params["rope_theta"])
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = params["rope_type"]
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(params["factor"])
    if kind == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_type {kind!r}; supported: default, linear, llama3")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, params: dict, rotary_dim: Optional[int] = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        inv = _inv_freq(self.rotary_dim, params)
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv)  # (max_position, rotary_dim / 2)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=-1)
        return torch.cat([-b, a], dim=-1)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rotary_dim == self.head_dim:
            return x * cos + self._rotate_half(x) * sin
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        return torch.cat([rot * cos + self._rotate_half(rot) * sin, rest], dim=-1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q: (tokens, heads, dim), k: (tokens, kv_heads, dim)
        ops = self._kernel(positions, q, k)
        if ops is not None:
            ops.rotary(positions, q, k, self.cos, self.sin, self.rotary_dim)  # in place: q, k are fresh views
            return q, k
        cos = self.cos[positions].to(q.dtype).unsqueeze(1)  # (tokens, 1, rotary_dim)
        sin = self.sin[positions].to(q.dtype).unsqueeze(1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    @staticmethod
    def _kernel(positions: torch.Tensor, *heads: torch.Tensor):
        """The fused kernels' module when they can take this call (CUDA, one position per token, head dims
        contiguous), else None."""
        ops = fused_ops(heads[0])
        if ops is None or positions.dim() != 1 or any(t.stride(2) != 1 for t in heads):
            return None
        return ops

    def rotate_into_cache(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                          delta=None, qkv: Optional[torch.Tensor] = None) -> bool:
        """Where one kernel can (CUDA): rotate ``q`` and ``k`` in place and write the rotated ``k`` and ``v``
        into the caches (slots, kv_heads, dim) at ``slot_mapping``, and return True; else do nothing and return
        False (the caller rotates, then writes the cache). Saves a decoder layer two launches a step. ``delta``
        (a ``PendingDelta`` of the qkv layer whose output ``qkv`` q, k and v are views of) is folded in first."""
        ops = self._kernel(positions, q, k, v)
        if ops is None or not k_cache.is_contiguous() or not v_cache.is_contiguous():
            return False
        ops.rotary(positions, q, k, self.cos, self.sin, self.rotary_dim, v, k_cache, v_cache, slot_mapping,
                   delta=delta, qkv=qkv)
        return True


class MRotaryEmbedding(RotaryEmbedding):
    """Multimodal rotary embedding (M-RoPE, Qwen2-VL): positions are ``(3, tokens)``
    (temporal, height, width). The half-spectrum of frequencies is cut into
    ``mrope_section`` chunks; chunk ``i`` rotates by position row ``i % 3``. Text
    tokens carry the same position in all three rows, which reduces to 1-D RoPE, so
    ``(tokens,)`` positions are accepted too."""

    def __init__(self, head_dim: int, max_position: int, params: dict, rotary_dim: Optional[int] = None) -> None:
        super().__init__(head_dim, max_position, params, rotary_dim)
        section = [int(s) for s in params["mrope_section"]]
        half = self.rotary_dim // 2
        if sum(section) != half:
            raise ValueError(f"mrope_section {section} must sum to rotary_dim / 2 = {half}")
        rows = torch.cat([torch.full((n,), i % 3, dtype=torch.int64) for i, n in enumerate(section)])
        # (rotary_dim,): which position row drives each cos/sin column (both halves alike).
        self.register_buffer("row_of_col", torch.cat([rows, rows]), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().forward(positions, q, k)
        T = positions.shape[1]
        index = self.row_of_col.view(1, 1, -1).expand(1, T, -1)
        cos = self.cos[positions].gather(0, index).squeeze(0)  # (3, T, rotary_dim) -> (T, rotary_dim)
        sin = self.sin[positions].gather(0, index).squeeze(0)
        cos = cos.to(q.dtype).unsqueeze(1)  # (T, 1, rotary_dim)
        sin = sin.to(q.dtype).unsqueeze(1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)


def get_rope(head_dim: int, max_position: int, params: dict, rotary_dim: Optional[int] = None) -> RotaryEmbedding:
    """The rotary embedding a config's rope parameters ask for (M-RoPE when they carry ``mrope_section``)."""
    if params.get("mrope_section"):
        return MRotaryEmbedding(head_dim, max_position, params, rotary_dim)
    return RotaryEmbedding(head_dim, max_position, params, rotary_dim)
