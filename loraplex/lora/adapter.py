"""Read and validate a PEFT LoRA adapter folder against a base model.

    spec = AdapterTargetSpec(...)            # built by the model runner from the live model
    adapter = load_adapter(name, path, spec, max_lora_rank, root=None)   # -> LoRAAdapter, or raises AdapterError

Only ``adapter_config.json`` + ``adapter_model.safetensors`` are read; pickled weights are refused, never unpickled.
With ``root`` set, the folder and each file, checked as it is opened, must resolve (symlinks followed) inside the
resolved ``root``; a file that resolves outside it (a symlink leaving the root) raises ``AdapterError``.
Which modules the adapter adapts follows PEFT's own matching (see ``peft_config.py``): tensors of modules that PEFT
would not have wrapped (excluded by ``exclude_modules`` / ``layers_to_transform`` / ``modules_to_save``, or not
targeted) are ignored, as ``PeftModel.from_pretrained`` ignores them. Tensors of modules the model lacks, shapes that
do not fit, ranks that disagree with the config, non-finite values and LoRA variants loraplex does not compute
(DoRA, LoRA bias, trainable tokens, trained full-module copies, resized vocabularies, ...) raise ``AdapterError``.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from loraplex.errors import AdapterError
from loraplex.lora.peft_config import PeftLoraConfig, leaf, parse_lora_config

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")
_PREFIX = "base_model.model."
_LORA_PARTS = {"lora_A": "A", "lora_B": "B", "lora_embedding_A": "A", "lora_embedding_B": "B"}
_MAGNITUDE = "lora_magnitude_vector"  # DoRA: one magnitude per output channel (embedding: per hidden dim)
_TOKENS = "token_adapter"  # trainable tokens: <module>.token_adapter.trainable_tokens_delta [n, hidden]
_UNSUPPORTED_MARKERS = {
    "trainable_tokens_delta": "trainable tokens (trainable_tokens_delta)",
}
_COPY_MARKERS = ("base_layer", "modules_to_save", "original_module")

_adapter_ids = itertools.count(1)


@dataclass(frozen=True)
class ModuleTarget:
    """One module of the base model that LoRA may target, under its Hugging Face
    (unfused) name, e.g. ``model.layers.0.self_attn.q_proj``, ``lm_head``,
    ``model.embed_tokens``."""

    name: str
    kind: str  # "linear" | "embedding"
    in_features: int  # embedding: the vocabulary size (org_vocab_size, unpadded)
    out_features: int  # embedding: embedding_dim


@dataclass
class AdapterTargetSpec:
    """What the base model offers to adapters."""

    modules: dict[str, ModuleTarget]
    # fused leaf name -> the unfused leaf names it concatenates along the output dim,
    # e.g. {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    packed_modules_mapping: dict[str, list[str]]
    num_layers: int
    vocab_size: int
    # Full base weight of a module by HF name ("model.embed_tokens", "lm_head"), used to accept
    # the copies PEFT saves beside embedding/head LoRA; None where not available.
    # (this rank's part of the base weight, the cut of a full tensor to that part), or None
    base_weight: Callable[[str], Optional[tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]] = (
        lambda name: None)


@dataclass
class LoRAWeights:
    """One module's LoRA, in PEFT's orientation. Linear: A ``[r, in]``, B ``[out, r]``.
    Embedding: A ``[r, vocab]``, B ``[hidden, r]``. Output delta = ``B @ A @ x * scaling``."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    # DoRA: the learned magnitude of each output channel (embedding: of each hidden dim), or None
    magnitude: Optional[torch.Tensor] = None
    # lora_bias: B's bias [out] (the delta is (B A x + bias) * scaling), or None
    bias: Optional[torch.Tensor] = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass
