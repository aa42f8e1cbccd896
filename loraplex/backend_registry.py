"""What the LoRA and attention backend registries share: which backend ``auto`` means on a device, and
loading a backend by name with a lazy import (so ``import loraplex`` pulls no triton)."""

from __future__ import annotations

import importlib
import os
from typing import Any, Optional

import torch


def triton_usable(device: Optional[torch.device]) -> bool:
    """True when a Triton backend can run on ``device``: CUDA with triton importable (or CPU with
    ``TRITON_INTERPRET=1``, for tests)."""
    if device is None:
        return False
    device = torch.device(device)
    if device.type != "cuda" and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_auto(name: str, device: Optional[torch.device] = None) -> str:
    """``auto`` -> ``triton`` on CUDA when triton imports, else ``torch``; other names unchanged."""
    if name != "auto":
        return name
    cuda = device is not None and torch.device(device).type == "cuda"
    return "triton" if cuda and triton_usable(device) else "torch"


def load_backend(what: str, option: str, name: str, backends: dict[str, tuple[str, str]],
                 device: Optional[torch.device] = None) -> Any:
    """An instance of the backend registered as ``name`` in ``backends`` (name -> (module, class)).
    ``what`` names the kind in errors ("LoRA backend"), ``option`` the setting that chose it."""
    names = (*backends, "auto")
    if name not in names:
        raise ValueError(f"unknown {what} {name!r}; available: {sorted(names)}")
    name = resolve_auto(name, device)
    if name == "triton" and device is not None and not triton_usable(device):
        raise ValueError(f"{option}='triton' cannot run on device {str(device)!r}: it needs a CUDA device and the "
                         "triton package (on CPU only for tests, with TRITON_INTERPRET=1 set before triton is "
                         f"imported); use {option}='torch' or 'auto'")
    module, cls = backends[name]
    return getattr(importlib.import_module(module), cls)()
