"""Helpers shared by the Triton kernels (imported only by them: ``import loraplex`` stays light)."""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import torch

from loraplex import envs

logger = logging.getLogger("loraplex")

# Read when the kernels are imported, as triton reads it when it decorates them.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs: exact fp32 products ("ieee", no TF32) so results match the torch reference;
    bf16/fp16 products are exact on tensor cores anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: Optional[torch.device] = None) -> int:
    """Streaming multiprocessors of the current CUDA device (1 under the interpreter: fewest programs)."""
    if INTERPRET or (device is not None and device.type != "cuda") or not torch.cuda.is_available():
        return 1
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    return _sms(index)


# Read once, when the kernels are imported: every LoRA launch asks (eager steps make hundreds a step).
_PROGRAMS_PER_SM = envs.LORAPLEX_LORA_PROGRAMS_PER_SM


def programs_per_sm() -> int:
    """Programs per SM of the LoRA kernels' grids, which stride over their work items
    (``LORAPLEX_LORA_PROGRAMS_PER_SM``, for tuning). 32 measured best of 4 to 32 on an H200 (8B shapes, batch
    32 and 128, one adapter and distinct ones: docs/benchmarks.md)."""
    return _PROGRAMS_PER_SM


def _spec(arg) -> tuple:
    """Everything about one argument that Triton may specialise a compiled kernel on (a superset: pointer
    alignment and dtype; an int's width, divisibility by 16 and equality to 1)."""
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    if isinstance(arg, bool):
        return ("b", arg)
    if isinstance(arg, int):
        return ("i", arg == 1, arg % 16 == 0, -(2 ** 31) <= arg < 2 ** 31)
    if isinstance(arg, float):
        return ("f",)
    return (type(arg), arg)


class Launcher:
    """Launches a ``@triton.jit`` kernel, keeping the compiled kernel of each specialisation so that repeat
    launches skip Triton's argument binding and cache-key building, most of its host cost per launch.

    ``args`` are the kernel's runtime arguments in order, ``constexprs`` its constexpr arguments in signature
    order (they follow the runtime ones). The first launch of a specialisation goes through the JIT (and
    compiles); under the interpreter, with ``LORAPLEX_TRITON_FAST_LAUNCH=0``, or if this Triton's compiled
    kernels take their arguments otherwise, every launch does.
    """

    def __init__(self, fn) -> None:
        self.fn = fn
        self.fast = not INTERPRET and envs.LORAPLEX_TRITON_FAST_LAUNCH
        self._compiled: dict = {}

    def __call__(self, grid: tuple, args: tuple, constexprs: dict, **options) -> None:
        if not self.fast:
            self.fn[grid](*args, **constexprs, **options)
            return
        key = (tuple(map(_spec, args)), tuple(constexprs.values()), tuple(options.items()),
               torch.cuda.current_device())
        compiled = self._compiled.get(key)
        if compiled is None:
            self._compiled[key] = self.fn[grid](*args, **constexprs, **options)
            return
        try:
            compiled[grid + (1,) * (3 - len(grid))](*args, *constexprs.values())
        except (TypeError, IndexError):  # a Triton whose compiled kernels launch otherwise: JIT from now on
            self.fast = False
            self.fn[grid](*args, **constexprs, **options)


class CompileWatch:
    """Counts (and logs as warnings) the Triton kernels compiled after :meth:`start`: once an engine has
    started, every kernel variant its steps need should exist, and a compile means one step waited seconds
    for the compiler (a specialisation that start-up missed). One per process, installed through Triton's
    ``jit_post_compile_hook`` (a Triton without that knob: nothing is counted)."""

    compiles = 0
    _installed = False
    armed = False  # off while an engine starts (a second engine in one process compiles its own variants)

    @classmethod
    def pause(cls) -> None:
        cls.armed = False

    @classmethod
    def start(cls) -> None:
        cls.armed = True
        if cls._installed or INTERPRET:
            return
        try:
            from triton import knobs
        except ImportError:
            return
        previous = knobs.runtime.jit_post_compile_hook

        def hook(*args, **kwargs):
            if not cls.armed:
                return previous(*args, **kwargs) if previous is not None else None
            cls.compiles += 1
            logger.warning("loraplex: Triton compiled %s after start-up (a step waited for the compiler)",
                           kwargs.get("repr", "a kernel"))
            return previous(*args, **kwargs) if previous is not None else None

        knobs.runtime.jit_post_compile_hook = hook
        cls._installed = True


@functools.lru_cache(maxsize=64)
def identity_pages(num_slots: int, device: torch.device) -> torch.Tensor:
    """The padded layout's page table (``lora.backends.base.PageTable``): one page per slot, page ``s`` for
    slot ``s``, as the LoRA kernels take it when no table is given."""
    return torch.arange(num_slots, dtype=torch.int32, device=device).view(num_slots, 1)


_COUNTERS: dict[tuple[str, torch.device], torch.Tensor] = {}


def zeroed_counters(owner: str, n: int, device: torch.device) -> torch.Tensor:
    """At least ``n`` int32 zeros on ``device`` for the kernels of ``owner`` (``"lora_shrink"``),
    whose every launch leaves them zero: the last program of each work cell to finish counts itself in and
    resets the count. One set per owner, so that kernels on different streams never share a counter. Made at
    the first eager launch, before any graph capture, at a size that covers every step (65,536 counters: for
    the shrink, 4,096 tiles of 16 rows x 4 slices x 4 rank blocks); a larger need outside a capture makes a
    larger set."""
    have = _COUNTERS.get((owner, device))
    if have is None or have.numel() < n:
        if torch.cuda.is_available() and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{owner}: {n} counters needed inside a CUDA graph capture, "
                               f"{0 if have is None else have.numel()} made before it")
        have = _COUNTERS[(owner, device)] = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
    return have
