"""Parse a PEFT ``adapter_config.json`` and decide, as PEFT 0.21 does, which modules an adapter targets.

The matching rules mirror ``peft.tuners.tuners_utils.check_target_module_exists``, ``_maybe_include_all_linear_layers``
and ``peft.utils.other.get_pattern_key`` so that loraplex adapts exactly the modules PEFT would have adapted:

- ``exclude_modules`` wins first (regex string: ``re.fullmatch``; list: exact name or ``.<suffix>``), then
  ``modules_to_save`` (PEFT never puts LoRA on a module it saves whole);
- ``target_modules`` as a string is a ``re.fullmatch`` regex (``"all-linear"``: every linear except the output head);
  as a list a module is targeted when its full name is listed, or it ends with ``.<entry>`` and, if
  ``layers_to_transform`` is set, its first numbered segment (after ``layers_pattern`` when given) is a chosen layer;
- ``rank_pattern`` / ``alpha_pattern``: the first key with ``re.match(rf"(.*\\.)?({key})$", name)`` wins.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from loraplex.errors import AdapterError

ALL_LINEAR = "all-linear"
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # peft.utils.constants.EMBEDDING_LAYER_NAMES

# Config fields that change what the adapter computes (or what base weights it needs). A truthy value is refused.
_UNSUPPORTED_FIELDS = {
    "use_qalora": "QALoRA (use_qalora)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "layer_replication": "layer replication (layer_replication)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
}
# init_lora_weights values whose initialisation rewrites the base weights (the adapter only fits the modified base)
# or swaps in another forward (MiCA). PiSSA/OLoRA/CorDA/LoRA-GA adapters converted at save time carry
# init_lora_weights=True and load normally.
_BASE_MODIFYING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga", "mica")


def leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


@dataclass
class PeftLoraConfig:
    """The fields of a LoRA ``adapter_config.json`` that decide targets and scaling."""

    raw: dict
    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    target_modules: Union[str, list[str], None] = None
    exclude_modules: Union[str, list[str], None] = None
    layers_to_transform: Union[int, list[int], None] = None
    layers_pattern: Union[str, list[str], None] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    ensure_weight_tying: bool = False
    use_dora: bool = False  # DoRA: each targeted module also has a magnitude vector (lora_magnitude_vector)
    lora_bias: bool = False  # lora_B of each targeted linear module has a bias (lora_B.bias), scaled like B A x
    # trainable tokens: token ids whose embedding rows the adapter replaces; a list (the input embedding) or
    # {module name: ids} (embed_tokens and/or lm_head)
    trainable_token_indices: Union[list[int], dict[str, list[int]], None] = None

    # --- matching ---------------------------------------------------------------------------------------------
    def is_all_linear(self) -> bool:
        return isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR

    def is_excluded(self, name: str) -> bool:
        ex = self.exclude_modules
        if ex:
            if isinstance(ex, str):
                if re.fullmatch(ex, name):
                    return True
            elif name in ex or any(name.endswith(f".{e}") for e in ex):
                return True
        return self.is_module_to_save(name)

    def is_module_to_save(self, name: str) -> bool:
        if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in self.modules_to_save):
            return True
        # ensure_weight_tying: PEFT saves the tied partner of a saved embedding (or head) too, under its own name
        return (self.ensure_weight_tying and leaf(name) in EMBEDDING_LAYER_NAMES
                and any(leaf(m) in EMBEDDING_LAYER_NAMES for m in self.modules_to_save))

    def _in_layers(self, name: str) -> bool:
        wanted = self.layers_to_transform
        if wanted is None or (isinstance(wanted, list) and not wanted):
            return True
        match = None
        patterns = self.layers_pattern
        if not patterns:
            # lazy ".*?" picks the first numbered segment (the layer), not e.g. an expert index
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        else:
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
                if match is not None:
                    break
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == wanted if isinstance(wanted, int) else index in wanted

    def _embedding_in_target(self) -> bool:
        tm = self.target_modules
        if isinstance(tm, str):
            return any(re.fullmatch(tm, e) for e in EMBEDDING_LAYER_NAMES)
        return any(leaf(t) in EMBEDDING_LAYER_NAMES for t in tm or [])

    def is_targeted(self, name: str, is_linear: bool, is_output_head: bool) -> bool:
        """Whether PEFT would have put this adapter's LoRA on module ``name``."""
        if self.is_excluded(name):
            return False
        tm = self.target_modules
        if self.ensure_weight_tying and leaf(name) in EMBEDDING_LAYER_NAMES and self._embedding_in_target():
            return True  # PEFT ties the head's LoRA to the embedding's and saves it under the head's name
        if self.is_all_linear():
            return is_linear and not is_output_head
        if isinstance(tm, str):
            return re.fullmatch(tm, name) is not None
        if tm is None:
            return False
        if name in tm:
            return True  # a full name listed verbatim bypasses layers_to_transform, as in PEFT
        return any(name.endswith(f".{t}") for t in tm) and self._in_layers(name)

    def unmatched_targets(self, names: list[str]) -> list[str]:
        """Entries of ``target_modules`` that match none of ``names`` at all (before exclusions)."""
        tm = self.target_modules
        if tm is None or self.is_all_linear():
            return []
        if isinstance(tm, str):
            return [] if any(re.fullmatch(tm, n) for n in names) else [tm]
        return [t for t in tm if not any(n == t or n.endswith(f".{t}") for n in names)]

    # --- rank and scaling -------------------------------------------------------------------------------------
    def rank_and_alpha(self, name: str) -> tuple[int, float]:
        r_key = _pattern_key(self.rank_pattern, name)
        a_key = _pattern_key(self.alpha_pattern, name)
        r = self.rank_pattern[r_key] if r_key is not None else self.r
        alpha = self.alpha_pattern[a_key] if a_key is not None else self.lora_alpha
        return int(r), float(alpha)

    def scaling(self, name: str) -> float:
        r, alpha = self.rank_and_alpha(name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_key(patterns: dict, name: str) -> Optional[str]:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def parse_lora_config(raw: Any, where: str) -> PeftLoraConfig:
    """Validate ``raw`` (the parsed JSON) and refuse LoRA variants loraplex does not compute; ``where`` names the
    adapter and file in error messages."""
    if not isinstance(raw, dict):
        raise AdapterError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    peft_type = raw.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise AdapterError(f"{where}: peft_type is {peft_type!r}; only LORA adapters are supported")
    for key, feature in _UNSUPPORTED_FIELDS.items():
        if raw.get(key):
            raise AdapterError(f"{where}: unsupported PEFT feature {feature} = {raw[key]!r}")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise AdapterError(
            f"{where}: unsupported PEFT feature init_lora_weights={init!r}: this initialisation modifies the base "
            "weights, so the adapter needs a modified base model (convert it with PEFT's "
            "path_initial_model_for_weight_conversion first)"
        )
    if raw.get("use_dora") and raw.get("lora_bias"):
        raise AdapterError(f"{where}: use_dora and lora_bias together: PEFT does not support that combination")
    if raw.get("bias", "none") not in ("none", None):
        raise AdapterError(f"{where}: unsupported PEFT feature bias={raw['bias']!r} (trained base-layer biases)")

    def _get(key: str, default: Any) -> Any:
        value = raw.get(key)
        return default if value is None else value

    cfg = PeftLoraConfig(
        raw=raw,
        r=_get("r", 8),
        lora_alpha=_get("lora_alpha", 8),
        use_rslora=bool(_get("use_rslora", False)),
        target_modules=raw.get("target_modules"),
        exclude_modules=raw.get("exclude_modules"),
        layers_to_transform=raw.get("layers_to_transform"),
        layers_pattern=raw.get("layers_pattern"),
        rank_pattern=dict(_get("rank_pattern", {})),
        alpha_pattern=dict(_get("alpha_pattern", {})),
        modules_to_save=list(_get("modules_to_save", [])),
        ensure_weight_tying=bool(_get("ensure_weight_tying", False)),
        use_dora=bool(_get("use_dora", False)),
        lora_bias=bool(_get("lora_bias", False)),
        trainable_token_indices=raw.get("trainable_token_indices"),
    )
    tti = cfg.trainable_token_indices
    groups = tti.values() if isinstance(tti, dict) else [tti] if tti is not None else []
    if not isinstance(tti, (list, dict, type(None))) or any(
            not isinstance(g, list) or not g or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in g)
            for g in groups):
        raise AdapterError(f"{where}: trainable_token_indices must be a non-empty list of token ids, or a mapping "
                           f"of module names to such lists, got {tti!r}")
    if not isinstance(cfg.r, int) or isinstance(cfg.r, bool) or cfg.r <= 0:
        raise AdapterError(f"{where}: r must be a positive integer, got {cfg.r!r}")
    if not isinstance(cfg.lora_alpha, (int, float)) or isinstance(cfg.lora_alpha, bool):
        raise AdapterError(f"{where}: lora_alpha must be a number, got {cfg.lora_alpha!r}")
    for key, value in list(cfg.rank_pattern.items()):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise AdapterError(f"{where}: rank_pattern[{key!r}] must be a positive integer, got {value!r}")
    tm = cfg.target_modules
    if tm is None or not isinstance(tm, (str, list)) or (isinstance(tm, list) and not tm):
        raise AdapterError(f"{where}: target_modules must be a non-empty list or a regex string, got {tm!r}")
    for key in ("target_modules", "exclude_modules", "layers_pattern"):
        value = getattr(cfg, key)
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise AdapterError(f"{where}: {key} must hold strings, got {value!r}")
    for key in ("target_modules", "exclude_modules"):
        value = getattr(cfg, key)
        for pattern in [value] if isinstance(value, str) else []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise AdapterError(f"{where}: {key} {pattern!r} is not a valid regex: {exc}") from None
    return cfg
