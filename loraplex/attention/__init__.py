"""Attention backends behind a registry (:mod:`loraplex.attention.registry`): the PyTorch reference (CPU)
and Triton kernels that read the paged KV cache in place (CUDA). Both take the flat varlen
:class:`~loraplex.attention.metadata.AttentionMetadata` defined here. Importing this package pulls no triton."""

from loraplex.attention.metadata import AttentionMetadata

__all__ = ["AttentionMetadata"]
