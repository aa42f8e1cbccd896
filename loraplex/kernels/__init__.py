"""Triton kernels, each a thin Python launcher with a one-line semantics docstring and a pure-PyTorch
reference beside it (in :mod:`loraplex.lora.backends.torch_backend`). Import a kernel module only where
triton is wanted: ``import loraplex`` never imports triton."""
