"""Every Triton kernel variant the CPU tests launched compiles for the GPU.

On a machine without CUDA the kernels run in Triton's interpreter, which never compiles them, so a variant
the compiler rejects passes there and fails only on the GPU (the first GPU run of a split-K GEMM, since
removed, found one: a pointer typed bf16 in a branch that a single split never took, but that the compiler
still typed). tests/conftest.py records the variant of every launch (argument types, constexprs, options);
this test runs after every other and compiles each for sm_90 with scripts/compile_kernels.py, in a process
without the interpreter.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import KERNEL_VARIANTS, run_compile_script

KERNEL_MODULES = {"loraplex.kernels.lora_shrink", "loraplex.kernels.lora_expand", "loraplex.kernels.lora_embed",
                  "loraplex.kernels.layer_ops", "loraplex.kernels.slot_write", "loraplex.attention.triton_attention"}


def _compile(variants: list[dict], tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "variants.json"
    path.write_text(json.dumps(variants))
    return run_compile_script("compile_kernels.py", str(path), timeout=1200)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels compile as the other tests launch them")
def test_every_launched_kernel_compiles_for_sm90(tmp_path, monkeypatch) -> None:
    if len({v["module"] for v in KERNEL_VARIANTS.values()}) < len(KERNEL_MODULES):
        # run alone (or with too few of the kernel tests): launch the engine's kernels here
        import test_kernels

        test_kernels.test_engine_triton_matches_torch(tmp_path / "engine", monkeypatch)
    variants = list(KERNEL_VARIANTS.values())
    # the engine on a CPU runs the LoRA kernels (attention and the layer ops there are the torch references)
    assert {v["module"] for v in variants} >= {m for m in KERNEL_MODULES if ".lora_" in m}, \
        f"kernels launched: {sorted({v['module'] + '.' + v['kernel'] for v in variants})}"
    run = _compile(variants, tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert f"{len(variants)} of {len(variants)} variants compiled" in run.stdout


def test_compile_check_catches_a_variant_the_compiler_rejects(tmp_path) -> None:
    """The check fails, naming the kernel, for a variant that runs in the interpreter but does not compile:
    the words kernel with its buffer typed bf16 (it casts the loaded values to pointers, which bf16 cannot)."""
    bad = {"module": "loraplex.kernels.slot_write", "kernel": "_write_words_kernel",
           "signature": {"buf_ptr": "*bf16", "n": "i32", "BLOCK": "constexpr"}, "constexprs": {"BLOCK": 256},
           "options": {}}
    run = _compile([bad], tmp_path)
    assert run.returncode == 1 and "FAILED loraplex.kernels.slot_write._write_words_kernel" in run.stdout
