"""Linear layers with tensor-parallel sharding owned by the layer.

Each parameter carries a ``weight_loader(param, loaded_weight, shard_id=None)``
that copies this rank's shard of a checkpoint tensor. Column-parallel layers
split the output dim, row-parallel layers the input dim (and all-reduce).
Fused projections (qkv, gate_up) are concatenations along the output dim and
expose ``output_slices``: the per-rank sizes of their parts, in order.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.distributed.parallel_state import all_reduce, get_tp_rank, get_tp_size


def _divide(a: int, b: int) -> int:
    if a % b:
        raise ValueError(f"{a} is not divisible by tensor-parallel size {b}")
    return a // b


class LinearBase(nn.Module):
    """y = x @ W.T (+ b). ``input_size``/``output_size`` are the full (unsharded) sizes."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp_dim: Optional[int],
                 in_local: int, out_local: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.tp_dim = tp_dim  # 0: output sharded, 1: input sharded, None: replicated
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_size()
        self.input_size_per_partition = in_local
        self.output_size_per_partition = out_local
        self.weight = nn.Parameter(torch.empty(out_local, in_local), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_local), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    @property
    def output_slices(self) -> tuple[int, ...]:
        return (self.output_size_per_partition,)

    def _shard(self, param: nn.Parameter, w: torch.Tensor) -> torch.Tensor:
        dim = self.tp_dim
        if dim is None or self.tp_size == 1 or (dim == 1 and w.dim() == 1):
            return w
        size = param.shape[dim]
        return w.narrow(dim, self.tp_rank * size, size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """Copy this rank's shard of ``loaded`` (a tensor, or a CheckpointSlice read only for those rows)."""
        loaded = self._shard(param, loaded)
        if loaded.shape != param.shape:
            raise ValueError(f"shape mismatch: checkpoint {tuple(loaded.shape)} vs parameter {tuple(param.shape)}")
        param.data.copy_(loaded if isinstance(loaded, torch.Tensor) else loaded.tensor())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__(input_size, output_size, bias, None, input_size, output_size)


class ColumnParallelLinear(LinearBase):
    """Output dim sharded; with ``gather_output`` the full output is returned."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, gather_output: bool = False) -> None:
        tp = get_tp_size()
        super().__init__(input_size, output_size, bias, 0, input_size, _divide(output_size, tp))
        self.gather_output = gather_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output and self.tp_size > 1:
            from loraplex.distributed.parallel_state import all_gather_last_dim
            y = all_gather_last_dim(y)
        return y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input concatenated
    (e.g. gate_up); checkpoint tensors are loaded with ``shard_id`` = index."""

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = False) -> None:
        super().__init__(input_size, sum(output_sizes), bias)
        self.output_sizes = list(output_sizes)

    @property
    def output_slices(self) -> tuple[int, ...]:
        return tuple(_divide(s, self.tp_size) for s in self.output_sizes)

    def shard_rows(self, shard_id: int) -> tuple[int, int]:
        """(first row, rows) of this rank's part of output slice ``shard_id``, in the slice's full
        (checkpoint) rows. The one rule for the base weight and for LoRA B."""
        size = self.output_slices[shard_id]
        return self.tp_rank * size, size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Optional[int] = None) -> None:
        if shard_id is None:
            return super().weight_loader(param, loaded)
        sizes = self.output_slices
        offset = sum(sizes[:shard_id])
        start, size = self.shard_rows(shard_id)
        loaded = loaded.narrow(0, start, size)
        target = param.data.narrow(0, offset, size)
        if loaded.shape != target.shape:
            raise ValueError(f"shape mismatch for shard {shard_id}: checkpoint {tuple(loaded.shape)} "
                             f"vs parameter slice {tuple(target.shape)}")
        target.copy_(loaded)


class QKVParallelLinear(MergedColumnParallelLinear):
    """Fused q/k/v projection; ``shard_id`` is "q", "k" or "v". KV heads are
    replicated across ranks when there are fewer of them than ranks."""

    _SHARDS = {"q": 0, "k": 1, "v": 2}

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False) -> None:
        tp = get_tp_size()
        self.head_dim = head_dim
        self.total_num_heads = num_heads
        self.total_num_kv_heads = num_kv_heads
        self.num_heads = _divide(num_heads, tp)
        self.num_kv_heads = max(1, num_kv_heads // tp)
        kv_rep = max(1, tp // num_kv_heads)
        super().__init__(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim * kv_rep,
                                       num_kv_heads * head_dim * kv_rep], bias)

    @property
    def checkpoint_output_sizes(self) -> list[int]:
        """Rows of q, k and v in the checkpoint (kv heads counted once, not per replica)."""
        hd = self.head_dim
        return [self.total_num_heads * hd, self.total_num_kv_heads * hd, self.total_num_kv_heads * hd]

    def shard_rows(self, shard_id: int) -> tuple[int, int]:
        if shard_id == 0 or self.tp_size <= self.total_num_kv_heads:
            return super().shard_rows(shard_id)
        # More ranks than kv heads: each kv head is replicated; rank r takes kv head r // replicas.
        size = self.output_slices[shard_id]
        return self.tp_rank // (self.tp_size // self.total_num_kv_heads) * size, size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Union[str, int, None] = None) -> None:
        if isinstance(shard_id, str):
            shard_id = self._SHARDS[shard_id]
        return super().weight_loader(param, loaded, shard_id)


class RowParallelLinear(LinearBase):
    """Input dim sharded; partial outputs are summed across ranks, bias added once."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        tp = get_tp_size()
        super().__init__(input_size, output_size, bias, 1, _divide(input_size, tp), output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.linear(x, self.weight, self.bias)
        y = all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias
