"""One adapter's tensors in one flat byte buffer.

:func:`pack_adapter` lays every tensor of a :class:`~loraplex.lora.adapter.LoRAAdapter` (LoRA A and B, DoRA
magnitudes, LoRA biases, trainable-token ids and rows, trained tables) end to end in one uint8 buffer and
returns a copy of the adapter whose tensors are replaced by their places (:class:`Packed`): a small object that
pickles without the weights. :func:`unpack_adapter` turns the places back into tensors, views of the buffer
wherever it lives. Two users:

* staging (:meth:`LoRAModel.stage`): an adapter's weights in *one* buffer of (on CUDA) pinned host memory, in
  the slots' dtype, the adapter's tensors being views of it: one pinned allocation per adapter, not one per
  tensor;
* tensor parallelism: rank 0 sends an adapter entering a slot as its description in the step plan plus the
  buffer in one collective broadcast (``distributed/tp_engine.py``), the staged buffer itself when there is one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import torch


class Packed(NamedTuple):
    """Where one tensor of a packed adapter lies in its flat byte buffer."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple


ALIGN = 64  # bytes: every packed tensor starts aligned, so its view keeps any dtype's alignment


def _map_tensors(adapter: Any, fn: Callable[[Any, bool], Any]) -> Any:
    """A copy of ``adapter`` with ``fn(tensor or place, small)`` applied to each of its tensors (``small``: a
    tensor a slot may keep beside its stacks, rather than copy into them: everything but LoRA A and B)."""
    def f(t: Any, small: bool = True) -> Any:
        return None if t is None else fn(t, small)

    modules = {k: dataclasses.replace(w, A=f(w.A, False), B=f(w.B, False), magnitude=f(w.magnitude),
                                      bias=f(w.bias)) for k, w in adapter.modules.items()}
    tokens = {k: (f(ids), f(rows)) for k, (ids, rows) in adapter.tokens.items()}
    saved = {k: f(t) for k, t in adapter.saved.items()}
    return dataclasses.replace(adapter, modules=modules, tokens=tokens, saved=saved, packed=None, slot_plan=None)


def pack_adapter(adapter: Any, pin: Optional[bool] = None) -> tuple[Any, torch.Tensor]:
    """(a copy of ``adapter`` whose tensors are :class:`Packed` places, one flat uint8 tensor holding them all).
    An adapter that :meth:`LoRAModel.stage` packed already returns its staged buffer, uncopied. ``pin``: pinned
    host memory (default: when CUDA is available)."""
    staged = getattr(adapter, "packed", None)
    if staged is not None:
        return staged
    parts: list[tuple[int, torch.Tensor]] = []
    size = 0

    def place(t: torch.Tensor, small: bool) -> Packed:
        nonlocal size
        t = t.detach().contiguous()
        n = t.numel() * t.element_size()
        parts.append((size, t))
        p = Packed(size, n, t.dtype, tuple(t.shape))
        size += -(-n // ALIGN) * ALIGN
        return p

    meta = _map_tensors(adapter, place)
    pin = torch.cuda.is_available() if pin is None else pin
    flat = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
    for offset, t in parts:
        if t.numel():
            flat[offset:offset + t.numel() * t.element_size()].copy_(t.reshape(-1).view(torch.uint8))
    return meta, flat


def unpack_adapter(meta: Any, flat: torch.Tensor, own_small: bool = True) -> Any:
    """The adapter :func:`pack_adapter` packed, its tensors read from ``flat`` (on any device): views of it, but
    with ``own_small`` the tensors a slot may keep (tables, token rows, DoRA magnitudes, biases) are copied out,
    so that ``flat`` can be freed once a slot is written (tensor-parallel ranks receiving an adapter)."""
    def view(p: Packed, small: bool) -> torch.Tensor:
        t = flat[p.offset:p.offset + p.nbytes].view(p.dtype).view(p.shape)
        return t.clone() if small and own_small else t

    return _map_tensors(meta, view)
