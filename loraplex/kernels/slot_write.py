"""An adapter's slot load as one launch: block copies from its staged buffer into the slots' pages.

    dst_k = dst_base_k + table[row + page_k] * page_stride_k       (the piece's page of the slot, in bytes)
    dst_k[r, c] = src[off_k + r * rs_k + c * cs_k]  if r < rows_valid_k and c < cols_valid_k
                  0                                 otherwise,   for r < rows_k, c < cols_k

for every piece k of a descriptor table (one row of PIECE_FIELDS int64 per piece: the stack's address, the
piece's page index within the slot and the page's size in bytes, the source offset and strides in elements,
the valid and the whole extents, the destination's row stride; the destination's columns are contiguous).
``table`` is the page table (int32, ``PageTable.table``) and ``row`` the slot's first entry in it, so a
descriptor depends on the adapter alone, not on the slot or pages it goes to: an adapter's descriptors are
built once (``lora/slot_plan.py``) and every later load of it reuses them. The copy is bitwise: tensors of 2
(or 4) bytes go as int16 (int32), so the same kernel serves every dtype, and zero fill is +0.0.
:func:`write_words` sets scattered 32-bit words (ranks, scales, page-table entries) in one launch; a load runs
it first, so the copy reads the slot's new table entries.

On CUDA the source is the adapter's staged buffer in pinned host memory, which the kernel reads in place
(unified addressing), as it reads a pinned descriptor table: no device copy of the adapter is made. Where a
Triton build refuses a host pointer, both are first copied to the device.

Reference: the per-tensor writes of :class:`~loraplex.lora.backends.base.LoRAStack` (``write_a``,
``write_b``, ``write_a_t``); ``tests/test_kernels.py`` loads adapters both ways and compares the slots bit
for bit.
Schedule: ``PARTS`` programs per piece, taking turns over its elements in row-major blocks of ``BLOCK``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.transfer import to_device

# the stack's address, page index in the slot, page bytes, src offset, src row stride, src col stride, rows valid,
# cols valid, rows, cols, dst row stride
PIECE_FIELDS = 11
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
PARTS, BLOCK = 8, 1024  # programs per piece, elements per step of each
_host_reads = True  # whether kernels may read pinned host memory in place (cleared if Triton refuses it)


# row (the slot's first page-table entry) is never specialised: nor must a load into another slot compile one
@triton.jit(do_not_specialize=["row"])
def _copy_pieces_kernel(desc_ptr, src_ptr, table_ptr, row, PARTS: tl.constexpr, BLOCK: tl.constexpr):
    d = desc_ptr + tl.program_id(0).to(tl.int64) * 11
    page = tl.load(table_ptr + row + tl.load(d + 1)).to(tl.int64)
    dst = (tl.load(d) + page * tl.load(d + 2)).to(tl.pointer_type(src_ptr.dtype.element_ty))
    off = tl.load(d + 3)
    src_rs = tl.load(d + 4)
    src_cs = tl.load(d + 5)
    rows_valid = tl.load(d + 6)
    cols_valid = tl.load(d + 7)
    rows = tl.load(d + 8)
    cols = tl.load(d + 9)
    dst_rs = tl.load(d + 10)
    n = rows * cols
    # the piece's elements in row-major order, BLOCK at a time, PARTS programs taking turns: every shape (a
    # page of A is 8 x 4096, of B 4096 x 8) keeps the lanes busy, and consecutive lanes touch consecutive
    # destination (and, for A and B, source) addresses
    for e0 in range(tl.program_id(1) * BLOCK, n, PARTS * BLOCK):
        e = e0 + tl.arange(0, BLOCK).to(tl.int64)
        inside = e < n
        r = e // cols
        c = e % cols
        valid = inside & (r < rows_valid) & (c < cols_valid)
        v = tl.load(src_ptr + off + r * src_rs + c * src_cs, mask=valid, other=0)
        tl.store(dst + r * dst_rs + c, v, mask=inside)


# n is never specialised: a load with another number of words must not compile a variant mid-serving
@triton.jit(do_not_specialize=["n"])
def _write_words_kernel(buf_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    addr = tl.load(buf_ptr + offs, mask=mask, other=0).to(tl.pointer_type(tl.int32))  # n addresses, then n words
    tl.store(addr, tl.load(buf_ptr + n + offs, mask=mask, other=0).to(tl.int32), mask=mask)


def as_words(flat: torch.Tensor, size: int) -> torch.Tensor:
    """The byte buffer ``flat`` viewed as integers of ``size`` bytes (its whole ones): what the copy of
    elements of that size moves, bit for bit."""
    return flat[:flat.numel() // size * size].view(_INT_OF_SIZE[size])


def copy_pieces(src: torch.Tensor, desc: torch.Tensor, device: torch.device, table: torch.Tensor,
                row: int) -> list[torch.Tensor]:
    """Run every piece of ``desc`` ((pieces, PIECE_FIELDS) int64 on the host, pinned on CUDA to be read in
    place) from ``src`` (a flat integer view of the staged buffer, see :func:`as_words`) on ``device``'s current
    stream, each into its page ``table[row + page index]``. Returns the tensors the launch reads, which must
    stay alive until it has run (the caller holds them until the slot's upload event)."""
    global _host_reads
    if desc.shape[0] == 0:
        return []
    grid = (desc.shape[0], PARTS)
    if device.type == "cuda" and _host_reads and (src.device != device or desc.device != device):
        try:
            if not desc.is_pinned():
                desc = desc.pin_memory()
            _copy_pieces_kernel[grid](desc, src, table, row, PARTS=PARTS, BLOCK=BLOCK)
            return [src, desc]
        except (ValueError, RuntimeError):  # this Triton checks that pointers are device memory
            _host_reads = False
    if src.device != device:
        src = src.to(device, non_blocking=True)
    if desc.device != device:
        desc = to_device(desc, device)
    _copy_pieces_kernel[grid](desc, src, table, row, PARTS=PARTS, BLOCK=BLOCK)
    return [src, desc]


def write_words(addrs: torch.Tensor, values: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """``*addrs[i] = values[i]`` for 32-bit words (``addrs`` int64 addresses, ``values`` their bits as int64;
    host tensors), on ``device``'s current stream; returns what the launch reads (see :func:`copy_pieces`)."""
    n = addrs.shape[0]
    if n == 0:
        return []
    both = to_device(torch.cat([addrs, values]), device)
    block = 256
    _write_words_kernel[(triton.cdiv(n, block),)](both, n, BLOCK=block)
    return [both]


def warm_up(element_size: int, device: torch.device) -> None:
    """Compile both kernels for tensors of ``element_size`` bytes (start-up: no slot load waits for Triton)."""
    dtype = _INT_OF_SIZE[element_size]
    dst = torch.zeros(2, 4, dtype=dtype, device=device)
    src = torch.zeros(64, dtype=torch.uint8, pin_memory=device.type == "cuda").view(dtype)
    table = torch.zeros(2, dtype=torch.int32, device=device)
    desc = torch.tensor([[dst.data_ptr(), 1, 0, 0, 4, 1, 1, 4, 2, 4, 4]], dtype=torch.int64)
    copy_pieces(src, desc, device, table, 0)
    word = torch.zeros(1, dtype=torch.int32, device=device)
    write_words(torch.tensor([word.data_ptr()], dtype=torch.int64), torch.tensor([7], dtype=torch.int64), device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    assert word.item() == 7, "the slot-write kernels did not run"
