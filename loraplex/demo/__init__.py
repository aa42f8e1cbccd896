"""The embedded demo: a small Llama trained on public-domain text and three PEFT adapters, shipped inside
the package so ``loraplex demo`` runs with no download.

- ``assets/model``: the base model (Hugging Face folder: config, safetensors weights, ``tokenizer.json``,
  ``chat_template.jinja``: see ``CHAT_TEMPLATE``).
- ``assets/adapters/{upper,rot13,swap}``: PEFT LoRA folders (see ``ADAPTER_SPECS``).
- ``assets/training.json``: the configuration, losses and seconds of the run that built them.

``python -m loraplex.demo.train`` rebuilds everything; ``loraplex.demo.run`` is the ``demo`` command.
Importing this module is cheap (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
MODEL_DIR = ASSETS / "model"
ADAPTER_DIR = ASSETS / "adapters"

# The model writes prose, not dialogue: a conversation is its messages' text, one message a line, and the
# reply continues the last line (no generation prompt), so one user message gets what a completion of the
# same text gets. The training text has no line breaks: a newline after the last message would make the
# reply start from a token the model has hardly seen.
CHAT_TEMPLATE = (
    "{#- loraplex demo model: the messages' text, one message a line; the reply continues the last line -#}\n"
    "{{- messages | selectattr('content', 'string') | map(attribute='content') | map('trim') | join('\\n') -}}\n"
)


@dataclass(frozen=True)
class AdapterSpec:
    """One demo adapter: what it learns and how it is trained."""

    name: str
    description: str
    rank: int
    alpha: int
    targets: tuple[str, ...]
    task: str  # "continue": plain prefix, rewritten continuation; "permute": the base model, tokens swapped
    lr_scale: float = 1.0
    steps_scale: float = 1.0


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ADAPTER_SPECS: tuple[AdapterSpec, ...] = (
    AdapterSpec("upper", "continues in capital letters", rank=4, alpha=8, targets=ALL_LINEAR, task="continue"),
    AdapterSpec("rot13", "continues in ROT13 (decode it and it reads like the base model)", rank=16, alpha=32,
                targets=ALL_LINEAR, task="continue"),
    AdapterSpec("swap", "swaps good/bad, old/new, first/last, up/down, ... in what it reads and writes",
                rank=8, alpha=16, targets=("embed_tokens", "lm_head"), task="permute", lr_scale=2.0, steps_scale=2.0),
)


def adapter_paths() -> dict[str, Path]:
    """Name -> PEFT folder of every embedded adapter."""
    return {spec.name: ADAPTER_DIR / spec.name for spec in ADAPTER_SPECS}
