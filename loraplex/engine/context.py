"""Per-batch state for one model forward, set by a context manager.

The model runner builds a :class:`ForwardContext` each step and runs the model
under ``with forward_context(ctx):``; attention layers read the KV layout from
it and LoRA wrappers read which adapter slot each token uses. Nothing here is a
mutable module global: the current context lives in a ``ContextVar``.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from loraplex.lora.batch import LoRABatch


@dataclass
class AttentionMetadata:
    """Paged-attention layout of a flat batch of ``T`` tokens from ``B`` sequences.

    Each sequence contributes its new tokens contiguously; ``query_index[b, j]``
    is the flat index of its j-th new token (-1 for padding) and
    ``query_pos[b, j]`` that token's position. ``context_lens[b]`` counts every
    token of the sequence in the cache after this step, new ones included.
    """

    slot_mapping: torch.Tensor  # (T,) int64: cache slot = block * block_size + offset
    block_tables: torch.Tensor  # (B, max_blocks) int64 (padding: 0)
    context_lens: torch.Tensor  # (B,) int64
    query_index: torch.Tensor  # (B, max_q) int64, -1 = padding
    query_pos: torch.Tensor  # (B, max_q) int64, 0 for padding
    max_context_len: int
    # True when no sequence has cached tokens from earlier steps (pure prefill).
    prefill_only: bool = False
    # A step that mixes decodes (one new token) with longer prefill chunks attends once per group, so
    # decodes are not padded to the longest chunk; each group's query_index points into the full
    # flat batch. slot_mapping is the parent's.
    groups: tuple["AttentionMetadata", ...] = ()
    _masks: dict = field(default_factory=dict, repr=False)

    def attention_mask(self, num_keys: int, sliding_window: Optional[int]) -> torch.Tensor:
        """(B, 1, max_q, num_keys) bool: query j of sequence b may see key position i.
        Built once per step and shared by every layer with the same window."""
        key = (num_keys, sliding_window)
        mask = self._masks.get(key)
        if mask is None:
            B = self.query_pos.shape[0]
            kpos = torch.arange(num_keys, device=self.query_pos.device).view(1, 1, num_keys)
            qpos = self.query_pos.unsqueeze(-1)  # (B, max_q, 1)
            mask = (kpos <= qpos) & (kpos < self.context_lens.view(B, 1, 1))
            if sliding_window is not None:
                mask &= kpos > qpos - sliding_window
            mask = self._masks[key] = mask.unsqueeze(1)
        return mask


@dataclass
class ForwardContext:
    positions: torch.Tensor  # (T,) int64; (3, T) for M-RoPE models
    attn: AttentionMetadata
    lora: Optional[LoRABatch] = None  # adapter slot of each token
    lora_logits: Optional[LoRABatch] = None  # adapter slot of each logits row
    # Images of the sequences prefilled this step (loraplex.multimodal.batch.MultiModalBatch), or None.
    multimodal: Optional[Any] = None


_CURRENT: ContextVar[Optional[ForwardContext]] = ContextVar("loraplex_forward_context", default=None)


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


@contextmanager
def lora_rows(batch: Optional[LoRABatch]) -> Iterator[None]:
    """Run a part of the forward whose rows are not the step's tokens (e.g. vision-tower
    patches) with ``batch`` as the adapter slot of each row; the step's own batch is back after."""
    ctx = get_forward_context()
    with forward_context(dataclasses.replace(ctx, lora=batch)):
        yield


def get_forward_context() -> ForwardContext:
    ctx = _CURRENT.get()
    if ctx is None:
        raise RuntimeError("model forward called outside `with forward_context(...)`")
    return ctx


def current_lora_batch(for_logits: bool = False) -> Optional[LoRABatch]:
    """The LoRA batch info of the running forward, or None outside one (plain use)."""
    ctx = _CURRENT.get()
    if ctx is None:
        return None
    return ctx.lora_logits if for_logits else ctx.lora
