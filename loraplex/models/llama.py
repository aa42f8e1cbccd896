"""Llama-family decoder: Llama 2/3, Mistral, Qwen2 (qkv bias) and Qwen3 (q/k norm).

Parameter names follow Hugging Face's, except that q/k/v and gate/up are fused
(see ``packed_modules_mapping``); the loader and the LoRA code map between the two.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from loraplex.layers.activation import GatedActivation
from loraplex.layers.attention import PagedAttention
from loraplex.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from loraplex.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from loraplex.layers.norm import RMSNorm
from loraplex.layers.rotary import get_rope, rope_parameters


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        hd = _head_dim(config)
        o_bias = bool(getattr(config, "attention_bias", False))
        n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, hd, config.num_attention_heads, n_kv, bias=qkv_bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * hd, config.hidden_size, bias=o_bias)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = hd
        self.q_size = self.num_heads * hd
        self.kv_size = self.num_kv_heads * hd
        if qk_norm:
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        params = rope_parameters(config)
        rotary_dim = int(hd * params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
        self.rotary_emb = get_rope(hd, config.max_position_embeddings, params, rotary_dim)
        window = getattr(config, "sliding_window", None)
        if getattr(config, "use_sliding_window", True) is False:
            window = None
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, hd, hd ** -0.5, window)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # (tokens, heads, dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        return self.o_proj(self.attn(q, k, v, positions, self.rotary_emb))


class LlamaMLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = GatedActivation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, qkv_bias, qk_norm)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, h: torch.Tensor, residual: Optional[torch.Tensor],
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, residual)`` -> ``(mlp output, residual stream before it)``; the stream is ``h + residual``
        (``h`` alone in the first layer), added inside the fused norms."""
        if residual is None:
            residual = h
            x = self.input_layernorm(h)
        else:
            x, residual = self.input_layernorm(h, residual)
        h = self.self_attn(positions, x)
        x, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: Any, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, qkv_bias, qk_norm)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (tokens, hidden)
        residual = None
        for layer in self.layers:
            h, residual = layer(positions, h, residual)
        return self.norm(h, residual)[0] if residual is not None else self.norm(h)


class LlamaForCausalLM(nn.Module):
    """Serves ``LlamaForCausalLM`` and ``MistralForCausalLM`` folders."""

    # Fused loraplex module -> the Hugging Face modules it concatenates (output dim, in order).
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    qkv_bias = False
    qk_norm = False
    # Layers whose output goes straight into a fused kernel that can fold their pending LoRA delta (qkv_proj into
    # the rotary-and-cache kernel, o_proj and down_proj into the next residual-add RMSNorm, gate_up_proj into
    # SiLU-and-mul; see LORAPLEX_LORA_FOLD_DELTA).
    lora_delta_consumers = ("qkv_proj", "o_proj", "down_proj", "gate_up_proj")

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        qkv_bias = self.qkv_bias or bool(getattr(config, "attention_bias", False))
        self.model = LlamaModel(config, qkv_bias, self.qk_norm)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.tie_to(self.model.embed_tokens)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    @property
    def tied_embeddings(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(rows, hidden) -> (rows, padded vocab); padding columns are masked by the sampler."""
        return self.lm_head(hidden)


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
    lora_delta_consumers = ("o_proj", "down_proj", "gate_up_proj")  # q and k go through their norms first