class LoRAAdapter:
    """A validated adapter, weights in host memory (float32; on CUDA engines, pinned and in the model's dtype
    once :meth:`LoRAModel.stage` has run), keyed by HF module name."""

    name: str
    path: str
    modules: dict[str, LoRAWeights]
    config: dict
    uid: int = field(default_factory=lambda: next(_adapter_ids))  # unique per load (cache keys, versions)
    # trainable tokens: HF module name ("model.embed_tokens", "lm_head") -> (token ids [n] int64, their new
    # rows [n, hidden] float32), which replace those rows of that table for this adapter's requests
    tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # modules_to_save: HF module name ("model.embed_tokens", "lm_head") -> the adapter's own trained table
    # [vocab, hidden] float32, used instead of the base one for this adapter's requests
    saved: dict[str, torch.Tensor] = field(default_factory=dict)
    # SHA-256 of the weights and the config: what the KV computed under this adapter depends on (prefix
    # caching shares blocks between adapters of equal content, and never across versions of different content)
    content_hash: bytes = b""
    # added tokens: the adapter's vocabulary size when its tables extend the base one (None: the base's); its
    # folder then holds its tokenizer (``tokenizer``, loaded by the pool)
    vocab_size: Optional[int] = None
    tokenizer: Any = None
    # tensor keys present in the file but skipped because PEFT would not have adapted their module
    ignored_keys: tuple[str, ...] = ()
    # (device, inode, size, mtime in ns) of the config and weights files as read: a re-read that finds them
    # unchanged keeps ``content_hash`` instead of hashing the weights again (``load_adapter``'s ``known``)
    source_stat: tuple = ()
    # (description, flat buffer) once LoRAModel.stage has packed the weights into one buffer (lora/packing.py),
    # the tensors above being views of it; None before
    packed: Any = field(default=None, repr=False, compare=False)
    # (LoRAModel, its SlotPlan or None) once that model has planned the adapter's slot loads (lora/slot_plan.py)
    slot_plan: Any = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def max_rank(self) -> int:
        return max((w.rank for w in self.modules.values()), default=0)

    @functools.cached_property
    def has_lora_bias(self) -> bool:
        return any(w.bias is not None for w in self.modules.values())

    @property
    def version(self) -> str:
        """The first 12 hex digits of the content hash: what ``name@version`` names."""
        return self.content_hash.hex()[:12]

    @functools.cached_property
    def has_dora(self) -> bool:
        return any(w.magnitude is not None for w in self.modules.values())


