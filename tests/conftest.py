"""Shared pytest setup: tests import ``helpers`` from this folder; GPU tests run only where CUDA is."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on CPU; triton reads this when a kernel module is imported,
    # so it is set before any test module imports loraplex.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] == "1":
        from helpers import record_kernel_launches

        record_kernel_launches()  # what the kernels launched: tests/test_kernel_compile.py compiles each for sm_90


def pytest_collection_modifyitems(config, items) -> None:
    # the compile check of every kernel variant the session launched runs after every other test
    items.sort(key=lambda item: getattr(item.module, "__name__", "") == "test_kernel_compile")
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
