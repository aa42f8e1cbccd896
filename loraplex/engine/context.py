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
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from loraplex.attention.metadata import AttentionMetadata
from loraplex.lora.batch import LoRABatch


@dataclass
class ForwardContext:
    positions: torch.Tensor  # (T,) int64; (3, T) for M-RoPE models
    attn: AttentionMetadata  # flat varlen layout (loraplex.attention.metadata)
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
