"""Tensor-parallel group state. Layers ask these functions when they are built and run, so tensor parallelism
changes no model code: a process joins a group with :func:`init_tensor_parallel` (torch.distributed's default
group, NCCL on GPUs, gloo on CPUs) before it builds the model; until then it is rank 0 of 1."""

from __future__ import annotations

import torch

_TP_RANK = 0
_TP_SIZE = 1


def init_tensor_parallel(rank: int, size: int) -> None:
    """Make this process rank ``rank`` of a tensor-parallel group of ``size`` ranks: torch.distributed's
    default process group, which must already hold exactly ``size`` processes when ``size > 1``."""
    global _TP_RANK, _TP_SIZE
    if not 0 <= rank < size:
        raise ValueError(f"tensor-parallel rank {rank} is outside [0, {size})")
    if size > 1:
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() != size or dist.get_rank() != rank:
            raise RuntimeError(f"tensor-parallel rank {rank} of {size} needs torch.distributed initialised with "
                               f"world size {size} and this rank")
    _TP_RANK, _TP_SIZE = rank, size


def get_tp_rank() -> int:
    return _TP_RANK


def get_tp_size() -> int:
    return _TP_SIZE


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the tensor-parallel group (identity on one rank)."""
    if _TP_SIZE == 1:
        return x
    torch.distributed.all_reduce(x)
    return x


def broadcast_from_first(x: torch.Tensor) -> torch.Tensor:
    """``x`` <- rank 0's ``x``, in place (identity on one rank): the tokens rank 0 sampled, which the other ranks'
    next step reads on the device under async scheduling."""
    if _TP_SIZE == 1:
        return x
    torch.distributed.broadcast(x, src=0)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate shards along the last dim over the group (identity on one rank)."""
    if _TP_SIZE == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP_SIZE)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def min_over_ranks(value: int) -> int:
    """The smallest ``value`` any rank of the group holds (the value itself on one rank)."""
    if _TP_SIZE == 1:
        return value
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
