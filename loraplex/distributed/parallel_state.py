"""Tensor-parallel group state. Layers ask these functions when they are built and run, so tensor parallelism
changes no model code: a process joins a group with :func:`init_tensor_parallel` (torch.distributed's default
group, NCCL on GPUs, gloo on CPUs) before it builds the model; until then it is rank 0 of 1.

Under NCCL the collectives that CUDA graphs capture go over a second communicator of the same ranks (the
*graph group*), and every collective launched eagerly over the default one. NCCL's support for mixing graph
and eager launches on one communicator makes each replay of a graph holding collectives wait on the host for
the previous replay to finish (measured: 2.6 ms of host time for a replay of 2.6 ms), which serialises the
host with the device. With one communicator only ever replayed in graphs (on one stream) and the other only
ever launched eagerly, that support can be off (``NCCL_GRAPH_MIXING_SUPPORT=0``, set by the engine unless the
user set it), and a replay costs the host microseconds."""

from __future__ import annotations

import torch

_TP_RANK = 0
_TP_SIZE = 1
_GRAPH_GROUP = None  # the communicator of captured collectives (NCCL), None: the default group's


def init_tensor_parallel(rank: int, size: int, graph_group: object = None) -> None:
    """Make this process rank ``rank`` of a tensor-parallel group of ``size`` ranks: torch.distributed's
    default process group, which must already hold exactly ``size`` processes when ``size > 1``.
    ``graph_group``: a group of the same ranks for the collectives CUDA graphs capture (None: the default)."""
    global _TP_RANK, _TP_SIZE, _GRAPH_GROUP
    if not 0 <= rank < size:
        raise ValueError(f"tensor-parallel rank {rank} is outside [0, {size})")
    if size > 1:
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() != size or dist.get_rank() != rank:
            raise RuntimeError(f"tensor-parallel rank {rank} of {size} needs torch.distributed initialised with "
                               f"world size {size} and this rank")
    _TP_RANK, _TP_SIZE, _GRAPH_GROUP = rank, size, graph_group if size > 1 else None


def _group() -> object:
    """The group a collective launched now belongs to: the graph group while a CUDA graph is being captured."""
    if _GRAPH_GROUP is not None and torch.cuda.is_current_stream_capturing():
        return _GRAPH_GROUP
    return None


def get_tp_rank() -> int:
    return _TP_RANK


def get_tp_size() -> int:
    return _TP_SIZE


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the tensor-parallel group (identity on one rank)."""
    if _TP_SIZE == 1:
        return x
    torch.distributed.all_reduce(x, group=_group())
    return x


def broadcast_from_first(x: torch.Tensor) -> torch.Tensor:
    """``x`` <- rank 0's ``x``, in place (identity on one rank): the tokens rank 0 sampled, which the other ranks'
    next step reads on the device under async scheduling."""
    if _TP_SIZE == 1:
        return x
    torch.distributed.broadcast(x, src=0, group=_group())
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate shards along the last dim over the group (identity on one rank)."""
    if _TP_SIZE == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP_SIZE)]
    torch.distributed.all_gather(parts, x.contiguous(), group=_group())
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
