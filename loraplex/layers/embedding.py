"""Vocabulary-parallel input embedding and output head.

The vocabulary is padded to a multiple of ``PAD_TO`` so that shards and kernels
see aligned sizes. ``num_embeddings`` is the padded size, ``org_vocab_size`` the
model's real vocabulary: ids in ``[org_vocab_size, num_embeddings)`` are padding
and never produced by the sampler. Multimodal code reads ``num_embeddings`` to
tell text ids from image placeholders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.distributed.parallel_state import all_gather_last_dim, all_reduce, get_tp_rank, get_tp_size

PAD_TO = 64


def pad_vocab(vocab_size: int, pad_to: int = PAD_TO) -> int:
    return (vocab_size + pad_to - 1) // pad_to * pad_to


class VocabParallelEmbedding(nn.Module):
    """Embedding table sharded along the (padded) vocabulary."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_size()
        self.org_vocab_size = num_embeddings
        self.num_embeddings = pad_vocab(num_embeddings, PAD_TO * self.tp_size)
        self.embedding_dim = embedding_dim
        self.num_embeddings_per_partition = self.num_embeddings // self.tp_size
        self.vocab_start_index = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.weight = nn.Parameter(torch.zeros(self.num_embeddings_per_partition, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if loaded.shape[0] != self.org_vocab_size or loaded.shape[1] != self.embedding_dim:
            raise ValueError(f"shape mismatch: checkpoint {tuple(loaded.shape)} vs "
                             f"({self.org_vocab_size}, {self.embedding_dim})")
        start = self.vocab_start_index
        end = min(self.vocab_end_index, self.org_vocab_size)
        param.data.zero_()
        if end > start:
            param.data[: end - start].copy_(loaded[start:end])

    def local_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(each id's row in this rank's shard, 0 for ids outside it; whether the id is in the shard)."""
        mask = (ids >= self.vocab_start_index) & (ids < self.vocab_end_index)
        return torch.where(mask, ids - self.vocab_start_index, torch.zeros_like(ids)), mask

    def partial(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's part of the lookup: the rows of ids in its shard, zero elsewhere (the all-reduce of
        every rank's part is the embedding)."""
        local, mask = self.local_ids(ids)
        return F.embedding(local, self.weight) * mask.unsqueeze(-1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        return all_reduce(self.partial(ids))

    def extra_repr(self) -> str:
        return f"org_vocab_size={self.org_vocab_size}, num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}"


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection ``hidden -> padded vocab`` sharing the embedding's
    layout; ``tie_to`` shares the weight with an input embedding."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False) -> None:
        super().__init__(num_embeddings, embedding_dim)
        if bias:
            raise ValueError("lm_head bias is not supported by any loraplex model")
        self.bias = None

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (tokens, hidden) -> (tokens, num_embeddings)
        logits = F.linear(hidden, self.weight)
        return all_gather_last_dim(logits)
