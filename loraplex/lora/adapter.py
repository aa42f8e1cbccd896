"""Read and validate a PEFT LoRA adapter folder against a base model.

INTERFACE (stable; implementation in progress):

    spec = AdapterTargetSpec(...)            # built by the model runner from the live model
    adapter = load_adapter(name, path, spec, max_lora_rank)   # -> LoRAAdapter, or raises AdapterError
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

_adapter_ids = itertools.count(1)


@dataclass(frozen=True)
class ModuleTarget:
    """One module of the base model that LoRA may target, under its Hugging Face
    (unfused) name, e.g. ``model.layers.0.self_attn.q_proj``, ``lm_head``,
    ``model.embed_tokens``."""

    name: str
    kind: str  # "linear" | "embedding"
    in_features: int  # embedding: the vocabulary size (org_vocab_size, unpadded)
    out_features: int  # embedding: embedding_dim


@dataclass
class AdapterTargetSpec:
    """What the base model offers to adapters."""

    modules: dict[str, ModuleTarget]
    # fused leaf name -> the unfused leaf names it concatenates along the output dim,
    # e.g. {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    packed_modules_mapping: dict[str, list[str]]
    num_layers: int
    vocab_size: int
    # Full base weight of a module by HF name ("model.embed_tokens", "lm_head"), used to accept
    # the copies PEFT saves beside embedding/head LoRA; None where not available.
    base_weight: Callable[[str], Optional[torch.Tensor]] = lambda name: None


@dataclass
class LoRAWeights:
    """One module's LoRA, in PEFT's orientation. Linear: A ``[r, in]``, B ``[out, r]``.
    Embedding: A ``[r, vocab]``, B ``[hidden, r]``. Output delta = ``B @ A @ x * scaling``."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass
class LoRAAdapter:
    """A validated adapter, weights in host memory (float32), keyed by HF module name."""

    name: str
    path: str
    modules: dict[str, LoRAWeights]
    config: dict
    uid: int = field(default_factory=lambda: next(_adapter_ids))  # unique per load (cache keys, versions)

    @property
    def max_rank(self) -> int:
        return max((w.rank for w in self.modules.values()), default=0)

    @property
    def num_bytes(self) -> int:
        return sum(w.A.numel() * w.A.element_size() + w.B.numel() * w.B.element_size()
                   for w in self.modules.values())


def load_adapter(name: str, path: str, spec: AdapterTargetSpec, max_lora_rank: int) -> LoRAAdapter:
    raise NotImplementedError("in progress")