def load_adapter(name: str, path: str, spec: AdapterTargetSpec, max_lora_rank: int,
                 root: Optional[str] = None, known: Optional[tuple[tuple, bytes]] = None) -> LoRAAdapter:
    """Read the PEFT folder ``path``, validate it against ``spec`` and return its LoRA weights (A and B in the
    checkpoint's dtype; DoRA magnitudes, LoRA biases, trainable-token rows and trained tables in float32).

    ``root``: when given, the folder and every file read from it must resolve (``os.path.realpath``) inside
    ``realpath(root)``; symlinks that stay inside the root are followed. Each file is checked as it is opened,
    and the resolved path is what is opened, so a symlink swapped in after an earlier check is still caught.

    ``known``: (``source_stat``, ``content_hash``) of an earlier read of this folder. When the files are the
    same ones, unmodified (device, inode, size and modification time, taken after reading them), the content
    hash is kept rather than computed again, and the finiteness check is not repeated: a re-read after
    host-memory eviction then costs a tenth of a first read (8B shape, q/v at rank 64, 52 MB: 3.4 ms against
    42 ms on a 2-core VM). Shapes and the config are validated again. A file rewritten in place gets a new
    modification time, and a replaced one a new inode, so its content is hashed.

    Raises ``AdapterError`` naming the adapter, file, tensor key and expected vs actual shape on any problem.
    """
    where = f"adapter {name!r} ({path})"
    cfg = _read_config(where, path, root)
    wfile = f"{where}: {WEIGHTS_FILE}"
    weights_path = _confined(where, os.path.join(path, WEIGHTS_FILE), root)
    tensors = _read_tensors(wfile, weights_path)
    source_stat = _stat_key(_confined(where, os.path.join(path, CONFIG_FILE), root), weights_path)
    unchanged = known is not None and bool(source_stat) and known[0] == source_stat
    if not unchanged:  # the same files, unmodified, passed this check when they were first read
        _check_finite(wfile, tensors)
    candidates = _candidates(spec)
    missing = cfg.unmatched_targets(list(candidates))
    if missing:
        have = sorted({leaf(n) for n in candidates})
        raise AdapterError(f"{where}: {CONFIG_FILE}: target module {missing[0]!r} not found in model; "
                           f"model has: {', '.join(have)}")

    pairs = _group_lora_tensors(wfile, tensors, spec, cfg)
    tokens = _trainable_tokens(wfile, pairs, spec, cfg)
    saved = {m: slot.pop("S")[1] for m, slot in pairs.items() if "S" in slot}
    vocab_size = _extended_vocab(where, path, root, saved, spec)
    for module in saved:  # (LoRA tensors of a module saved whole are ignored below, as PEFT ignores them)
        if module in tokens:
            raise AdapterError(f"{wfile}: module {module!r} is saved whole (modules_to_save) and also has "
                               "trainable tokens")
    modules: dict[str, LoRAWeights] = {}
    ignored: list[str] = []
    for module in sorted(pairs):
        slot = pairs[module]
        if not slot:
            continue
        keys = [k for k, _, _ in slot.values()]
        cand = candidates.get(module)
        if cand is None:
            raise AdapterError(f"{wfile}: tensor {keys[0]!r} is for module {module!r}, which the model does not have")
        target, parts = cand
        if not cfg.is_targeted(module, target.kind == "linear", _is_output_head(target.name)):
            ignored.extend(keys)
            continue
        weights = _validate_pair(wfile, module, slot, target, cfg, max_lora_rank, where)
        for part_name, part in (_split_fused(wfile, slot["B"][0], weights, parts) if parts else [(module, weights)]):
            if part_name in modules:
                raise AdapterError(f"{wfile}: module {part_name!r} gets LoRA twice (fused and unfused keys)")
            modules[part_name] = part
    if ignored:
        logger.warning("%s: ignoring %d tensor(s) of modules PEFT would not adapt (exclude_modules, "
                       "layers_to_transform, modules_to_save or not targeted): %s", where, len(ignored), ignored[:4])
    content_hash = known[1] if unchanged else _content_hash(cfg.raw, tensors)
    return LoRAAdapter(name=name, path=path, modules=modules, config=cfg.raw, ignored_keys=tuple(ignored),
                       tokens=tokens, saved=saved, content_hash=content_hash, vocab_size=vocab_size,
                       source_stat=source_stat)


def _stat_key(*files: str) -> tuple:
    """(device, inode, size, modification time in ns) of each file; () when one cannot be stat'ed."""
    try:
        stats = [os.stat(f) for f in files]
    except OSError:
        return ()
    return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


def _confined(where: str, file: str, root: Optional[str], what: Optional[str] = None) -> str:
    """The path to open for ``file``: ``file`` itself without a ``root``; with one, ``file`` resolved, which must
    lie inside the resolved ``root`` (``AdapterError`` naming the adapter and file otherwise)."""
    if root is None:
        return file
    real_root, real = os.path.realpath(root), os.path.realpath(file)
    try:
        inside = os.path.commonpath([real_root, real]) == real_root
    except ValueError:  # different drives (Windows)
        inside = False
    if not inside:
        raise AdapterError(f"{where}: {what or os.path.basename(file)} resolves outside the allowed root "
                           "(a symlink leaving the root?); adapter files must resolve inside it")
    return real


