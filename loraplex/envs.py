"""Every ``LORAPLEX_*`` environment variable in one place: its type, default and meaning.

Read on access (``from loraplex import envs; envs.LORAPLEX_LORA_FOLD_DELTA``), so a test or a launcher may set a
variable before an engine starts; the modules that size things at import (the mixed graphs, the LoRA kernels'
grid) read theirs once, at import. A value that does not parse raises ``ValueError`` naming the variable, its
value and what it accepts.

Apart from ``LORAPLEX_API_KEY`` these are switches for comparing a design with its alternative on a GPU (and
for tests); users need none of them. docs/architecture.md ("Environment switches") gives each one's status:
opt-in until a GPU has timed it, then the default or deleted.
"""

from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple, Optional

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class Switch(NamedTuple):
    parse: Callable[[str, str], Any]  # (name, raw value) -> value
    default: Any
    doc: str


def _bool(name: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r}: expected 1 or 0 (or true/false, yes/no, on/off)")


def _int(minimum: int, multiple: int = 1) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            v = int(raw.strip())
        except ValueError:
            raise ValueError(f"{name}={raw!r}: expected an integer") from None
        if v < minimum:
            raise ValueError(f"{name}={raw!r}: expected an integer >= {minimum}")
        if v % multiple:
            raise ValueError(f"{name}={raw!r}: expected a multiple of {multiple}")
        return v
    return parse


def _choice(*values: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        v = raw.strip().lower()
        if v not in values:
            raise ValueError(f"{name}={raw!r}: expected one of {', '.join(values)}")
        return v
    return parse


def _str(name: str, raw: str) -> str:
    return raw


SWITCHES: dict[str, Switch] = {
    # CUDA graphs (engine/cuda_graph.py), read at import
    "LORAPLEX_MIXED_GRAPH_TOKENS": Switch(_int(16), 2048, "the largest mixed-step graph, in tokens (powers of "
                                          "two above 512; never above max_num_batched_tokens)"),
    "LORAPLEX_MIXED_GRAPH_STEP": Switch(_int(0, 16), 64, "mixed graphs at every multiple of this many tokens up to "
                                        "512 too (0: powers of two only)"),
    "LORAPLEX_GRAPH_CUBLASLT_TOKENS": Switch(_int(0), 64, "CUDA graphs of at most this many tokens (decode batch "
                                             "or mixed step) captured with cuBLASLt as the GEMM library (0: none)"),
    "LORAPLEX_EMULATE_CUDA_GRAPHS": Switch(_bool, False, "on the CPU, graph steps run eagerly over the graphs' "
                                           "buffers (tests)"),
    # the Triton LoRA backend and kernels
    "LORAPLEX_LORA_OVERLAP": Switch(_bool, None, "the shrink on a side stream beside the base GEMM (unset: on "
                                    "with one rank, off under tensor parallelism)"),
    "LORAPLEX_LORA_SIDE_EXPAND": Switch(_bool, True, "the expand of batches up to 512 rows beside the base GEMM, "
                                        "into a float32 delta"),
    "LORAPLEX_LORA_FOLD_DELTA": Switch(_bool, True, "that delta added by the next fused kernel (rotary, RMSNorm, "
                                       "SiLU-and-mul) rather than by a kernel of its own"),
    "LORAPLEX_LORA_REDUCE": Switch(_bool, True, "the shrink sums its own split-K partials"),
    "LORAPLEX_LORA_DEVICE_SPLITS": Switch(_bool, True, "the shrink's split-K from the real tile count, read on "
                                          "the device"),
    "LORAPLEX_LORA_VECTOR_B": Switch(_bool, True, "the expand reads B a page at a time (16-byte loads)"),
    "LORAPLEX_LORA_PROGRAMS_PER_SM": Switch(_int(1), 32, "the LoRA kernels' grid, in programs per SM"),
    "LORAPLEX_TRITON_FAST_LAUNCH": Switch(_bool, True, "launches through the compiled kernel's own launcher "
                                          "rather than Triton's Python entry point"),
    "LORAPLEX_FUSED_KERNELS": Switch(_bool, True, "the Triton RMSNorm, rotary and SiLU-and-mul kernels on CUDA"),
    # adapter loads (lora/model_lora.py, lora/pool.py)
    "LORAPLEX_BATCHED_SLOT_WRITES": Switch(_bool, True, "an adapter's slot load as one batched launch (Triton "
                                           "backend, paged slots)"),
    "LORAPLEX_SLOT_PLANS": Switch(_bool, True, "slot loads replay a plan built on the thread that read the "
                                  "adapter"),
    "LORAPLEX_SLOT_LOAD_STAGING": Switch(_bool, True, "the staged adapter copied into a device buffer before the "
                                         "copy kernel reads it"),
    "LORAPLEX_ADMIT_LOADING": Switch(_choice("0", "1", "next"), "0", "a request whose adapter is still being "
                                     "copied joins (1: at once; next: from the next scheduling round), its step "
                                     "waiting for the copy on the device"),
    # diagnostics
    "LORAPLEX_STEP_TRACE": Switch(_str, None, "a file each engine step appends one JSON line to: its start, wall "
                                  "and host time, sequences, tokens, prompt chunks, the CUDA graph it replayed "
                                  "or eager, requests finished"),
    # the server
    "LORAPLEX_ENGINE_SEND_THREAD": Switch(_bool, True, "the server's engine process pickles and sends its "
                                          "messages on a writer thread, not in the step loop"),
    "LORAPLEX_API_KEY": Switch(_str, None, "the key clients must send (`--api-key` takes precedence); kept out of "
                               "the process list"),
}


def get(name: str) -> Any:
    """The value of ``name`` now: its default when unset or empty."""
    switch = SWITCHES.get(name)
    if switch is None:
        raise KeyError(f"unknown loraplex environment variable {name!r}; known: {', '.join(sorted(SWITCHES))}")
    raw: Optional[str] = os.environ.get(name)
    if raw is None or raw == "":
        return switch.default
    return switch.parse(name, raw)


def __getattr__(name: str) -> Any:
    if name in SWITCHES:
        return get(name)
    raise AttributeError(f"module 'loraplex.envs' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*SWITCHES, "SWITCHES", "Switch", "get"])
