"""Shared shape of the vision-language models: a vision encoder, a Llama-family language model
under ``model.language_model``, and ``lm_head``, with Hugging Face (transformers 5) module names so
that checkpoints and PEFT adapter keys map directly.

The forward reads the step's images from the forward context, runs the vision encoder on them (under a
LoRA batch whose rows are the images' patches, so vision-tower adapters apply per image), and merges the
features into the token embeddings with :func:`embed_multimodal`.
"""

from __future__ import annotations

import abc
import re
from typing import Any, Optional

import torch
from torch import nn

from loraplex.engine.context import get_forward_context
from loraplex.multimodal.batch import MultiModalBatch
from loraplex.multimodal.embedding import embed_multimodal


class VisionLanguageModel(nn.Module, abc.ABC):
    """Base class; subclasses build ``self.model`` (with ``language_model``) and ``self.lm_head`` and
    implement :meth:`embed_images` and :meth:`num_image_features`."""

    supports_images = True
    uses_mrope = False
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    # (regex, replacement) rules that turn checkpoint names saved by older transformers (and by
    # transformers 5, which saves the legacy layout) into module names; the first match applies.
    checkpoint_key_mapping: list[tuple[str, str]] = []

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.text_config = config.get_text_config()
        self.model: nn.Module
        self.lm_head: nn.Module

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def tied_embeddings(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def image_prompt_token_ids(self) -> list[int]:
        """The tokens that stand for one image in a prompt (before expansion)."""
        return [self.image_token_id]

    def get_input_embeddings(self) -> nn.Module:
        return self.model.language_model.embed_tokens

    @classmethod
    def rename_checkpoint_key(cls, name: str) -> str:
        for pattern, repl in cls.checkpoint_key_mapping:
            new, n = re.subn(pattern, repl, name, count=1)
            if n:
                return new
        return name

    @abc.abstractmethod
    def embed_images(self, mm: MultiModalBatch) -> torch.Tensor:
        """(total placeholder positions of ``mm``'s images, hidden) vision features, image by image."""

    @abc.abstractmethod
    def num_image_features(self, data: dict[str, torch.Tensor]) -> int:
        """How many placeholder positions one processed image expands to."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        if inputs_embeds is None:
            mm = get_forward_context().multimodal
            features = self._image_features(mm) if mm is not None and mm.images else None
            inputs_embeds = embed_multimodal(self.get_input_embeddings(), input_ids, features)
        return self.model.language_model(input_ids, positions, inputs_embeds)

    # set by the engine (multimodal.encoder_cache.EncoderCache); None: every image is encoded every time
    encoder_cache = None

    def _image_features(self, mm: MultiModalBatch) -> torch.Tensor:
        """:meth:`embed_images` through the encoder cache: only images not cached under their request's
        adapter run the vision tower (in one batch)."""
        cache = self.encoder_cache
        if cache is None or mm.identities is None:
            return self.embed_images(mm)
        keys = [(img.digest, ident) for img, ident in zip(mm.images, mm.identities)]
        parts = [cache.get(k) for k in keys]
        missing = [i for i, f in enumerate(parts) if f is None]
        if missing:
            new = self.embed_images(mm.subset(missing)).split([mm.images[i].length for i in missing])
            for i, f in zip(missing, new):
                parts[i] = f
                cache.put(keys[i], f)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(rows, hidden) -> (rows, padded vocab); padding columns are masked by the sampler."""
        return self.lm_head(hidden)

    def _dtype_device(self) -> tuple[torch.dtype, torch.device]:
        w = self.lm_head.weight
        return w.dtype, w.device
