"""LoRA backend interface and registry.

A backend computes the batched LoRA delta in two steps (punica's split):

    shrink: buf[t, i, :r] = x[t] @ A_i[slot(t)][:r].T          for every slice i
    expand: y[t, off_i:off_i+n_i] += buf[t, i, :r] @ B_i[slot(t)][:, :r].T * scale_i[slot(t)]

with ``r = ranks[i][slot]`` (0: the slot has no weights for slice i); rows
whose slot is -1 (the base model) or has rank 0 everywhere are left untouched.
Row-parallel layers all-reduce ``buf`` between the two steps, so ``buf`` is
opaque to the wrapper: each backend defines its layout (it must be linear in
the rows' contributions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

import torch

from loraplex.backend_registry import load_backend, resolve_auto
from loraplex.lora.batch import LoRABatch


@dataclass
class LoRAStack:
    """The stacked per-slot weights of one wrapper, as every backend reads them.

    Linear layers: ``a`` (slices, slots, max_rank, in); embeddings: ``a`` (1, slots, vocab, max_rank), A
    transposed so that a lookup by token id is a row gather. ``b`` (slots, sum(slices), max_rank): B with the
    slices side by side along dim 1 (each slice's view has the layout of PEFT's ``lora_B.weight``, so the
    torch backend's matmuls round as PEFT's do).
    ``a_slices[i]`` / ``b_slices[i]`` are views of slice i: (slots, max_rank, in) / (slots, n_i, max_rank).
    Host ``ranks`` / ``scales`` ``[slice][slot]`` serve the torch backend; their device mirrors
    ``ranks_t`` (slices, slots) int32 and ``scales_t`` (slices, slots) float32 serve the kernels. All of
    them change only in :meth:`set` / :meth:`clear` (adapter loads), never in a forward.
    ``ext`` / ``ext_flags`` (backends that fuse them, see ``LoRABackend.fuses_extras``; else None): per slot,
    ``scaling * lora_B.bias`` (row 0, 0 where none) and DoRA's per-channel scale (row 1, 1 where none) over
    every output column, (slots, 2, sum(slices)) float32, and (slots,) int32, 1 where the slot has either.
    """

    a: torch.Tensor
    b: torch.Tensor
    slices: tuple[int, ...]
    ext: Optional[torch.Tensor] = None
    ext_flags: Optional[torch.Tensor] = None
    a_slices: list[torch.Tensor] = field(init=False)
    b_slices: list[torch.Tensor] = field(init=False)
    ranks: list[list[int]] = field(init=False)
    scales: list[list[float]] = field(init=False)
    ranks_t: torch.Tensor = field(init=False)
    scales_t: torch.Tensor = field(init=False)
    slice_meta: torch.Tensor = field(init=False)  # (slices, 2) int32: offset, width of each slice in y

    @classmethod
    def zeros(cls, num_slices: int, max_loras: int, max_rank: int, a_rows: int, a_cols: int,
              slices: Sequence[int], dtype: torch.dtype, device: torch.device, extras: bool = False) -> "LoRAStack":
        """All-zero stack: ``a`` (num_slices, max_loras, a_rows, a_cols), ``b`` (max_loras, sum(slices), max_rank);
        ``extras``: with the per-slot LoRA bias and DoRA rows (no slot has them yet)."""
        a = torch.zeros(num_slices, max_loras, a_rows, a_cols, dtype=dtype, device=device)
        b = torch.zeros(max_loras, sum(slices), max_rank, dtype=dtype, device=device)
        ext = flags = None
        if extras:
            ext = torch.zeros(max_loras, 2, sum(slices), dtype=torch.float32, device=device)
            ext[:, 1] = 1.0
            flags = torch.zeros(max_loras, dtype=torch.int32, device=device)
        return cls(a, b, tuple(slices), ext, flags)

    def __post_init__(self) -> None:
        n_slices, n_slots = self.a.shape[0], self.a.shape[1]
        dev = self.a.device
        self.a_slices = [self.a[i] for i in range(n_slices)]
        offs = [sum(self.slices[:i]) for i in range(len(self.slices))]
        self.b_slices = [self.b[:, o:o + n] for o, n in zip(offs, self.slices)]
        self.ranks = [[0] * n_slots for _ in range(n_slices)]
        self.scales = [[0.0] * n_slots for _ in range(n_slices)]
        self.ranks_t = torch.zeros(n_slices, n_slots, dtype=torch.int32, device=dev)
        self.scales_t = torch.zeros(n_slices, n_slots, dtype=torch.float32, device=dev)
        self.slice_meta = torch.tensor([[o, n] for o, n in zip(offs, self.slices)], dtype=torch.int32).to(dev)

    @property
    def num_slices(self) -> int:
        return len(self.slices)

    @property
    def max_rank(self) -> int:
        return self.b.shape[2]

    def set(self, slot: int, i: int, rank: int, scale: float) -> None:
        """Record slice ``i`` of ``slot`` (its weights already copied into ``a`` / ``b``)."""
        self.ranks[i][slot] = rank
        self.scales[i][slot] = scale
        self._sync(slot)

    def clear(self, slot: int) -> None:
        """Zero every slice of ``slot``."""
        for i in range(self.num_slices):
            self.a[i, slot].zero_()
            self.ranks[i][slot] = 0
            self.scales[i][slot] = 0.0
        self.b[slot].zero_()
        self._sync(slot)
        self.set_extras(slot, None, None)

    def set_extras(self, slot: int, bias: Optional[torch.Tensor], dora: Optional[torch.Tensor]) -> None:
        """``slot``'s LoRA bias (``scaling * bias`` per output column) and DoRA scale (per output column), either
        None; on the stack's device, float32 (needs ``ext``)."""
        if self.ext is None:
            assert bias is None and dora is None, "this stack keeps no per-slot extras (see LoRABackend.fuses_extras)"
            return
        if bias is None:
            self.ext[slot, 0].zero_()
        else:
            self.ext[slot, 0].copy_(bias)
        if dora is None:
            self.ext[slot, 1].fill_(1.0)
        else:
            self.ext[slot, 1].copy_(dora)
        self.ext_flags[slot].fill_(int(bias is not None or dora is not None))

    def _sync(self, slot: int) -> None:
        col = [self.ranks[i][slot] for i in range(self.num_slices)]
        self.ranks_t[:, slot].copy_(upload(torch.tensor(col, dtype=torch.int32), self.ranks_t))
        col_s = [self.scales[i][slot] for i in range(self.num_slices)]
        self.scales_t[:, slot].copy_(upload(torch.tensor(col_s, dtype=torch.float32), self.scales_t))


