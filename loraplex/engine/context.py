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
    # LoRA deltas a layer left for the kernel that reads its output next (defer_delta / take_delta): output
    # tensor's address -> (the output, its pending delta). Empty again by the end of every forward.
    pending: dict = field(default_factory=dict)


_CURRENT: ContextVar[Optional[ForwardContext]] = ContextVar("loraplex_forward_context", default=None)


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)
    if ctx.pending:  # a layer's LoRA delta that no kernel folded in would be lost: never let it pass
        shapes = [tuple(y.shape) for y, _ in ctx.pending.values()]
        ctx.pending.clear()
        raise RuntimeError(f"LoRA deltas of outputs of shape {shapes} were deferred to the kernel reading them "
                           "next, and none did (a model whose lora_delta_consumers name a layer whose output "
                           "does not go straight into a fused norm or SiLU-and-mul)")


def defer_delta(y: torch.Tensor, pending: Any) -> None:
    """Leave ``pending`` (a :class:`~loraplex.kernels.lora_expand.PendingDelta`), the LoRA delta of the layer
    output ``y``, for the kernel that reads ``y`` next (:func:`take_delta`)."""
    get_forward_context().pending[y.data_ptr()] = (y, pending)


def take_delta(x: torch.Tensor) -> Optional[Any]:
    """The LoRA delta left pending for ``x`` (then no longer pending), or None: a kernel reading ``x`` must fold
    it in, or apply it (``PendingDelta.added_to``) before anything else reads ``x``."""
    got = take_delta_within(x)
    if got is None:
        return None
    y, pending = got
    if y.shape[0] != x.reshape(-1, x.shape[-1]).shape[0] or y.shape[-1] != x.shape[-1]:
        raise RuntimeError(f"a pending LoRA delta for an output of shape {tuple(y.shape)} met a tensor of shape "
                           f"{tuple(x.shape)}")
    return pending


def take_delta_within(x: torch.Tensor) -> Optional[tuple[torch.Tensor, Any]]:
    """(the layer output, its pending delta) when ``x`` starts where an output with a pending delta does (``x``
    the output itself, or its first slice, as q is of the qkv layer's), then no longer pending; else None."""
    ctx = _CURRENT.get()
    if ctx is None or not ctx.pending:
        return None
    return ctx.pending.pop(x.data_ptr(), None)


@contextmanager
def lora_rows(batch: Optional[LoRABatch]) -> Iterator[None]:
    """Run a part of the forward whose rows are not the step's tokens (e.g. vision-tower
    patches) with ``batch`` as the adapter slot of each row; the step's own batch is back after."""
    ctx = get_forward_context()
    # its own pending deltas: what the part defers it consumes, and the outer forward's are not its business
    with forward_context(dataclasses.replace(ctx, lora=batch, pending={})):
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
