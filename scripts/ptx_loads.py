"""How the hot Triton kernels touch global memory, without a GPU: each is compiled for an NVIDIA target
(default sm_90, the H200's) at the shapes of the Llama-3-8B decode step, and the PTX's global loads, stores
and asynchronous copies are counted by width. A ``ld.global.b16`` per element where a ``ld.global.v4.b32``
would load eight is the compiler saying that it could not prove the addresses contiguous or aligned (a mask
or an index that varies along the contiguous dimension, a loaded index, an offset of unknown alignment).

Integer arguments that the launcher specialises (pointers, strides and sizes divisible by 16) carry that
hint here too; sizes the kernels mark ``do_not_specialize`` do not.

    python scripts/ptx_loads.py               # every kernel below
    python scripts/ptx_loads.py expand        # one; --arch 80 for an A100
    python scripts/ptx_loads.py --resources --maxnreg 64   # registers and spills under a register cap

Triton compiles for CUDA targets on a machine without a GPU (its wheel carries ptxas); do not set
``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, said out loud (it warns otherwise)


def _kernels() -> dict:
    """name -> (kernel, signature, constexprs, arguments with the divisibility hint, compile options)."""
    from loraplex.attention.triton_attention import _decode_split_kernel
    from loraplex.kernels.lora_expand import _expand_kernel
    from loraplex.kernels.lora_shrink import _shrink_kernel

    expand_sig = dict(y_ptr="*fp32", parts_ptr="*fp32", b_ptr="*bf16", tiles_ptr="*i32", count_ptr="*i64",
                      ranks_ptr="*i32", scales_ptr="*fp32", slice_ptr="*i32", pages_ptr="*i32", ext_ptr="*fp32",
                      ext_rows_ptr="*i32", bias_ptr="*bf16", num_splits="i32", T="i32", num_tiles="i32",
                      stride_ym="i32", n_total="i32", num_slots="i32")
    # gate_up at batch 32, rank 16, pages of 8 rank rows, into the side stream's float32 delta
    expand_const = dict(NUM_SLICES=2, MAX_RANK=16, N_BLOCKS=112, BLOCK_M=16, BLOCK_N=128, BLOCK_R=16, PAGE=8,
                        MAX_PAGES=2, PRECISION="tf32", UPCAST=False, EXTRAS=False, HAS_BIAS=False, HAS_COUNT=True,
                        DELTA=True)
    expand_hint = ["stride_ym", "n_total", "num_slots"]
    shrink_sig = dict(x_ptr="*bf16", a_ptr="*bf16", out_ptr="*fp32", tiles_ptr="*i32", count_ptr="*i64",
                      ranks_ptr="*i32", pages_ptr="*i32", buf_ptr="*fp32", sem_ptr="*i32", T="i32", K="i32",
                      k_per_split="i32", num_tiles="i32", splits="i32", stride_xm="i32", num_slots="i32",
                      num_pages="i32", target="i32")
    shrink_const = dict(NUM_SLICES=3, MAX_RANK=16, R_BLOCKS=1, BLOCK_M=16, BLOCK_R=16, BLOCK_K=128, PAGE=8,
                        MAX_PAGES=2, PRECISION="tf32", UPCAST=False, HAS_COUNT=True, REDUCE=True, DEVICE_SPLITS=True)
    attn_sig = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", part_ptr="*fp32", stats_ptr="*fp32",
                    qsl_ptr="*i32", seq_lens_ptr="*i32", tables_ptr="*i32", qk_scale="fp32", window="i32",
                    num_heads="i32", stride_qt="i32", stride_qh="i32", stride_kb="i32", stride_ks="i32",
                    stride_kh="i32", stride_vb="i32", stride_vs="i32", stride_vh="i32", stride_tb="i32")
    attn_const = dict(HEAD_DIM=128, D_PAD=128, GROUP=4, BLOCK_M=16, NUM_SPLITS=2, TILE_N=64, BLOCK_SIZE=16,
                      USE_WINDOW=False, PRECISION="tf32", UPCAST=False)
    return {
        "expand": (_expand_kernel, expand_sig, dict(expand_const, B_LOAD=0, ALIGNED=False), expand_hint,
                   dict(num_warps=4)),
        "expand_vector_b": (_expand_kernel, expand_sig, dict(expand_const, B_LOAD=2, ALIGNED=True), expand_hint,
                            dict(num_warps=4)),
        "shrink": (_shrink_kernel, shrink_sig, shrink_const, ["K", "stride_xm", "num_slots", "num_pages"],
                   dict(num_warps=4, num_stages=3)),
        "decode_attention": (_decode_split_kernel, attn_sig, attn_const,
                             ["num_heads"] + [n for n in attn_sig if n.startswith("stride")],
                             dict(num_warps=4, num_stages=2)),
    }


def compile_for(kernel, signature: dict, constexprs: dict, hinted: list, options: dict, arch: int):
    """The kernel compiled for ``arch`` (Triton's CompiledKernel, with its PTX and cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(signature)
    # pointers aligned to 16 bytes, as the launcher specialises them (a constexpr None pointer takes no hint)
    hint = [n for n in names if n.endswith("_ptr") and signature[n] != "constexpr"] + list(hinted)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in hint}
    src = ASTSource(fn=kernel, signature={**signature, **{k: "constexpr" for k in constexprs}},
                    constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def memory_ops(compiled) -> dict:
    """Counts of the PTX's global memory instructions (``ld.global.*``, ``st.global.*``, ``cp.async.*``)."""
    ptx = compiled.asm["ptx"]
    return dict(Counter(re.findall(r"(?:ld\.global|st\.global|cp\.async\.\w+\.shared\.global)[\w.]*", ptx)))


def resources(compiled) -> dict:
    """Registers a thread and spill stack bytes of the cubin (``cuobjdump -res-usage``, from Triton's wheel)."""
    import subprocess
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {out[-300:]}")
    return {"registers": int(found.group(1)), "stack": int(found.group(2))}


def main() -> None:
    kernels = _kernels()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help=f"kernels (default: all): {', '.join(kernels)}")
    p.add_argument("--arch", type=int, default=90, help="compute capability as one number (90: sm_90)")
    p.add_argument("--maxnreg", type=int, default=0, help="compile with this register cap (ptxas's maxnreg)")
    p.add_argument("--resources", action="store_true", help="also print registers a thread and spill stack bytes")
    a = p.parse_args()
    unknown = [n for n in a.names if n not in kernels]
    if unknown:
        p.error(f"unknown kernel {', '.join(unknown)}: choose from {', '.join(kernels)}")
    for name in a.names or kernels:
        kernel, signature, constexprs, hinted, options = kernels[name]
        if a.maxnreg:
            options = dict(options, maxnreg=a.maxnreg)
        compiled = compile_for(kernel, signature, constexprs, hinted, options, a.arch)
        line = f"{name:>17}: " + ", ".join(f"{op} x{n}" for op, n in sorted(memory_ops(compiled).items()))
        if a.resources:
            res = resources(compiled)
            line += f"; registers {res['registers']}, stack {res['stack']}"
        print(line)


if __name__ == "__main__":
    main()