def upload(src: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``src`` on ``like``'s device without the host waiting for the device: a host tensor goes through
    pinned, contiguous memory and a non-blocking copy (a copy from pageable memory would first wait for the
    work queued on the stream). Copy the result into a strided destination on the device. CPU: ``src``."""
    if not like.is_cuda or src.is_cuda:
        return src
    if not (src.is_contiguous() and src.is_pinned()):
        src = src.contiguous().pin_memory()
    return src.to(like.device, non_blocking=True)


class LoRABackend(Protocol):
    name: str
    # Whether expand applies the stack's per-slot LoRA bias and DoRA scale itself (``LoRAStack.ext``): the
    # wrappers then keep none of them on the host, and steps with such adapters can replay CUDA graphs.
    fuses_extras: bool

    def shrink(self, x: torch.Tensor, w: LoRAStack, batch: LoRABatch) -> torch.Tensor:
        """x (T, in) -> buf holding x[t] @ A_i[slot(t), :r].T for every slice (layout: the backend's)."""

    def expand(self, y: torch.Tensor, buf: torch.Tensor, w: LoRAStack, batch: LoRABatch,
               bias: Optional[torch.Tensor] = None) -> None:
        """y (T, sum(slices)) += per-slice buf @ B_i[slot].T * scale_i[slot], in place; then, when the backend
        fuses extras, the slot's LoRA bias and DoRA rescaling (``bias``: the base layer's, which DoRA keeps)."""

    def embed(self, y: torch.Tensor, ids: torch.Tensor, w: LoRAStack, batch: LoRABatch) -> None:
        """y (T, hidden) += A_t[slot][ids, :r] @ B[slot][:, :r].T * scale[slot], in place (``w.a`` holds A_t)."""


_BACKENDS = {
    "torch": ("loraplex.lora.backends.torch_backend", "TorchLoRABackend"),
    "triton": ("loraplex.lora.backends.triton_backend", "TritonLoRABackend"),
}
NAMES = (*_BACKENDS, "auto")


def resolve_backend_name(name: str, device: Optional[torch.device] = None) -> str:
    """``auto`` -> ``triton`` on CUDA when triton imports, else ``torch``; other names unchanged."""
    return resolve_auto(name, device)


def get_backend(name: str, device: Optional[torch.device] = None) -> LoRABackend:
    """The backend registered as ``name`` (``auto``: see :func:`resolve_backend_name`)."""
    return load_backend("LoRA backend", "lora_backend", name, _BACKENDS, device)