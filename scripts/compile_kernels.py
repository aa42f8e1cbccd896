"""Compile Triton kernel variants for an NVIDIA target without a GPU, and report those that fail.

The CPU tests run the kernels in Triton's interpreter, which never compiles them: a variant that the
compiler rejects (an operation a dtype does not support, a branch that types a pointer otherwise) passes
there and fails on the GPU. ``tests/conftest.py`` records the signature of every launch the test session
makes; this script compiles each recorded variant for ``--arch`` (default sm_90, the H200's) in a process
without the interpreter, and checks that its shared memory fits the card.

    python scripts/compile_kernels.py variants.json            # a file written by the test session
    python scripts/compile_kernels.py variants.json --arch 80  # an A100

Each variant is ``{"module", "kernel", "signature": {arg: type}, "constexprs": {arg: value},
"options": {...}}``; the types are Triton's (``*bf16``, ``i32``, ``fp32``, ``constexpr``). Prints one line per
failure and exits 1 if any failed. Do not set ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

# the most dynamic shared memory a block may take: sm_90 227 KB, sm_80 163 KB, sm_89 99 KB
SHARED_LIMIT = {90: 232448, 80: 166912, 89: 101376, 86: 101376}


def compile_variant(v: dict, arch: int) -> dict:
    """Compiles one variant (pointers hinted aligned, as the launcher specialises them); returns its shared
    memory in bytes."""
    from ptx_loads import compile_for

    kernel = getattr(importlib.import_module(v["module"]), v["kernel"])
    compiled = compile_for(kernel, v["signature"], v["constexprs"], [], v["options"], arch)
    return {"shared": compiled.metadata.shared}


def _check(job: tuple[dict, int]) -> str:
    """One variant's failure as a line, or "" if it compiled and fits (run in a worker process)."""
    v, arch = job
    name = f"{v['module']}.{v['kernel']} {v['constexprs']} {v['options']}"
    try:
        meta = compile_variant(v, arch)
    except Exception as e:  # the compiler's error names the line of the kernel
        return f"FAILED {name}: {type(e).__name__}: {str(e).strip()[-600:]}"
    limit = SHARED_LIMIT.get(arch, 101376)
    if meta["shared"] > limit:
        return f"FAILED {name}: {meta['shared']} bytes of shared memory, more than sm_{arch}'s {limit}"
    return ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", help="JSON list of variants")
    p.add_argument("--arch", type=int, default=90, help="compute capability as one number (90: sm_90)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: one a core)")
    a = p.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("unset TRITON_INTERPRET: the interpreter does not compile")
    variants = json.loads(Path(a.variants).read_text())
    jobs = [(v, a.arch) for v in variants]
    if a.jobs > 1 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=a.jobs) as ex:
            results = list(ex.map(_check, jobs, chunksize=4))
    else:
        results = [_check(j) for j in jobs]
    failures = [r for r in results if r]
    for line in failures:
        print(line)
    failed = len(failures)
    print(f"{len(variants) - failed} of {len(variants)} variants compiled for sm_{a.arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