def _read_config(where: str, path: str, root: Optional[str] = None) -> PeftLoraConfig:
    path = _confined(where, path, root, what="the adapter folder")  # before any existence check: no probing
    if not os.path.isdir(path):
        raise AdapterError(f"{where}: adapter folder does not exist" if not os.path.exists(path)
                           else f"{where}: not a folder")
    names = set(os.listdir(path))
    cfile = os.path.join(path, CONFIG_FILE)
    if CONFIG_FILE not in names:
        raise AdapterError(f"{where}: missing {CONFIG_FILE}")
    if WEIGHTS_FILE not in names:
        pickled = sorted(names.intersection(_PICKLE_FILES))
        if pickled:
            raise AdapterError(f"{where}: only pickled weights ({', '.join(pickled)}) found; pickled weights are "
                               f"refused and never unpickled - convert the adapter to {WEIGHTS_FILE}")
        raise AdapterError(f"{where}: missing {WEIGHTS_FILE}")
    cfile = _confined(where, cfile, root)
    try:
        with open(cfile, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AdapterError(f"{where}: {CONFIG_FILE} is not valid JSON: {exc}") from None
    return parse_lora_config(raw, f"{where}: {CONFIG_FILE}")


def _read_tensors(wfile: str, file: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as exc:  # safetensors raises its own error types for truncated / corrupt headers
        raise AdapterError(f"{wfile}: cannot read safetensors file: {exc}") from None
    if not tensors:
        raise AdapterError(f"{wfile}: the file holds no tensors")
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise AdapterError(f"{wfile}: tensor {key!r} has dtype {tensor.dtype}; expected a floating-point dtype")
    return tensors


def _check_finite(wfile: str, tensors: dict[str, torch.Tensor]) -> None:
    for key, tensor in tensors.items():
        # one float32 reduction: NaN and Inf reach the sum; only a sum that overflows needs the elementwise check
        if not math.isfinite(float(tensor.sum(dtype=torch.float32))) and not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"{wfile}: tensor {key!r} contains NaN or Inf values")


def _group_lora_tensors(wfile: str, tensors: dict[str, torch.Tensor], spec: AdapterTargetSpec,
                        cfg: PeftLoraConfig) -> dict[str, dict[str, tuple[str, torch.Tensor, bool]]]:
    """module -> {part: (key, tensor, is_embedding_key)}, parts "A", "B" (LoRA), "M" (DoRA magnitude), "b" (LoRA
    bias), "T" (trainable tokens), "S" (a trained saved table); unchanged base copies are checked and dropped."""
    pairs: dict[str, dict[str, tuple[str, torch.Tensor, bool]]] = {}
    for key, tensor in tensors.items():
        module, marker, rest = _split_key(key)
        if marker == _MAGNITUDE:
            if rest not in ([], ["weight"]):
                raise AdapterError(f"{wfile}: unrecognised tensor key {key!r}")
            if not cfg.use_dora:
                raise AdapterError(f"{wfile}: tensor {key!r} is a DoRA magnitude, but {CONFIG_FILE} does not set "
                                   "use_dora")
            _put(wfile, pairs, module, "M", key, tensor)
            continue
        if marker == _TOKENS:
            if rest != ["trainable_tokens_delta"]:
                raise AdapterError(f"{wfile}: unrecognised tensor key {key!r}")
            _put(wfile, pairs, module, "T", key, tensor)
            continue
        if marker in _UNSUPPORTED_MARKERS:
            raise AdapterError(f"{wfile}: tensor {key!r}: unsupported PEFT feature {_UNSUPPORTED_MARKERS[marker]}")
        if marker in _LORA_PARTS:
            is_emb = marker.startswith("lora_embedding")
            if rest and rest[-1] == "bias":
                if marker != "lora_B" or len(rest) not in (1, 2):
                    raise AdapterError(f"{wfile}: unrecognised tensor key {key!r}")
                if not cfg.lora_bias:
                    raise AdapterError(f"{wfile}: tensor {key!r} is a LoRA bias, but {CONFIG_FILE} does not set "
                                       "lora_bias")
                _put(wfile, pairs, module, "b", key, tensor)
                continue
            # "weight" or "<adapter>.weight" for linear; nothing or "<adapter>" for embedding
            bad = len(rest) > 1 if is_emb else (len(rest) not in (1, 2) or rest[-1] != "weight")
            if bad:
                raise AdapterError(f"{wfile}: unrecognised tensor key {key!r}")
            _put(wfile, pairs, module, _LORA_PARTS[marker], key, tensor, is_emb)
        else:
            own = _check_copy(wfile, key, module, rest, tensor, spec, cfg)
            # a trained table is the adapter's own: the modules_to_save copy first, else the saved embedding
            # layer; PEFT's untouched original beside them is not
            if own is not None and ".original_module." not in key:
                slot = pairs.setdefault(module, {})
                if "S" not in slot or ".modules_to_save." in key:
                    slot["S"] = (key, own, False)
    return pairs


def _put(wfile: str, pairs: dict, module: str, part: str, key: str, tensor: torch.Tensor,
         is_emb: bool = False) -> None:
    """``pairs[module][part] = (key, tensor, is_emb)``; a second tensor for the same part is an error."""
    slot = pairs.setdefault(module, {})
    if part in slot:
        raise AdapterError(f"{wfile}: tensor {key!r} duplicates {slot[part][0]!r}")
    slot[part] = (key, tensor, is_emb)


def _trainable_tokens(wfile: str, pairs: dict, spec: AdapterTargetSpec,
                      cfg: PeftLoraConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Take the trainable-token tensors out of ``pairs`` and match them with ``trainable_token_indices``:
    module -> (token ids, new rows). Each configured module needs its tensor and the reverse; ids must lie in
    the vocabulary, once each; rows are ``[len(ids), hidden]``; a module cannot also carry LoRA."""
    found = {m: slot.pop("T") for m, slot in pairs.items() if "T" in slot}
    tti = cfg.trainable_token_indices
    if tti is None:
        if found:
            key = next(iter(found.values()))[0]
            raise AdapterError(f"{wfile}: tensor {key!r} holds trainable tokens, but {CONFIG_FILE} has no "
                               "trainable_token_indices")
        return {}
    embed = next((n for n, t in spec.modules.items() if t.kind == "embedding"), None)
    configured = {embed: tti} if isinstance(tti, list) else {}
    if isinstance(tti, dict):
        for name, ids in tti.items():
            match = [m for m in spec.modules if m == name or m.endswith("." + name)]
            if len(match) != 1 or (spec.modules[match[0]].kind != "embedding" and not _is_output_head(match[0])):
                raise AdapterError(f"{wfile}: {CONFIG_FILE}: trainable_token_indices names {name!r}, which is not "
                                   "the model's input embedding or output head")
            configured[match[0]] = ids
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, ids in configured.items():
        if module not in found:
            raise AdapterError(f"{wfile}: {CONFIG_FILE} gives trainable tokens for {module!r}, but there is no "
                               f"{module}.token_adapter.trainable_tokens_delta tensor")
        key, rows, _ = found.pop(module)
        target = spec.modules[module]
        vocab = target.in_features if target.kind == "embedding" else target.out_features
        hidden = target.out_features if target.kind == "embedding" else target.in_features
        if len(set(ids)) != len(ids) or max(ids) >= vocab:
            raise AdapterError(f"{wfile}: {CONFIG_FILE}: trainable_token_indices for {module!r} must be distinct "
                               f"token ids below the vocabulary size {vocab}, got {ids!r}")
        if rows.dim() != 2 or tuple(rows.shape) != (len(ids), hidden):
            raise AdapterError(f"{wfile}: tensor {key!r} has shape {tuple(rows.shape)}, expected "
                               f"({len(ids)}, {hidden}): one row per trainable token")
        if pairs.get(module):
            raise AdapterError(f"{wfile}: module {module!r} has both LoRA and trainable tokens")
        out[module] = (torch.tensor(ids, dtype=torch.int64), rows.float().contiguous())
    if found:
        module, (key, _, _) = next(iter(found.items()))
        raise AdapterError(f"{wfile}: tensor {key!r} holds trainable tokens for {module!r}, which "
                           f"trainable_token_indices in {CONFIG_FILE} does not name")
    return out


# the files of a tokenizer saved beside an adapter (one that adds tokens must carry its own)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def _extended_vocab(where: str, path: str, root: Optional[str], saved: dict[str, torch.Tensor],
                    spec: AdapterTargetSpec) -> Optional[int]:
    """The adapter's vocabulary size when its saved tables extend the base vocabulary (added tokens), else
    None. Both tables must be saved, with equal rows, and the folder must hold the tokenizer."""
    rows = {m: t.shape[0] for m, t in saved.items()}
    base = {m: spec.modules[m].in_features if spec.modules[m].kind == "embedding" else spec.modules[m].out_features
            for m in saved}
    if all(rows[m] == base[m] for m in saved):
        return None
    kinds = {("embedding" if spec.modules[m].kind == "embedding" else "head"): rows[m] for m in saved}
    if set(kinds) != {"embedding", "head"} or kinds["embedding"] != kinds["head"]:
        raise AdapterError(f"{where}: its vocabulary is resized ({', '.join(f'{m}: {r} rows' for m, r in rows.items())}, "
                           f"base {max(base.values())}): an adapter that adds tokens must save both embed_tokens and "
                           "lm_head, with the same number of rows")
    folder = _confined(where, path, root, what="the adapter folder")
    for f in TOKENIZER_FILES:  # each tokenizer file must resolve inside the root too
        if os.path.exists(os.path.join(folder, f)):
            _confined(where, os.path.join(folder, f), root)
    if not any(os.path.exists(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        raise AdapterError(f"{where}: its vocabulary is resized to {kinds['head']} tokens, but the folder holds no "
                           f"tokenizer ({', '.join(TOKENIZER_FILES)}): save the tokenizer with the adapter")
    return kinds["head"]


def _content_hash(config: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(key.encode())
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.contiguous().view(torch.uint8).numpy())  # the buffer itself: no copy
    return h.digest()


def _split_key(key: str) -> tuple[str, Optional[str], list[str]]:
    """``base_model.model.<module>.<marker>.<rest>`` -> (module, marker, rest); marker None for a plain
    ``<module>.<param>`` key (then rest is ``[param]``)."""
    segments = key[len(_PREFIX):].split(".") if key.startswith(_PREFIX) else key.split(".")
    for i, seg in enumerate(segments):
        if (seg in _LORA_PARTS or seg in (_MAGNITUDE, _TOKENS) or seg in _UNSUPPORTED_MARKERS
                or seg in _COPY_MARKERS):
            marker = None if seg in _COPY_MARKERS else seg
            rest = segments[i + 1:]
            return ".".join(segments[:i]), marker, (rest[-1:] if marker is None else rest)
    return ".".join(segments[:-1]), None, segments[-1:]


def _candidates(spec: AdapterTargetSpec) -> dict[str, tuple[ModuleTarget, list[ModuleTarget]]]:
    """Every module an adapter may name: the spec's modules, plus fused names (``...qkv_proj``) whose unfused parts
    the spec has, as a virtual linear target with ``out_features`` summed over the parts."""
    out: dict[str, tuple[ModuleTarget, list[ModuleTarget]]] = {n: (t, []) for n, t in spec.modules.items()}
    for fused, part_leaves in spec.packed_modules_mapping.items():
        for name in spec.modules:
            if leaf(name) != part_leaves[0]:
                continue
            prefix = name[: len(name) - len(part_leaves[0])]
            parts = [spec.modules.get(prefix + p) for p in part_leaves]
            if any(p is None or p.kind != "linear" for p in parts) or prefix + fused in out:
                continue
            total = sum(p.out_features for p in parts)
            out[prefix + fused] = (ModuleTarget(prefix + fused, "linear", parts[0].in_features, total), parts)
    return out


def _is_output_head(name: str) -> bool:
    return leaf(name) == "lm_head"


def _validate_pair(wfile: str, module: str, slot: dict, target: ModuleTarget, cfg: PeftLoraConfig,
                   max_lora_rank: int, where: str) -> LoRAWeights:
    """Check ``A [r, in]``, ``B [out, r]`` (embedding: ``A [r, vocab]``, ``B [hidden, r]``), r and the limit."""
    if "A" not in slot or "B" not in slot:
        have = next(k for k in ("A", "B", "M", "b") if k in slot)
        missing = "B" if "A" in slot else "A"
        raise AdapterError(f"{wfile}: tensor {slot[have][0]!r} has no matching lora_{missing} tensor "
                           f"for module {module!r}")
    (a_key, A, a_emb), (b_key, B, b_emb) = slot["A"], slot["B"]
    is_emb = target.kind == "embedding"
    if a_emb != is_emb or b_emb != is_emb:
        want = "lora_embedding_A/B" if is_emb else "lora_A/B"
        raise AdapterError(f"{wfile}: tensor {a_key!r}: module {module!r} is {target.kind} and expects {want} keys")
    r_cfg, _ = cfg.rank_and_alpha(module)
    vocab_dim_a = is_emb  # embedding A is [r, vocab]; head B is [vocab, r]
    if A.dim() != 2 or A.shape[1] != target.in_features:
        raise AdapterError(_shape_msg(wfile, a_key, (r_cfg, target.in_features), A, vocab_dim_a))
    if B.dim() != 2 or B.shape[0] != target.out_features:
        raise AdapterError(_shape_msg(wfile, b_key, (target.out_features, r_cfg), B, _is_output_head(module)))
    if A.shape[0] != B.shape[1]:
        raise AdapterError(f"{wfile}: tensors {a_key!r} {tuple(A.shape)} and {b_key!r} {tuple(B.shape)} disagree "
                           f"on the rank ({A.shape[0]} vs {B.shape[1]})")
    rank = int(A.shape[0])
    if rank != r_cfg:
        raise AdapterError(f"{wfile}: tensor {a_key!r} has rank {rank}, but {CONFIG_FILE} gives r={r_cfg} for "
                           f"module {module!r} (r / rank_pattern)")
    if rank > max_lora_rank:
        raise AdapterError(f"{where}: module {module!r} has rank {rank}, above the limit max_lora_rank="
                           f"{max_lora_rank}")
    magnitude = None
    if "M" in slot:
        m_key, M, _ = slot["M"]
        if M.dim() != 1 or M.shape[0] != target.out_features:
            raise AdapterError(f"{wfile}: tensor {m_key!r} has shape {tuple(M.shape)}, expected "
                               f"({target.out_features},): one DoRA magnitude per "
                               f"{'hidden dim' if is_emb else 'output channel'} of {module!r}")
        if not bool((M > 0).all()):
            raise AdapterError(f"{wfile}: tensor {m_key!r}: DoRA magnitudes must be positive")
        magnitude = M.float().contiguous()
    elif cfg.use_dora:
        raise AdapterError(f"{wfile}: {CONFIG_FILE} sets use_dora, but module {module!r} has no "
                           f"{_MAGNITUDE} tensor")
    bias = None
    if "b" in slot:
        bias_key, bias, _ = slot["b"]
        if is_emb:
            raise AdapterError(f"{wfile}: tensor {bias_key!r}: embedding {module!r} takes no LoRA bias")
        if bias.dim() != 1 or bias.shape[0] != target.out_features:
            raise AdapterError(f"{wfile}: tensor {bias_key!r} has shape {tuple(bias.shape)}, expected "
                               f"({target.out_features},): the LoRA bias of {module!r}")
        bias = bias.float().contiguous()
    elif cfg.lora_bias and not is_emb:
        raise AdapterError(f"{wfile}: {CONFIG_FILE} sets lora_bias, but module {module!r} has no lora_B.bias tensor")
    # A and B keep the checkpoint's dtype (a float32 copy of a bf16 adapter doubled its host memory and a fifth
    # of its read time): slot writes convert them to the model's dtype, the DoRA norms compute in float32
    return LoRAWeights(A.contiguous(), B.contiguous(), cfg.scaling(module), magnitude, bias)


def _shape_msg(wfile: str, key: str, expected: tuple[int, int], t: torch.Tensor, vocab_related: bool) -> str:
    msg = f"{wfile}: tensor {key!r} has shape {tuple(t.shape)}, expected {expected}"
    if vocab_related:
        msg += (" (a resized vocabulary: an adapter that adds tokens must save embed_tokens and lm_head whole, "
                "with modules_to_save, and carry its tokenizer)")
    return msg


def _split_fused(wfile: str, b_key: str, w: LoRAWeights, parts: list[ModuleTarget]) -> list[tuple[str, LoRAWeights]]:
    """Fused LoRA (``qkv_proj``) -> one LoRA per unfused module: A shared, B split along the output dim."""
    sizes = [p.out_features for p in parts]
    if w.B.shape[0] != sum(sizes):
        raise AdapterError(f"{wfile}: tensor {b_key!r} has shape {tuple(w.B.shape)}, expected "
                           f"({sum(sizes)}, {w.rank}) = {' + '.join(map(str, sizes))} rows")
    mags = w.magnitude.split(sizes) if w.magnitude is not None else [None] * len(parts)
    biases = w.bias.split(sizes) if w.bias is not None else [None] * len(parts)
    return [(p.name, LoRAWeights(w.A.clone(), b.clone(), w.scaling, None if m is None else m.clone(),
                                 None if c is None else c.clone()))
            for p, b, m, c in zip(parts, w.B.split(sizes, dim=0), mags, biases)]


def _check_copy(wfile: str, key: str, module: str, rest: list[str], tensor: torch.Tensor,
                spec: AdapterTargetSpec, cfg: PeftLoraConfig) -> Optional[torch.Tensor]:
    """A full copy of a base parameter: accepted when it equals the base model's (PEFT saves embedding/head
    copies beside their LoRA, and ``modules_to_save`` copies that may or may not have been trained); a trained
    ``modules_to_save`` copy of the input embedding or the output head is returned (the adapter's own table,
    float32); any other modified copy is refused."""
    param = rest[-1] if rest else ""
    saved_module = cfg.is_module_to_save(module)
    target = spec.modules.get(module)
    if target is None and not saved_module:
        raise AdapterError(f"{wfile}: tensor {key!r} is for module {module!r}, which the model does not have "
                           "(or is not a LoRA tensor)")
    feature = "modules_to_save" if saved_module else "a copy of the base weights"
    if target is not None and param == "weight":
        expected = ((target.in_features, target.out_features) if target.kind == "embedding"
                    else (target.out_features, target.in_features))
        table = target.kind == "embedding" or _is_output_head(module)
        if table and tensor.dim() == 2 and tensor.shape[1] == expected[1] and tensor.shape[0] > expected[0]:
            return tensor.float().contiguous()  # a vocabulary extended by added tokens: the adapter's own table
        if tuple(tensor.shape) != expected:
            vocab = target.kind == "embedding" or _is_output_head(module)
            raise AdapterError(_shape_msg(wfile, key, expected, tensor, vocab) + f" [{feature}]")
    got = spec.base_weight(module if param == "weight" else f"{module}.{param}")
    base = None if got is None else got[0]
    whole = tensor
    if got is not None:
        tensor = got[1](tensor)  # this rank's part (tensor parallelism)
    table = target is not None and param == "weight" and (target.kind == "embedding" or _is_output_head(module))
    if saved_module and table and base is not None and tensor.shape != whole.shape:
        # Under tensor parallelism a rank sees one shard of the base table, too little to prove the copy unchanged:
        # the whole table is kept as the adapter's own (right either way; the wrappers take their rows of it).
        return whole.float().contiguous()
    if base is None:
        if saved_module or param != "weight":
            raise AdapterError(f"{wfile}: tensor {key!r}: unsupported PEFT feature {feature} (full copy of "
                               f"{module}.{param}), and the base weight is not available to prove it unchanged")
        return
    if tuple(base.shape) != tuple(tensor.shape) or not _same_weights(tensor, base):
        if saved_module and table:
            return tensor.float().contiguous()
        raise AdapterError(f"{wfile}: tensor {key!r}: the adapter carries a modified copy of the base weights of "
                           f"{module!r} ({feature}); trained full copies are supported for the input embedding and "
                           "the output head only")
    return None


def _same_weights(saved: torch.Tensor, base: torch.Tensor) -> bool:
    # Round both to the coarser dtype first: a float32 copy must match a base that the engine holds in bf16.
    coarse = saved.dtype if torch.finfo(saved.dtype).eps >= torch.finfo(base.dtype).eps else base.dtype
    a = saved.detach().to("cpu", coarse).float()
    b = base.detach().to("cpu", coarse).float()
    return torch.allclose(a, b, rtol=1e-6, atol=1e-8)
