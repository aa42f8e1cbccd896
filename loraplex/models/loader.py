"""Build a model from a Hugging Face folder and load its safetensors weights.

Checkpoint names are mapped onto loraplex parameters through the model's
``packed_modules_mapping`` (``q_proj`` -> ``qkv_proj`` shard "q", ...); each
parameter's ``weight_loader`` copies its shard.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from safetensors import safe_open
from torch import nn

from loraplex.errors import ModelLoadError
from loraplex.models.registry import resolve_model_class

_SKIP_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")


def load_hf_config(path: str) -> Any:
    if not os.path.isdir(path):
        raise ModelLoadError(f"model folder {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelLoadError(f"model folder {path!r} has no config.json")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds here
        raise ModelLoadError(f"cannot read config.json of {path!r}: {e}") from e


def weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if files:
        return [os.path.join(path, f) for f in files]
    raise ModelLoadError(f"model folder {path!r} has no safetensors weights (pickled .bin weights are not loaded)")


class CheckpointSlice:
    """A checkpoint tensor not read yet: a rank of tensor parallelism reads only its shard of it
    (``narrow`` / ``[a:b]`` read just those rows; ``tensor()`` reads it whole). ``elements_read`` counts,
    over all instances, the elements actually read (tests)."""

    elements_read = 0

    def __init__(self, handle: Any) -> None:
        self._h = handle  # safetensors' PySafeSlice
        self.shape = torch.Size(handle.get_shape())

    def dim(self) -> int:
        return len(self.shape)

    def _read(self, index: Any) -> torch.Tensor:
        t = self._h[index]
        CheckpointSlice.elements_read += t.numel()
        return t

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * self.dim()
        index[dim] = slice(start, start + length)
        return self._read(tuple(index))

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self._read(index)

    def tensor(self) -> torch.Tensor:
        return self._read(tuple(slice(None) for _ in range(self.dim())))


def iter_weights(path: str, lazy: bool = False) -> Iterator[tuple[str, Any]]:
    """Every checkpoint tensor of the folder, by name: read whole, or as a :class:`CheckpointSlice`."""
    for file in weight_files(path):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                yield key, (CheckpointSlice(f.get_slice(key)) if lazy else f.get_tensor(key))


@contextmanager
def _default_dtype_device(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def _checkpoint_to_param(name: str, packed: dict[str, list[str]]) -> tuple[str, Any]:
    parts = name.split(".")
    for fused, subs in packed.items():
        for idx, sub in enumerate(subs):
            if sub in parts[:-1]:
                i = parts.index(sub)
                shard: Any = "qkv"[idx] if fused == "qkv_proj" else idx
                return ".".join(parts[:i] + [fused] + parts[i + 1:]), shard
    return name, None


def load_model(path: str, config: Any, dtype: torch.dtype, device: torch.device, load_format: str = "auto") -> nn.Module:
    cls = resolve_model_class(getattr(config, "architectures", None))
    with _default_dtype_device(dtype, device):
        model = cls(config)
    if load_format == "dummy":
        return _init_dummy(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = getattr(model, "packed_modules_mapping", {})
    loaded: set[str] = set()
    rename = getattr(model, "rename_checkpoint_key", None)  # VLMs: legacy checkpoint layouts -> module names
    from loraplex.distributed.parallel_state import get_tp_size
    from loraplex.layers.embedding import VocabParallelEmbedding
    from loraplex.layers.linear import LinearBase

    sharded = (LinearBase, VocabParallelEmbedding)  # their loaders read a rank's shard of a CheckpointSlice
    lazy = get_tp_size() > 1
    for ckpt_name, tensor in iter_weights(path, lazy=lazy):
        if rename is not None:
            ckpt_name = rename(ckpt_name)
        if ckpt_name.endswith(_SKIP_SUFFIXES):
            continue
        if ckpt_name == "lm_head.weight" and getattr(model, "tied_embeddings", False):
            continue
        pname, shard = _checkpoint_to_param(ckpt_name, packed)
        param = params.get(pname)
        if param is None:
            raise ModelLoadError(f"checkpoint tensor {ckpt_name!r} in {path!r} has no matching parameter "
                                 f"in {cls.__name__}")
        loader = getattr(param, "weight_loader", None)
        if isinstance(tensor, CheckpointSlice):
            if not isinstance(getattr(loader, "__self__", None), sharded):
                tensor = tensor.tensor().to(dtype=dtype)  # replicated: read whole
            # else the loader reads its rows, and copying them into the parameter casts the dtype
        else:
            tensor = tensor.to(dtype=dtype)
        try:
            if loader is None:
                if tensor.shape != param.shape:
                    raise ValueError(f"shape mismatch: checkpoint {tuple(tensor.shape)} vs parameter {tuple(param.shape)}")
                param.data.copy_(tensor)
            elif shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard)
        except ValueError as e:
            raise ModelLoadError(f"checkpoint tensor {ckpt_name!r} in {path!r}: {e}") from e
        loaded.add(pname)
    missing = sorted(n for n in params if n not in loaded and not _tied_alias(model, n))
    if missing:
        raise ModelLoadError(f"model folder {path!r} lacks weights for: {', '.join(missing[:8])}"
                             + (" ..." if len(missing) > 8 else ""))
    return model.eval()


@torch.no_grad()
def _init_dummy(model: nn.Module) -> nn.Module:
    """Random weights (normal, std 0.02; norms at one) for timing runs without a checkpoint."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        if p.dim() == 1 and "norm" in name:
            p.fill_(1.0)
            continue
        gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(0))
        p.copy_(torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32).mul_(0.02))
    return model.eval()


def _tied_alias(model: nn.Module, name: str) -> bool:
    return name == "lm_head.weight" and getattr(model, "tied_embeddings", False)
